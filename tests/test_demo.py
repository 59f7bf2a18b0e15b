"""The README's main job: `trl-guard demo` trains the methods side by side and writes the report."""

import json

import pytest

from trl_guard.cli import main


@pytest.mark.slow
def test_demo_on_the_tiny_world_writes_loras_and_the_report(tmp_path, capsys):
    main(["demo", "--world", "tiny", "--steps", "4", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "world: tiny" in out and "loss_type=flow_grpo" in out and "loss_type=grpo_guard" in out
    for method in ("flow_grpo", "grpo_guard"):
        assert (tmp_path / method / "pytorch_lora_weights.safetensors").exists()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {"flow_grpo", "grpo_guard"}
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "report" / "timesteps.png").exists()
