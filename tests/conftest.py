import copy
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from trl_guard.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

# The study analyses (benchmarks/analysis) are not part of the installed package: tests import them as
# `analysis.overoptimization`, as the benchmark scripts do. Appended, so no benchmark script shadows another module.
sys.path.append(str(Path(__file__).parents[1] / "benchmarks"))


@pytest.fixture(scope="session")
def _base_pipeline():
    return build_tiny_sd3_pipeline(seed=0)


@pytest.fixture
def tiny_pipeline(_base_pipeline):
    """A fresh copy of the tiny SD3 pipeline (training mutates the transformer)."""
    return copy.deepcopy(_base_pipeline)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(_base_pipeline, tmp_path_factory):
    """The tiny pipeline written with `save_pretrained`, to load by path like a Hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-sd3")
    _base_pipeline.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def _base_flux_pipeline():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture
def tiny_flux_pipeline(_base_flux_pipeline):
    return copy.deepcopy(_base_flux_pipeline)


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(_base_flux_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flux")
    _base_flux_pipeline.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def newcomers_demo(tmp_path_factory):
    """`trl-guard demo --steps 2` in a fresh process, as a newcomer runs it (the default world: toy when its model is
    installed), and its output folder: one run that test_demo checks for spurious warnings and test_toy_model for
    the report's plots."""
    import subprocess

    output_dir = tmp_path_factory.mktemp("newcomers-demo")
    command = [sys.executable, "-m", "trl_guard.cli", "demo", "--steps", "2", "--output-dir", str(output_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900), output_dir


@pytest.fixture
def no_proxy(monkeypatch):
    """urllib honours the *_proxy variables: requests to a test's loopback server must not go through one."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def prompts():
    return Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)], "label": list(range(8))})


def blueness(prompts, images, **kwargs):
    """Mean blue channel in [0, 1]: a reward the tiny model can learn quickly."""
    return [float(np.asarray(image, dtype=np.float32)[..., 2].mean() / 255) for image in images]


@pytest.fixture
def launch_recipe(tiny_pipeline_dir, tmp_path):
    """A CLI recipe for the tiny SD3 pipeline with its reward module and prompts, written to `tmp_path` (the
    working directory of `helpers.launch`)."""
    from helpers import RECIPE, REWARD

    (tmp_path / "tests_rewards.py").write_text(REWARD)
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(8)))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(pipeline=tiny_pipeline_dir, prompts=tmp_path / "prompts.txt"))
    return path
