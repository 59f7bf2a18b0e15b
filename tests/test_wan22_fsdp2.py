"""Wan2.2 A14B (two experts split at `boundary_ratio`) under FSDP2, on two CPU processes over gloo, as
tests/test_fsdp2.py runs SD3: the shipped examples/accelerate_configs/fsdp2.yaml launched through this file, which
applies tests/fsdp2_cpu.py's switch to FSDP and records each process's routing of every denoiser forward.

Every FSDP2 forward and backward of a sharded block is a collective, so the processes must call the same experts in
the same order (`Wan22Experts.called_experts`). Under grpo_guard every sample of a step shares the step's sigma, so
one expert runs everywhere; under nft each sample draws its own noise level, and a process holding samples of one
expert only runs the other on a padded row. Each test compares two processes with one (SGD, so weight differences
stay proportional to gradient differences) and checks what a user gets: LoRA files `WanPipeline.load_lora_weights`
reads, or `transformer/` and `transformer_2/` folders `from_pretrained` reads.

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml \\
        --num_processes 2 tests/test_wan22_fsdp2.py --config recipe.yaml
"""

import json
import os
import sys
from pathlib import Path

import helpers
import pytest
import torch
from helpers import launch

ROOT = Path(__file__).parents[1]
FSDP2_CONFIG = str(ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml")
EXPERTS = ("transformer", "transformer_2")
# The tiny 4-step Euler grid (shift 3) has timesteps 1000, 857.7, 602.2, 8.9: a boundary of 0.7 gives each expert two.
BOUNDARY = 0.7

RECIPE = """
model_name_or_path: {pipeline}
dataset_name: {prompts}
reward_funcs: [wan_rewards.video_blueness]
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
num_generations: 4
steps_per_generation: 1
max_steps: 2
optim: sgd
learning_rate: 0.5
height: 32
width: 32
num_frames: 5
num_inference_steps: 4
max_sequence_length: 16
guidance_scale: 1.0
save_strategy: "no"
report_to: none
disable_tqdm: true
"""

REWARD = """
import numpy as np

def video_blueness(prompts, images, **kwargs):
    return [float(np.mean([np.asarray(f, dtype=np.float32)[..., 2].mean() / 255 for f in frames])) for frames in images]
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    from trl_guard.testing.wan22 import build_tiny_wan22_pipeline

    path = tmp_path_factory.mktemp("tiny-wan22")
    build_tiny_wan22_pipeline(seed=0, boundary_ratio=BOUNDARY).save_pretrained(path)
    return str(path)


@pytest.fixture
def recipe(wan22_dir, tmp_path):
    (tmp_path / "wan_rewards.py").write_text(REWARD)
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(4)))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(pipeline=wan22_dir, prompts=tmp_path / "prompts.txt"))
    return path


def one_process(recipe, output_dir, *flags):
    args = ["--config", recipe, "--output_dir", output_dir, "--per_device_train_batch_size", "4", *flags]
    helpers.one_process(args, recipe.parent)


def fsdp2(recipe, output_dir, *flags) -> list[list[dict]]:
    """Two FSDP2 processes of 2 samples each; returns each process's routing log (`_record_routing`)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2_CONFIG]
    command = [*launcher, "--num_processes", "2", __file__, "--config", str(recipe), "--output_dir", output_dir]
    report = str(recipe.parent / output_dir / "report")
    launch([*command, "--per_device_train_batch_size", "2", *flags], recipe.parent, env={"WAN22_REPORT": report})
    shards = [json.loads(Path(f"{report}.shards.{rank}.json").read_text()) for rank in (0, 1)]
    for expert in EXPERTS:  # each block of both experts is its own shard group, split between the processes
        blocks = [n for n in shards[0] if n.startswith(f"{expert}.blocks.")]
        assert blocks and all(shards[0][n]["sharded"] for n in blocks)
        assert all(shards[0][n]["local"] + shards[1][n]["local"] == shards[0][n]["global"] for n in blocks)
    return [json.loads(Path(f"{report}.routing.{rank}.json").read_text()) for rank in (0, 1)]


def assert_same_training(actual: dict, expected: dict, update: float):
    """`actual` equals `expected` up to float noise: within 0.5% of `update`, the largest change training made.

    The rewards score 8-bit frames, and splitting the batch over two processes changes the float rounding of the
    decoded pixels; with a group's rewards 5e-4 apart, the advantages move by ~1e-3 of themselves, and so does the
    update under nft (measured: 4.5e-6 on a LoRA update of 4e-3, 3e-5 on a full fine-tuning update of 2.6e-2, ~0.12%).
    A padded row leaking a gradient (its output added to the batch's as `(out - out.detach()).mean()`, same values)
    moved the nft LoRA by 1.0-1.2% of its update."""
    assert actual.keys() == expected.keys()
    assert update > 1e-4  # training moved the weights
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=5e-3 * update)


def lora_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    from trl_guard.adapters.wan22 import LORA_WEIGHT_NAMES

    return {name: load_file(folder / LORA_WEIGHT_NAMES[name]) for name in EXPERTS}


def assert_lora_matches_one_process(tmp_path):
    one, two = lora_files(tmp_path / "one"), lora_files(tmp_path / "two")
    for expert in EXPERTS:
        update = max(t.abs().max() for k, t in one[expert].items() if "lora_B" in k)  # lora_B starts at zero
        assert_same_training(two[expert], one[expert], float(update))


