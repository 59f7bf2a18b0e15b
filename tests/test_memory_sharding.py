"""Memory under FSDP2 on two CPU processes over gloo (tests/fsdp2_cpu.py, as tests/test_fsdp2.py runs it): full
fine-tuning's frozen reference sharded like the policy, CPU offload of the parameters and activation checkpointing,
each against one process, with every copy of the weights (reference, EMA, lagged policy) holding one process's part.
"""

import json
import sys
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import launch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
HARNESS = str(ROOT / "tests" / "fsdp2_cpu.py")
FSDP2_CONFIG = ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"


def one_process(recipe, output_dir, *flags):
    args = ["--config", recipe, "--output_dir", output_dir, "--per_device_train_batch_size", "16", *flags]
    helpers.one_process(args, recipe.parent)


def fsdp2(recipe, output_dir, *flags, config=FSDP2_CONFIG):
    """Two FSDP2 processes; returns each process's sizes of the copies of the weights (`tests/fsdp2_cpu.py`)."""
    report = recipe.parent / f"{output_dir}-shards"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command = [*launcher, "--num_processes", "2", HARNESS, "--config", str(recipe), "--output_dir", output_dir]
    launch([*command, "--per_device_train_batch_size", "8", *flags], recipe.parent, env={"SHARD_REPORT": str(report)})
    return [json.loads(Path(f"{report}.copies.{rank}.json").read_text()) for rank in (0, 1)]


def fsdp2_config(tmp_path, **fsdp_config) -> Path:
    """The shipped fsdp2.yaml with some of its `fsdp_config` fields changed."""
    config = yaml.safe_load(FSDP2_CONFIG.read_text())
    config["fsdp_config"].update(fsdp_config)
    path = tmp_path / "fsdp2_changed.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_halved(copies: list[dict], name: str):
    """Each process holds about half of the copy `name`, and the two halves make it whole."""
    local = [copies[rank][name]["local"] for rank in (0, 1)]
    total = copies[0][name]["global"]
    assert total > 0 and max(local) <= 0.55 * total and sum(local) >= total, (name, local, total)


def _pipeline_dir(recipe) -> str:
    return next(line.split(": ", 1)[1] for line in recipe.read_text().splitlines() if line.startswith("model_name"))


def _full_weights(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder / "transformer").state_dict()


def _kl_logged(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    return [entry["kl"] for entry in state["log_history"] if "kl" in entry]


@pytest.mark.filterwarnings("ignore:.*use_peft is false:UserWarning")  # the LoRA recipe, fully fine-tuned
@pytest.mark.slow
def test_full_fine_tuning_reference_and_ema_sharded_under_cpu_offload_match_one_process(launch_recipe, tmp_path):
    """Full fine-tuning with a KL (`beta > 0`) keeps a frozen copy of the starting weights: each process holds its
    half of it, and its (now collective) forwards give the run one process gives; so does the EMA. One run checks this
    under `fsdp_offload_params: true` too (one 2-process launch instead of two, for the suite's time): FSDP2 keeps each
    process's shards (and their gradients and optimizer state) in host memory and gathers them onto the device for
    each block's forward and backward, the reference and the EMA offloaded like the policy.

    On a CPU-only machine the offload is host to host, and the harness unpins it (pinned memory needs an accelerator:
    `fully_shard` fails in `pin_memory()`); what this checks is that the trainer runs and trains the same under it."""
    flags = ("--use_peft", "false", "--learning_rate", "0.5", "--beta", "0.5", "--ema_decay", "0.5")
    flags += ("--ema_update_interval", "1")
    one_process(launch_recipe, "one", *flags)
    copies = fsdp2(launch_recipe, "two", *flags, config=fsdp2_config(tmp_path, fsdp_offload_params=True))

    assert copies[0]["offload_policy"] == "CPUOffloadPolicy"
    assert_halved(copies, "reference")
    assert_halved(copies, "ema")
    trained = {run: _full_weights(tmp_path / run) for run in ("one", "two")}
    for key, expected in trained["one"].items():
        torch.testing.assert_close(trained["two"][key], expected, rtol=1e-4, atol=1e-6)
    base = _full_weights(Path(_pipeline_dir(launch_recipe)))
    assert max((trained["one"][k] - base[k]).abs().max() for k in base) > 1e-3  # the (EMA) weights moved
    # the reference acted: the KL to it grows from 0 once the policy moved, the same on both runs
    kl_one, kl_two = _kl_logged(tmp_path / "one"), _kl_logged(tmp_path / "two")
    assert len(kl_one) == 3 and max(kl_one) > 0
    torch.testing.assert_close(torch.tensor(kl_two), torch.tensor(kl_one), rtol=1e-3, atol=1e-9)


@pytest.mark.slow
def test_gradient_checkpointing_matches_one_process_with_sharded_copies(launch_recipe, tmp_path):
    """`activation_checkpointing: true` (transformers 5's name for gradient checkpointing) under FSDP2: each block's
    forward runs again in its backward, gathering the block's shards again. DiffusionNFT with an EMA: its lagged
    policy and the EMA stay sharded."""
    flags = ("--activation_checkpointing", "true", "--loss_type", "nft", "--ema_decay", "0.5", "--ema_update_interval")
    flags += ("1",)
    one_process(launch_recipe, "one", *flags)
    copies = fsdp2(launch_recipe, "two", *flags)

    assert copies[0]["gradient_checkpointing"] and copies[0]["offload_policy"] != "CPUOffloadPolicy"
    assert_halved(copies, "ema")
    assert_halved(copies, "algorithm.lagged")
    lora_one = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    lora_two = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert lora_two.keys() == lora_one.keys()
    for key, expected in lora_one.items():
        torch.testing.assert_close(lora_two[key], expected, rtol=1e-4, atol=1e-6)
    assert max(t.abs().max() for k, t in lora_one.items() if "lora_B" in k) > 1e-3


def test_offloaded_denoiser_computes_on_the_mesh_device(monkeypatch):
    """Under FSDP2 CPU offload the shards live in host memory, but prompts, timesteps and latents belong on the device
    the shards are gathered onto: `PipelineAdapter.device` names the mesh's device, not the shard's."""
    from types import SimpleNamespace

    from trl_guard.adapters.base import PipelineAdapter

    cuda = SimpleNamespace(current_device=lambda: 3)
    monkeypatch.setattr(torch, "get_device_module", lambda device_type: cuda)
    offloaded = SimpleNamespace(device=torch.device("cpu"), device_mesh=SimpleNamespace(device_type="cuda"))
    adapter = SimpleNamespace(denoiser=SimpleNamespace(parameters=lambda: iter([offloaded])))
    assert PipelineAdapter.device.fget(adapter) == torch.device("cuda", 3)
    on_cpu = SimpleNamespace(denoiser=torch.nn.Linear(2, 2))  # neither sharded nor offloaded: its weights' device
    assert PipelineAdapter.device.fget(on_cpu) == torch.device("cpu")
