"""Two CPU processes (gloo) end where one process with the same global batch and seeds ends.

`accelerate launch --multi_gpu` starts the torch.distributed processes; with ACCELERATE_USE_CPU=true and no visible
GPU, Accelerate runs them as MULTI_CPU over gloo. Optimizer SGD, so that weight differences stay proportional to
gradient differences (Adam's first step is a sign step and would amplify float noise in near-zero gradients).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def run(command, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
    }
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_match_one(tmp_path):
    script = str(HERE / "distributed_run.py")
    run([sys.executable, script, str(tmp_path / "one"), "16"], tmp_path)
    run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            script,
            str(tmp_path / "two"),
            "8",
        ],
        tmp_path,
    )
    one = json.loads((tmp_path / "one" / "rewards.json").read_text())
    two = json.loads((tmp_path / "two" / "rewards.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert two["rewards"] == pytest.approx(one["rewards"], abs=1e-6)

    lora_one = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    lora_two = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert lora_one.keys() == lora_two.keys()
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=1e-4, atol=1e-5)
