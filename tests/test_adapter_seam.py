"""The adapter seam: a model family is one adapter file plus one registration line.

The registry is the import list of `trl_guard/adapters/__init__.py`; every file a run writes is named by the adapter
(`save_full`, `save_lora`, `saved_model_files`), and what `checkpoints` moves aside or refuses to overwrite is derived
from the registered adapters; per-sample guidance is a function of its arguments; the copies of `load_lora`, of the
packed-latents helpers and of Wan's checks are folded into one; no adapter calls a pipeline's private method."""

import copy
import os
import pkgutil

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, WanTransformer3DModel
from helpers import lora_config

import trl_guard.adapters as adapters_package
from trl_guard import checkpoints
from trl_guard.adapters import (
    ADAPTERS,
    PipelineAdapter,
    SamplingSettings,
    SD3Adapter,
    Wan22Adapter,
    WanAdapter,
    ZImageAdapter,
    get_adapter,
    register,
)
from trl_guard.adapters.base import PackedLatentsMixin
from trl_guard.adapters.wan22 import LORA_WEIGHT_NAMES
from trl_guard.testing.wan22 import build_tiny_wan22_pipeline

WAN22_SETTINGS = SamplingSettings(32, 32, guidance_scale=4.0, guidance_scale_2=3.0, num_frames=5)


@pytest.fixture(scope="module")
def _base_wan22_pipeline():
    return build_tiny_wan22_pipeline(seed=0)


@pytest.fixture
def wan22_pipeline(_base_wan22_pipeline):
    return copy.deepcopy(_base_wan22_pipeline)


@pytest.fixture
def registered_unet_family():
    """A made-up family whose denoiser is a pipeline's `unet`, registered for the test's duration."""

    @register
    class UNetAdapter(PipelineAdapter):
        pipeline_classes = ("MadeUpUNetPipeline",)
        denoiser_components = ("unet",)
        lora_weight_names = {"unet": "unet_lora.safetensors"}

    try:
        yield UNetAdapter
    finally:
        ADAPTERS.remove(UNetAdapter)


# ---- the registry -------------------------------------------------------------------------------------------------
def test_the_import_list_is_the_one_registry():
    """Every adapter module of the package is imported by `adapters/__init__.py` and registers its classes there, once
    and in import order; subclassing alone registers nothing (a test's or an intermediate class stays out)."""
    modules = {m.name for m in pkgutil.iter_modules(adapters_package.__path__)} - {"base"}
    registered_modules = {cls.__module__.rsplit(".", 1)[1] for cls in ADAPTERS}
    assert registered_modules == modules
    assert len(ADAPTERS) == len(set(ADAPTERS))
    assert all(getattr(adapters_package, cls.__name__) is cls for cls in ADAPTERS)

    class Unregistered(SD3Adapter):
        pipeline_classes = ("SomeOtherPipeline",)

    assert Unregistered not in ADAPTERS
    with pytest.raises(ValueError, match="names no pipeline_classes"):
        register(type("NoPipelines", (PipelineAdapter,), {}))


# ---- save_full and the files a run holds --------------------------------------------------------------------------
def test_save_full_round_trip_for_an_image_family(tiny_pipeline, tmp_path):
    """The full denoiser goes into the folder its adapter names, loads with diffusers' own `from_pretrained`, and
    `full_weights` reads back the same state; a gathered `state_dict` (the FSDP path) is what gets written then."""
    adapter = get_adapter(tiny_pipeline)
    assert adapter.saved_model_files() == ("pytorch_lora_weights.safetensors", "transformer")
    adapter.save_full(tmp_path / "live")
    expected = adapter.denoiser.state_dict()
    saved = SD3Transformer2DModel.from_pretrained(tmp_path / "live", subfolder="transformer").state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    read = adapter.full_weights(tmp_path / "live")
    assert read.keys() == expected.keys() and all(torch.equal(read[k], expected[k]) for k in expected)

    gathered = {k: v + 1 for k, v in expected.items()}
    adapter.save_full(tmp_path / "gathered", state_dict=gathered)
    read = adapter.full_weights(tmp_path / "gathered")
    assert all(torch.equal(read[k], gathered[k]) for k in gathered)
    assert 'subfolder="transformer"' in adapter.full_load_code("me/run")