def padded_calls(routing: list[list[dict]]) -> list[tuple[int, int, str]]:
    """(forward, process, expert) where a process called an expert it holds no rows of: only so that its collectives
    match the other process's."""
    assert len(routing[0]) == len(routing[1]) > 0  # the same number of denoiser forwards on both processes
    padded = []
    for index, calls in enumerate(zip(*routing)):
        assert calls[0]["called"] == calls[1]["called"], index  # the same experts, in the same order
        for rank, call in enumerate(calls):
            padded += [(index, rank, e) for e in call["called"] if call["rows"][e] == 0]
    return padded


def test_grpo_guard_lora_matches_one_process_with_one_expert_per_step(recipe, tmp_path):
    """The SDE family: every sample of a step shares its sigma on every process, so each forward, sampling and
    training, calls one expert everywhere (no padded call), and the run ends where one process's does."""
    one_process(recipe, "one")
    routing = fsdp2(recipe, "two")
    assert_lora_matches_one_process(tmp_path)
    assert all(len(call["called"]) == 1 for log in routing for call in log)
    trained = {e for log in routing for call in log if call["grad"] for e in call["called"]}
    assert trained == set(EXPERTS)
    assert not padded_calls(routing)


def test_nft_lora_matches_one_process_with_an_expert_absent_from_a_process(recipe, wan22_dir, tmp_path):
    """DiffusionNFT noises each sample to its own level: some training unit holds samples of one expert only on one
    process and of the other on the other process, which then calls both experts, the missing one on a padded row.
    The run ends where one process's does, and both LoRA files load with `WanPipeline.load_lora_weights`."""
    one_process(recipe, "one", "--loss_type", "nft")
    routing = fsdp2(recipe, "two", "--loss_type", "nft")
    assert_lora_matches_one_process(tmp_path)
    padded = padded_calls(routing)
    assert any(routing[rank][index]["grad"] for index, rank, _ in padded)  # a padded call with a backward
    assert {e for _, _, e in padded} == set(EXPERTS)

    from diffusers import WanPipeline

    from trl_guard.adapters.wan22 import LORA_WEIGHT_NAMES

    pipe = WanPipeline.from_pretrained(wan22_dir)
    folder = tmp_path / "two"
    pipe.load_lora_weights(folder)
    pipe.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAMES["transformer_2"], load_into_transformer_2=True)
    saved = lora_files(folder)
    for expert in EXPERTS:
        loaded = {n: p for n, p in getattr(pipe, expert).named_parameters() if "lora_B" in n}
        assert len(loaded) == sum("lora_B" in k for k in saved[expert])
        assert max(p.abs().max() for p in loaded.values()) > 1e-4, expert


@pytest.mark.filterwarnings("ignore:.*use_peft is false:UserWarning")  # the LoRA recipe, fully fine-tuned
def test_full_fine_tuning_matches_one_process_and_saves_both_experts(recipe, wan22_dir, tmp_path):
    """No LoRA: both experts train whole under nft (padded calls included) and are gathered into the pipeline's own
    layout, each folder loading with `WanTransformer3DModel.from_pretrained`."""
    flags = ("--use_peft", "false", "--loss_type", "nft", "--learning_rate", "0.5")
    one_process(recipe, "one", *flags)
    routing = fsdp2(recipe, "two", *flags)
    assert padded_calls(routing)

    from diffusers import WanTransformer3DModel

    for expert in EXPERTS:
        config = json.loads((tmp_path / "two" / expert / "config.json").read_text())
        assert config["_class_name"] == "WanTransformer3DModel"  # not FSDP2's renamed class
        trained = {
            run: WanTransformer3DModel.from_pretrained(tmp_path / run / expert).state_dict() for run in ("one", "two")
        }
        base = WanTransformer3DModel.from_pretrained(wan22_dir, subfolder=expert).state_dict()
        update = max((trained["one"][k] - base[k]).abs().max() for k in base)
        assert_same_training(trained["two"], trained["one"], float(update))


def _record_routing() -> None:
    """In each launched process: log every `Wan22Experts` forward (its rows per expert, the experts it called, whether
    gradients were on) and every parameter's shard sizes, to `$WAN22_REPORT.{routing,shards}.<rank>.json`. The
    routing log is rewritten at every call, not at exit: `end_run` skips exit handlers registered before the script's
    `prepare_run_end`."""
    import fsdp2_cpu  # noqa: F401  (switches accelerate to FSDP on CPU processes)

    from trl_guard.adapters.wan22 import Wan22Experts

    report, rank = os.environ["WAN22_REPORT"], int(os.environ.get("RANK", 0))
    os.environ["SHARD_REPORT"] = f"{report}.shards"  # fsdp2_cpu writes it after training
    log = []
    called_experts = Wan22Experts.called_experts

    def recording(self, counts, device):
        called = called_experts(self, counts, device)
        log.append({"rows": dict(counts), "called": called, "grad": torch.is_grad_enabled()})
        Path(f"{report}.routing.{rank}.json").write_text(json.dumps(log))
        return called

    Wan22Experts.called_experts = recording


if __name__ == "__main__":
    import runpy

    _record_routing()
    runpy.run_module("trl_guard.scripts.grpo", run_name="__main__", alter_sys=True)
