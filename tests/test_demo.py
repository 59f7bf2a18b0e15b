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


@pytest.mark.slow
def test_newcomers_demo_prints_no_spurious_warnings(tmp_path):
    """A fresh process, as a newcomer runs it: no toy-VAE type warning, no pin_memory warning, no torchvision
    fallback notice. The toy world's one-step run loads the toy pipeline, CLIP-importing diffusers and the loaders."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "trl_guard.cli", "demo", "--steps", "1", "--loss-types", "grpo_guard"]
    done = subprocess.run([*command, "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in ("Expected types for vae", "pin_memory", "requires torchvision", "FutureWarning"):
        assert noise not in output, noise
    assert "loss_type=grpo_guard" in output


def test_known_noise_filters_drop_one_message_shape_only(caplog):
    import logging

    import trl_guard  # noqa: F401  (installs the filters)

    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        )
        logger.warning("`CLIPImageProcessor` requires sentencepiece (not installed)")
    assert [r.getMessage() for r in caplog.records] == ["`CLIPImageProcessor` requires sentencepiece (not installed)"]
