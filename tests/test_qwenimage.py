"""Qwen-Image through the adapter and the trainer: sampling equals `QwenImagePipeline.__call__` (with and without its
norm-rescaled true CFG), training is exactly on-policy on its first pass, and the LoRA loads with the pipeline."""

import copy

import numpy as np
import pytest
import torch
from conftest import blueness
from diffusers import QwenImagePipeline
from helpers import guided_and_branches, logged, make_trainer

from trl_guard.adapters import QwenImageAdapter, SamplingSettings, get_adapter
from trl_guard.losses import SDE_LOSS_TYPES
from trl_guard.rollout import sample_ode
from trl_guard.testing import build_tiny_qwenimage_pipeline

PROMPTS = ["a red cat", "two blue dogs on a long green sofa"]  # different token counts: the padding mask matters
#: Flow-GRPO's Qwen-Image sampling: true CFG 4 against a one-space negative prompt (scripts/train_qwenimage.py).
QWEN = dict(true_cfg_scale=4.0, negative_prompt=" ", num_inference_steps=3)


@pytest.fixture(scope="module")
def _base_qwenimage_pipeline():
    return build_tiny_qwenimage_pipeline(seed=0)


@pytest.fixture
def tiny_qwenimage_pipeline(_base_qwenimage_pipeline):
    return copy.deepcopy(_base_qwenimage_pipeline)


@pytest.fixture(scope="module")
def tiny_qwenimage_pipeline_dir(_base_qwenimage_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwenimage")
    _base_qwenimage_pipeline.save_pretrained(path)
    return str(path)


def test_tiny_tokenizer_drops_exactly_the_template_prefix(tiny_qwenimage_pipeline):
    pipe = tiny_qwenimage_pipeline
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_adapter_sampling_matches_the_pipeline(true_cfg_scale, tiny_qwenimage_pipeline):
    pipe = tiny_qwenimage_pipeline
    adapter = get_adapter(pipe)
    assert isinstance(adapter, QwenImageAdapter)
    adapter.configure(SamplingSettings(32, 32, true_cfg_scale=true_cfg_scale, max_sequence_length=16))
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    negative = adapter.encode_prompts([" "]) if adapter.uses_cfg else None
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents, adapter.sigmas(4))
    ours = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in adapter.decode(final)])

    kwargs = dict(height=32, width=32, num_inference_steps=4, max_sequence_length=16, true_cfg_scale=true_cfg_scale)
    if true_cfg_scale > 1:
        kwargs["negative_prompt"] = " "
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPTS, latents=latents.clone(), output_type="np", **kwargs).images
    assert np.abs(ours - reference).max() <= 1.5 / 255  # PIL's 8-bit rounding
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # the prompts reach the image


def test_true_cfg_is_one_doubled_forward_rescaled_as_the_pipeline(tiny_qwenimage_pipeline):
    """With true CFG the denoiser runs once on the negative and the prompts side by side; the velocity is
    `neg + s * (pos - neg)` of the two velocities each computed on its own, rescaled token by token to the norm of
    `pos`, as QwenImagePipeline combines them."""
    adapter = get_adapter(tiny_qwenimage_pipeline)
    adapter.configure(SamplingSettings(32, 32, true_cfg_scale=4.0, max_sequence_length=16))
    guided, cond, uncond, batch_sizes = guided_and_branches(adapter, PROMPTS, " ")
    assert batch_sizes == [4]
    combined = uncond + 4.0 * (cond - uncond)
    expected = combined * cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    assert (guided - cond).abs().max() > 1e-3  # the negative prompt moved the velocity


