"""A recipe run with `accelerate launch` on two CPU processes (gloo) ends where the one-process run ends, for the
SDE family (GRPO-Guard) and the forward-process family (DiffusionNFT, AWM) alike.

The shipped examples/accelerate_configs/ddp_cpu.yaml makes `accelerate launch` start the torch.distributed
processes; with ACCELERATE_USE_CPU=true and no visible GPU, Accelerate runs them as MULTI_CPU over gloo. Optimizer
SGD, so that weight differences stay proportional to gradient differences (Adam's first step is a sign step and
would amplify float noise in near-zero gradients).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RECIPE = """
model_name_or_path: {pipeline}
model_init_kwargs: {{"text_encoder_3": null, "tokenizer_3": null}}
dataset_name: {prompts}
reward_funcs: [tests_rewards.blueness]
use_peft: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_modules: [attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, proj_out]
num_generations: 4
steps_per_generation: 1
max_steps: 3
optim: sgd
learning_rate: 0.5
height: 32
width: 32
num_inference_steps: 4
max_sequence_length: 16
guidance_scale: 1.0
save_strategy: steps
save_steps: 3
report_to: none
disable_tqdm: true
"""

REWARD = """
import numpy as np

def blueness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]
"""


def launch(command, cwd):
    env = {
        **os.environ,
        "PYTHONPATH": str(cwd),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture
def recipe(tiny_pipeline_dir, tmp_path):
    (tmp_path / "tests_rewards.py").write_text(REWARD)
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(8)))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(pipeline=tiny_pipeline_dir, prompts=tmp_path / "prompts.txt"))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft", "awm"])
def test_two_processes_match_one(recipe, tmp_path, loss_type):
    launch(
        [
            sys.executable,
            "-m",
            "trl_guard.scripts.grpo",
            "--config",
            str(recipe),
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
            str(recipe),
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
