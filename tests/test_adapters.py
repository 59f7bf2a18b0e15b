"""Each adapter reproduces its family's own pipeline: ODE sampling through the adapter matches `pipe(...)`."""

import os

import numpy as np
import pytest
import torch
from helpers import guided_and_branches

from trl_guard.adapters import FluxAdapter, SamplingSettings, SD3Adapter, get_adapter
from trl_guard.rollout import sample_ode

PROMPTS = ["a red cat", "two blue dogs"]


@pytest.mark.parametrize(
    ("family", "guidance_scale", "true_cfg_scale"),
    [("sd3", 1.0, 1.0), ("sd3", 4.5, 1.0), ("flux", 3.5, 1.0), ("flux", 3.5, 2.0)],
)
def test_adapter_sampling_matches_the_pipeline(family, guidance_scale, true_cfg_scale, request):
    pipe = request.getfixturevalue("tiny_pipeline" if family == "sd3" else "tiny_flux_pipeline")
    adapter = get_adapter(pipe)
    assert isinstance(adapter, SD3Adapter if family == "sd3" else FluxAdapter)
    adapter.configure(SamplingSettings(32, 32, guidance_scale, true_cfg_scale, max_sequence_length=16))
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents, adapter.sigmas(5))
    ours = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in adapter.decode(final)])

    kwargs = dict(height=32, width=32, num_inference_steps=5, max_sequence_length=16, guidance_scale=guidance_scale)
    if family == "flux" and true_cfg_scale > 1:
        kwargs.update(true_cfg_scale=true_cfg_scale, negative_prompt="")
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPTS, latents=latents.clone(), output_type="np", **kwargs).images
    assert np.abs(ours - reference).max() <= 1.5 / 255  # PIL's 8-bit rounding


@pytest.mark.parametrize(
    ("family", "guidance_scale", "true_cfg_scale", "scale"), [("sd3", 4.5, 1.0, 4.5), ("flux", 3.5, 2.0, 2.0)]
)
def test_cfg_is_one_doubled_forward_combined_as_guidance(family, guidance_scale, true_cfg_scale, scale, request):
    """With CFG the denoiser runs once on the negative and the prompt side by side, and the velocity is
    `neg + scale * (pos - neg)` of the two velocities each computed on its own."""
    adapter = get_adapter(request.getfixturevalue("tiny_pipeline" if family == "sd3" else "tiny_flux_pipeline"))
    adapter.configure(SamplingSettings(32, 32, guidance_scale, true_cfg_scale, max_sequence_length=16))
    assert adapter.cfg_scale == scale
    guided, cond, uncond, batch_sizes = guided_and_branches(adapter, PROMPTS, "blurry")
    assert batch_sizes == [4]
    torch.testing.assert_close(guided, uncond + scale * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert (guided - cond).abs().max() > 1e-3  # the negative prompt moved the velocity


def test_flux_resolution_must_pack():
    from trl_guard.testing import build_tiny_flux_pipeline

    adapter = get_adapter(build_tiny_flux_pipeline())
    with pytest.raises(ValueError, match="width=30"):
        adapter.configure(SamplingSettings(32, 30))


def test_a_new_family_registers_with_register():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trl_guard.adapters import ADAPTERS, PipelineAdapter, register

    class MyPipeline:
        scheduler = FlowMatchEulerDiscreteScheduler()

    @register
    class MyAdapter(PipelineAdapter):
        pipeline_classes = ("MyPipeline",)

    try:
        assert isinstance(get_adapter(MyPipeline()), MyAdapter)
    finally:
        ADAPTERS.remove(MyAdapter)
    with pytest.raises(
        ValueError, match="FluxPipeline, .*StableDiffusion3Pipeline, .*WanPipeline, ZImagePipeline\\.$"
    ):
        get_adapter(MyPipeline())


# ---- the package root: importing it touches no other library's loggers; the toy world's classes stay in toy -------

PACKAGE_ROOT_PROBE = r"""
import json, logging, sys

import diffusers, transformers  # their loggers exist before ours is imported


def filters():
    return {
        name: [f"{type(f).__module__}.{type(f).__qualname__}" for f in getattr(logger, "filters", [])]
        for name, logger in logging.root.manager.loggerDict.items()
        if not name.startswith("trl_guard")
    }


report = {"before": filters()}
import trl_guard

report["import"] = filters()
try:
    trl_guard.PixelSpaceAutoencoder
except AttributeError as error:
    report["toy_export"] = str(error)
from trl_guard import GuardGRPODiffusionTrainer  # imports the adapters, inside their scoped filter

report["trainer"] = filters()
from trl_guard.toy.model import PRETRAINED, PixelSpaceAutoencoder, load_toy_pipeline

pipe = load_toy_pipeline(PRETRAINED)
report["toy_vae"] = type(pipe.vae) is PixelSpaceAutoencoder
report["toy_loaded"] = filters()
json.dump(report, sys.stdout)
"""


def test_package_import_leaves_other_loggers_alone_and_does_not_export_the_toy_classes():
    """In a fresh interpreter: no logger outside trl_guard gains a filter from importing the package, the trainer or
    loading the toy pipeline; the two known notices those steps trigger are dropped all the same; the toy classes
    are not on the package root, and the toy pipeline loads from `trl_guard.toy.model` (its model_index.json)."""
    import json
    import subprocess
    import sys

    from trl_guard.toy.model import PRETRAINED

    if not os.path.exists(os.path.join(PRETRAINED, "model_index.json")):
        pytest.skip("toy model not trained in this checkout")
    result = subprocess.run(
        [sys.executable, "-c", PACKAGE_ROOT_PROBE], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(result.stdout)
    before = report["before"]
    assert any(filters == [] for filters in before.values())  # the probe saw the libraries' loggers
    for step in ("import", "trainer", "toy_loaded"):
        # loggers that existed keep their filters; the libraries' own loggers created since carry only their own
        assert {name: report[step][name] for name in before} == before, step
        ours = {name: f for name, f in report[step].items() if any(c.startswith("trl_guard") for c in f)}
        assert ours == {}, step
    assert report["toy_export"] == "module 'trl_guard' has no attribute 'PixelSpaceAutoencoder'"
    assert report["toy_vae"] is True
    assert "requires torchvision" not in result.stderr and "Expected types for vae" not in result.stderr
    with open(os.path.join(PRETRAINED, "model_index.json")) as f:
        assert json.load(f)["vae"] == ["trl_guard.toy.model", "PixelSpaceAutoencoder"]