def test_save_full_round_trip_for_wan22s_two_experts(wan22_pipeline, tmp_path):
    """Each expert into the pipeline component's own folder (`transformer/`, `transformer_2/`), each loading with
    `WanTransformer3DModel.from_pretrained`; `full_weights` keys them as the two-expert module's state, and a gathered
    state dict is split between the folders."""
    adapter = get_adapter(wan22_pipeline)
    assert isinstance(adapter, Wan22Adapter)
    assert set(adapter.saved_model_files()) == {*LORA_WEIGHT_NAMES.values(), "transformer", "transformer_2"}
    adapter.save_full(tmp_path / "live")
    for name in ("transformer", "transformer_2"):
        saved = WanTransformer3DModel.from_pretrained(tmp_path / "live", subfolder=name).state_dict()
        expert = getattr(wan22_pipeline, name).state_dict()
        assert all(torch.equal(saved[k], expert[k]) for k in expert), name
    expected = adapter.denoiser.state_dict()
    read = adapter.full_weights(tmp_path / "live")
    assert read.keys() == expected.keys() and all(torch.equal(read[k], expected[k]) for k in expected)

    gathered = {k: v * 2 if k.startswith("transformer_2.") else v for k, v in expected.items()}
    adapter.save_full(tmp_path / "gathered", state_dict=gathered)
    read = adapter.full_weights(tmp_path / "gathered")
    assert all(torch.equal(read[k], gathered[k]) for k in gathered)
    load = adapter.full_load_code("me/run")
    assert 'subfolder="transformer"' in load and 'subfolder="transformer_2"' in load


def test_what_a_run_leaves_is_read_from_the_registered_adapters(registered_unet_family, tmp_path):
    """`move_previous_run` (which needs no pipeline: the union over the registry) moves a registered family's model
    files aside, and a fresh run refuses to overwrite them, without either naming the family's files itself."""
    for adapter in ADAPTERS:
        assert set(adapter.saved_model_files()) <= set(checkpoints.run_outputs()), adapter
    assert os.path.join("unet", "config.json") in checkpoints.final_model_files()

    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    (run / "unet" / "config.json").write_text("{}")
    (run / "unet_lora.safetensors").write_text("")
    with pytest.raises(ValueError, match="unet"):
        checkpoints.check_no_finished_run(str(run), overwrite_output_dir=False)
    aside = checkpoints.move_previous_run(str(run))
    assert sorted(os.listdir(aside)) == ["unet", "unet_lora.safetensors"]
    assert os.listdir(run) == [os.path.basename(aside)]


# ---- Wan2.2 is a proper WanAdapter --------------------------------------------------------------------------------
def test_wan22_runs_wans_init_and_checks(wan22_pipeline, monkeypatch):
    calls = []
    original = WanAdapter.__init__

    def spy(self, pipeline):
        calls.append(type(self))
        original(self, pipeline)

    monkeypatch.setattr(WanAdapter, "__init__", spy)
    adapter = get_adapter(wan22_pipeline)
    assert calls == [Wan22Adapter] and adapter._integer_timesteps is False
    wan22_pipeline.register_to_config(expand_timesteps=True)  # refused by WanAdapter's one check, for both families
    with pytest.raises(NotImplementedError, match="expand_timesteps"):
        Wan22Adapter(wan22_pipeline)


