"""Each adapter reproduces its family's own pipeline: ODE sampling through the adapter matches `pipe(...)`."""

import numpy as np
import pytest
import torch

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


def test_flux_resolution_must_pack():
    from trl_guard.testing import build_tiny_flux_pipeline

    adapter = get_adapter(build_tiny_flux_pipeline())
    with pytest.raises(ValueError, match="width=30"):
        adapter.configure(SamplingSettings(32, 30))


def test_a_new_family_registers_by_subclassing():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trl_guard.adapters import ADAPTERS, PipelineAdapter

    class MyPipeline:
        scheduler = FlowMatchEulerDiscreteScheduler()

    class MyAdapter(PipelineAdapter):
        pipeline_classes = ("MyPipeline",)

    try:
        assert isinstance(get_adapter(MyPipeline()), MyAdapter)
    finally:
        ADAPTERS.remove(MyAdapter)
    with pytest.raises(ValueError, match="FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline"):
        get_adapter(MyPipeline())