def test_padding_is_exact_and_trimmed(tiny_qwenimage_pipeline):
    """Embeddings padded to max_sequence_length give the velocity of the pipeline's own (shorter) embeddings."""
    adapter = get_adapter(tiny_qwenimage_pipeline)
    adapter.configure(SamplingSettings(32, 32, max_sequence_length=64))
    padded = adapter.encode_prompts(PROMPTS)
    assert padded.tensors["encoder_hidden_states"].shape[1] == 64
    embeds, mask = tiny_qwenimage_pipeline.encode_prompt(PROMPTS, max_sequence_length=64)
    assert mask is not None and embeds.shape[1] < 64
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        ours = adapter.predict_velocity(latents, sigma, padded, None)
        reference = adapter.denoiser(
            hidden_states=latents,
            timestep=sigma,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiple", [3, 4])
def test_context_parallel_keeps_the_trimmed_text_a_multiple_of_the_degree(multiple, tiny_qwenimage_pipeline):
    """Under context parallelism diffusers splits Qwen-Image's text tokens in equal parts: the trimmed text stays a
    multiple of the degree (padding columns, masked), and the velocity is the same as without."""
    adapter = get_adapter(tiny_qwenimage_pipeline)
    lengths = []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    velocities = []
    for sequence_multiple in (1, multiple):
        # 60: a multiple of both degrees, as check_settings requires where the text is split
        adapter.configure(SamplingSettings(32, 32, max_sequence_length=60, sequence_multiple=sequence_multiple))
        embeddings = adapter.encode_prompts(PROMPTS)
        latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            velocities.append(adapter.predict_velocity(latents, torch.full((2,), 0.7), embeddings, None))
    hook.remove()
    assert lengths[0] % multiple != 0  # the trim alone would not divide
    assert lengths[1] % multiple == 0 and lengths[1] - lengths[0] < multiple
    torch.testing.assert_close(velocities[1], velocities[0], atol=1e-5, rtol=1e-5)


def test_cached_prompts_of_different_lengths_concatenate(tiny_qwenimage_pipeline):
    """The prompt cache stores one row per prompt and concatenates them: every prompt has the same padded length."""
    from trl_guard.conditioning import PromptEncoder

    adapter = get_adapter(tiny_qwenimage_pipeline)
    adapter.configure(SamplingSettings(32, 32, max_sequence_length=16))
    encoder = PromptEncoder(adapter, torch.device("cpu"))
    encoder.precompute([PROMPTS[1], PROMPTS[0]], batch_size=1)
    cached, _ = encoder(PROMPTS)
    batched = adapter.encode_prompts(PROMPTS)
    for key, tensor in batched.tensors.items():
        torch.testing.assert_close(cached.tensors[key], tensor, atol=1e-5, rtol=1e-5)


def test_resolution_must_pack(tiny_qwenimage_pipeline):
    with pytest.raises(ValueError, match="width=36"):
        get_adapter(tiny_qwenimage_pipeline).configure(SamplingSettings(32, 36))


@pytest.mark.parametrize("loss_type", SDE_LOSS_TYPES)
def test_first_pass_is_exactly_on_policy_and_training_learns(loss_type, tiny_qwenimage_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_qwenimage_pipeline,
        [blueness],
        prompts,
        tmp_path,
        steps_per_generation=1,
        max_steps=2,
        loss_type=loss_type,
        **QWEN,
    )
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    negative = trainer.adapter.encode_prompts([" "]).tensors["encoder_hidden_states"]
    calls = []
    hook = trainer.adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((torch.is_grad_enabled(), kwargs["encoder_hidden_states"].detach())),
        with_kwargs=True,
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    # true CFG in sampling (no grad) and training (grad): every call is the negative prompt, then the prompts (the
    # text trimmed to the longest prompt of the call)
    assert {grad for grad, _ in calls} == {False, True}
    for _, text in calls:
        uncond, cond = text.chunk(2)
        trimmed = negative[:, : text.shape[1]]
        assert len(uncond) == len(cond) and torch.equal(uncond, trimmed.expand_as(uncond))
        assert not torch.equal(cond, trimmed.expand_as(cond))
    assert logged(trainer, "reward") and all(np.isfinite(logged(trainer, "loss")))
    # steps_per_generation=1: every optimizer step trains on a fresh round, so each pass is the first one
    for key in ("raw_log_ratio_mean", "log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        values = logged(trainer, key)
        assert len(values) == 2 and all(v == 0.0 for v in values), (key, values)
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_lora_defaults_to_flow_grpo_qwen_targets(tiny_qwenimage_pipeline, prompts, tmp_path):
    from helpers import lora_config

    trainer = make_trainer(
        tiny_qwenimage_pipeline, [blueness], prompts, tmp_path, peft_config=lora_config(target_modules=None), **QWEN
    )
    targets = set(trainer.adapter.denoiser.peft_config["default"].target_modules)
    assert {"attn.to_q", "attn.add_q_proj", "img_mlp.net.2", "txt_mlp.net.0.proj"} <= targets


def test_lora_loads_with_qwenimage_pipeline_and_changes_output(tiny_qwenimage_pipeline_dir, prompts, tmp_path):
    trainer = make_trainer(tiny_qwenimage_pipeline_dir, [blueness], prompts, tmp_path / "run", max_steps=2, **QWEN)
    trainer.train()
    trainer.save_model()
    sample = dict(
        height=32,
        width=32,
        num_inference_steps=3,
        true_cfg_scale=4.0,
        negative_prompt=" ",
        max_sequence_length=16,
        output_type="np",
    )
    trainer.pipeline.set_progress_bar_config(disable=True)
    trained = trainer.pipeline("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images

    fresh = QwenImagePipeline.from_pretrained(tiny_qwenimage_pipeline_dir)
    fresh.set_progress_bar_config(disable=True)
    base = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)
