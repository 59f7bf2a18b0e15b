"""FSDP2 through accelerate, on two CPU processes over gloo: the shipped examples/accelerate_configs/fsdp2.yaml
launched as a user launches it, with the test harness tests/fsdp2_cpu.py switching accelerate's state to FSDP
(accelerate turns FSDP on only for GPU-like devices; docs/sharding.md).

Each test compares a two-process FSDP2 run with the one-process run of the same recipe (SGD, so weight differences
stay proportional to gradient differences), and checks what a user gets: ordinary LoRA / diffusers files.
"""

import json
import shutil
import sys
from pathlib import Path

import helpers
import pytest
import torch
from helpers import launch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
HARNESS = str(ROOT / "tests" / "fsdp2_cpu.py")
FSDP2_CONFIG = str(ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml")
DDP_CONFIG = str(ROOT / "examples" / "accelerate_configs" / "ddp_cpu.yaml")

pytestmark = pytest.mark.slow


def one_process(recipe, output_dir, *flags):
    args = ["--config", recipe, "--output_dir", output_dir, "--per_device_train_batch_size", "16", *flags]
    helpers.one_process(args, recipe.parent)


def fsdp2(recipe, output_dir, *flags, env=None):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2_CONFIG]
    command = [*launcher, "--num_processes", "2", HARNESS, "--config", str(recipe), "--output_dir", output_dir]
    launch([*command, "--per_device_train_batch_size", "8", *flags], recipe.parent, env=env)


def assert_same_tensors(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6)


def test_lora_matches_one_process_and_is_really_sharded(launch_recipe, tmp_path):
    # with an EMA: the saved LoRA is the EMA's, a copy of the weights that must be sharded like them
    ema = ("--ema_decay", "0.5", "--ema_update_interval", "1")
    one_process(launch_recipe, "one", *ema)
    fsdp2(launch_recipe, "two", *ema, env={"SHARD_REPORT": str(tmp_path / "shards")})

    lora_one = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    lora_two = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert_same_tensors(lora_two, lora_one)
    assert max(t.abs().max() for k, t in lora_one.items() if "lora_B" in k) > 1e-3  # training moved the LoRA

    # both ranks hold half of every sharded tensor: the trainable LoRA and the frozen base alike
    ranks = [json.loads((tmp_path / f"shards.{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    block_params = [name for name in ranks[0] if name.startswith("transformer_blocks.")]
    assert block_params and all(ranks[0][n]["sharded"] for n in block_params)
    assert any(ranks[0][n]["trainable"] for n in block_params)
    for name in block_params:
        local = [ranks[r][name]["local"] for r in (0, 1)]
        assert sum(local) == ranks[0][name]["global"] and max(local) <= (ranks[0][name]["global"] + 1) // 2 + 8

    # the gathered LoRA is an ordinary diffusers LoRA file
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        _pipeline_dir(launch_recipe), text_encoder_3=None, tokenizer_3=None
    )
    pipe.load_lora_weights(tmp_path / "two")
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert loaded and max(p.abs().max() for p in loaded.values()) > 1e-3


def test_nft_lagged_policy_follows_the_shards(launch_recipe, tmp_path):
    """DiffusionNFT's old policy is a lagged copy of the trained weights, swapped into the model for its forwards:
    under FSDP2 it is sharded like them. Two optimizer steps per round make the second step use it (the copy is then
    the round's starting weights); two processes cut such a round differently from one, so the reference is DDP."""
    flags = ("--loss_type", "nft", "--steps_per_generation", "2", "--max_steps", "4")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_CONFIG]
    command = [*launcher, "-m", "trl_guard.scripts.grpo", "--config", str(launch_recipe), "--output_dir", "ddp"]
    launch([*command, "--per_device_train_batch_size", "8", *flags], launch_recipe.parent)
    fsdp2(launch_recipe, "fsdp2", *flags)
    lora_ddp = load_file(tmp_path / "ddp" / "pytorch_lora_weights.safetensors")
    assert_same_tensors(load_file(tmp_path / "fsdp2" / "pytorch_lora_weights.safetensors"), lora_ddp)
    assert max(t.abs().max() for k, t in lora_ddp.items() if "lora_B" in k) > 1e-3


def _pipeline_dir(recipe) -> str:
    return next(line.split(": ", 1)[1] for line in recipe.read_text().splitlines() if line.startswith("model_name"))


@pytest.mark.filterwarnings("ignore:.*use_peft is false:UserWarning")  # the LoRA recipe, fully fine-tuned
def test_full_fine_tuning_matches_one_process_and_saves_diffusers_weights(launch_recipe, tmp_path):
    flags = ("--use_peft", "false", "--learning_rate", "0.5")
    one_process(launch_recipe, "one", *flags)
    fsdp2(launch_recipe, "two", *flags)

    from diffusers import SD3Transformer2DModel

    config = json.loads((tmp_path / "two" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"  # not FSDP2's renamed class
    trained = {
        run: SD3Transformer2DModel.from_pretrained(tmp_path / run / "transformer").state_dict()
        for run in ("one", "two")
    }
    base = SD3Transformer2DModel.from_pretrained(Path(_pipeline_dir(launch_recipe)) / "transformer").state_dict()
    assert_same_tensors(trained["two"], trained["one"])
    assert max((trained["one"][k] - base[k]).abs().max() for k in base) > 1e-3  # the weights did move


def test_resume_in_the_middle_of_a_round_is_exact(launch_recipe, tmp_path):
    # rounds of two optimizer steps; checkpoint-3 is saved in the middle of the second round. AdamW: torch's
    # sharded optimizer loading cannot restore a stateless optimizer such as plain SGD ("Expected device to be set").
    flags = ("--steps_per_generation", "2", "--max_steps", "4", "--save_steps", "3", "--optim", "adamw_torch")
    flags += ("--learning_rate", "1e-3", "--ema_decay", "0.5", "--ema_update_interval", "1")  # the EMA resumes too
    fsdp2(launch_recipe, "straight", *flags)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert (tmp_path / "resumed" / "checkpoint-3" / "rollout_buffer_1.safetensors").exists()
    assert (tmp_path / "resumed" / "checkpoint-3" / "ema_state.safetensors").exists()
    fsdp2(launch_recipe, "resumed", *flags, "--resume_from_checkpoint", "true")

    straight = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    resumed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    before = load_file(tmp_path / "straight" / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert max((straight[k] - before[k]).abs().max() for k in before) > 1e-5  # the resumed step did train
    state = json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
