"""A recipe run with `accelerate launch` on two CPU processes (gloo) ends where the one-process run ends, for the
SDE family (GRPO-Guard) and the forward-process family (DiffusionNFT, AWM) alike.

The shipped examples/accelerate_configs/ddp_cpu.yaml makes `accelerate launch` start the torch.distributed
processes; with ACCELERATE_USE_CPU=true and no visible GPU, Accelerate runs them as MULTI_CPU over gloo. Optimizer
SGD, so that weight differences stay proportional to gradient differences (Adam's first step is a sign step and
would amplify float noise in near-zero gradients).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import launch
from safetensors.torch import load_file


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft", "awm"])
def test_two_processes_match_one(launch_recipe, tmp_path, loss_type):
    launch(
        [
            sys.executable,
            "-m",
            "trl_guard.scripts.grpo",
            "--config",
            str(launch_recipe),
            "--output_dir",
            "one",
            "--per_device_train_batch_size",
            "16",
            "--loss_type",
            loss_type,
        ],
        tmp_path,
    )
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml"),
            "-m",
            "trl_guard.scripts.grpo",
            "--config",
            str(launch_recipe),
            "--output_dir",
            "two",
            "--per_device_train_batch_size",
            "8",
            "--loss_type",
            loss_type,
        ],
        tmp_path,
    )

    def rewards(run):
        state = json.loads((tmp_path / run / "checkpoint-3" / "trainer_state.json").read_text())
        return [entry["reward"] for entry in state["log_history"] if "reward" in entry]

    assert len(rewards("one")) == 3 and rewards("two") == pytest.approx(rewards("one"), abs=1e-6)
    assert (tmp_path / "two" / "checkpoint-3" / "rng_state_1.pth").exists()  # really two processes
    lora_one = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    lora_two = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert lora_one.keys() == lora_two.keys()
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradients_are_all_reduced_once_per_optimizer_step(launch_recipe, tmp_path):
    """One all-reduce per optimizer step under DDP, however many timesteps each step backpropagates."""
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml"),
            str(Path(__file__).parent / "ddp_count_cpu.py"),
            "--config",
            str(launch_recipe),
            "--output_dir",
            "two",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--steps_per_generation",
            "2",
        ],
        tmp_path,
        env={"ALLREDUCE_COUNT": str(tmp_path / "allreduce")},
    )
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    first_log = next(entry for entry in state["log_history"] if "reward" in entry)
    trained_timesteps = {key.split("/")[1] for key in first_log if key.startswith("timestep/")}
    assert state["global_step"] == 3 and len(trained_timesteps) >= 3
    # 3 optimizer steps x 2 micro-batches x >= 3 timesteps = >= 18 backward passes per process
    assert [int((tmp_path / f"allreduce.{rank}").read_text()) for rank in (0, 1)] == [3, 3]