# ---- guidance without state ---------------------------------------------------------------------------------------
def test_per_sample_guidance_is_a_function_of_its_arguments(wan22_pipeline):
    """Wan2.2's per-expert scales come from `sigma`, an argument, not from state set around `predict_velocity`: the
    combination can be called on its own, and a batch straddling the boundary gets each expert's scale."""
    adapter = get_adapter(wan22_pipeline)
    adapter.configure(WAN22_SETTINGS)
    before = dict(vars(adapter))
    generator = torch.Generator().manual_seed(0)
    uncond, cond = (torch.randn(2, 4, 2, 4, 4, generator=generator) for _ in range(2))
    sigma = torch.tensor([0.95, 0.3])  # timesteps 950 (high-noise expert) and 300 (low-noise), boundary at 875
    guided = adapter.combine_guidance(uncond, cond, sigma)
    torch.testing.assert_close(guided[0], uncond[0] + 4.0 * (cond[0] - uncond[0]), rtol=0, atol=0)
    torch.testing.assert_close(guided[1], uncond[1] + 3.0 * (cond[1] - uncond[1]), rtol=0, atol=0)

    latents = torch.randn(2, *adapter.latent_shape(), generator=generator)
    embeds = adapter.encode_prompts(["a red cat", "two blue dogs"])
    with torch.no_grad():
        adapter.predict_velocity(latents, sigma, embeds, adapter.encode_prompts([""]))
    assert vars(adapter).keys() == before.keys()  # nothing set by the call, nothing left behind


# ---- one copy of load_lora and of the packed-latents helpers ------------------------------------------------------
def test_load_lora_is_one_method_and_restores_both_wan22_experts(wan22_pipeline, tmp_path):
    assert all("load_lora" not in vars(cls) and "save_lora" not in vars(cls) for cls in ADAPTERS)
    adapter = get_adapter(wan22_pipeline)
    adapter.add_lora(lora_config(target_modules=None))
    with torch.no_grad():
        for parameter in adapter.denoiser.parameters():
            if parameter.requires_grad:
                parameter.normal_()
    saved = {k: v.clone() for k, v in adapter.lora_state_dict().items()}
    adapter.save_lora(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(LORA_WEIGHT_NAMES.values())
    with torch.no_grad():
        for parameter in adapter.denoiser.parameters():
            if parameter.requires_grad:
                parameter.zero_()
    adapter.load_lora(tmp_path)
    restored = adapter.lora_state_dict()
    assert {k.split(".")[0] for k in restored} == {"transformer", "transformer_2"}
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    os.remove(tmp_path / LORA_WEIGHT_NAMES["transformer_2"])
    with pytest.raises(FileNotFoundError, match="transformer_2"):
        adapter.load_lora(tmp_path)


def test_zimage_takes_the_packed_latents_helpers_from_the_one_mixin():
    """Z-Image's latent grid, resolution check and token-count-shifted schedule were a copy of the mixin's; no family
    on the mixin redefines its grid or its check (FLUX.2 keeps its own, step-dependent, schedule)."""
    assert issubclass(ZImageAdapter, PackedLatentsMixin) and "sigmas" not in vars(ZImageAdapter)
    on_mixin = [cls for cls in ADAPTERS if issubclass(cls, PackedLatentsMixin)]
    assert all(name not in vars(cls) for cls in on_mixin for name in ("_latent_hw", "check_resolution"))


# ---- no pipeline-private methods ----------------------------------------------------------------------------------
def test_flux2_unpacks_latents_itself_as_the_pipelines_private_unpatchify_does(monkeypatch):
    """FLUX.2's decode un-normalises the tokens and unpacks them with our own reshaping: equal to the pipeline's
    `_unpatchify_latents` of its token grid, and decoding never calls that private method."""
    from builders.flux2 import build_tiny_flux2_pipeline

    pipe = build_tiny_flux2_pipeline(seed=0)
    adapter = get_adapter(pipe)
    adapter.configure(SamplingSettings(32, 24))  # not square: rows and columns must not swap
    tokens = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    h, w = adapter._latent_hw
    grid = tokens.transpose(1, 2).reshape(2, tokens.shape[2], h // 2, w // 2)  # the pipeline's token grid
    torch.testing.assert_close(adapter.unpack(tokens), pipe._unpatchify_latents(grid), rtol=0, atol=0)

    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)
    with torch.no_grad():
        reference = vae.decode(pipe._unpatchify_latents(grid * std + mean), return_dict=False)[0]
    expected = pipe.image_processor.postprocess(reference, output_type="pil")

    def private(*args, **kwargs):
        raise AssertionError("the adapter called the pipeline's private _unpatchify_latents")

    monkeypatch.setattr(pipe, "_unpatchify_latents", private)
    images = adapter.decode(tokens)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected, strict=True))
