"""benchmarks/gpu_check.py, the prepared accelerator check, run on the CPU at 1 layer and 64 px.

The GPU run (full depth, 512 px, a group of 8, bf16) cannot run here; this runs the same code path small: both families
at real width with 1-layer text encoders, both `recompute_old_means` settings, one GRPO-Guard step each, in float32,
and checks the JSON it writes. 50-80 s on 2 shared cores (four real-width builds), hence `slow`.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

SMALL = ["--device", "cpu", "--layers", "1", "--text-layers", "1", "--resolution", "64", "--max-sequence-length", "16"]


@pytest.mark.slow
def test_gpu_check_writes_every_figure_for_both_families_and_settings(tmp_path):
    output = tmp_path / "check.json"
    # float32: CPUs without bf16 matrix units run bf16 much slower, and the test checks the figures, not the drift
    argv = [*SMALL, "--group", "2", "--train-batch", "1", "--steps", "1", "--inference-steps", "2", "--dtype", "fp32"]
    returned = gpu_check.main([*argv, "--output", str(output)])
    result = json.loads(output.read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["options"]["layers"] == 1 and result["options"]["resolution"] == 64

    runs = {(run["family"], run["recompute_old_means"]): run for run in result["runs"]}
    assert set(runs) == {(family, recompute) for family in gpu_check.FAMILIES for recompute in (False, True)}
    for (family, recompute), run in runs.items():
        assert run["optimizer_steps"] == 1
        seconds = run["seconds_per_step"]
        assert all(seconds[part] > 0 for part in ("sampling", "scoring", "training", "total")), (family, seconds)
        if recompute:  # the recompute forwards run only with the option on (off, the part times the bare wrapper)
            assert seconds["recompute"] > runs[family, False]["seconds_per_step"]["recompute"]
        assert seconds["total"] >= seconds["sampling"] + seconds["training"]
        assert run["peak_memory"]["kind"].startswith("peak RSS") and run["peak_memory"]["bytes"] > 2**20
        first = run["first_pass"]
        # every sample at every trained step of the round's first pass: 2 images x 2 steps
        assert first["clip"] == 2e-6 and first["all_rounds"]["samples"] == 2 * 2
        assert len(first["per_round"]) == 1
        assert first["all_rounds"]["max_abs_log_ratio"] >= 0
        assert 0 <= first["all_rounds"]["share_outside_clip"] <= 1
        if recompute:  # the first pass repeats the recomputed forwards exactly
            assert first["all_rounds"]["max_abs_log_ratio"] == 0
        # real width, one block: SD3.5 Medium's 1536-wide block, FLUX's 3072-wide double and single blocks
        assert run["parameters"]["transformer"] > 30_000_000


def test_gpu_check_refuses_a_training_batch_that_does_not_divide_the_group(tmp_path):
    with pytest.raises(ValueError, match="--train-batch 3 must divide --group 8"):
        gpu_check.main([*SMALL, "--group", "8", "--train-batch", "3", "--output", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
