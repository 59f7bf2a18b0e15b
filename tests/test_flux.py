"""FLUX.1 through the same trainer: every loss type, DanceGRPO semantics, LoRA that FluxPipeline loads."""

import copy

import numpy as np
import pytest
import torch
from conftest import blueness
from diffusers import FluxPipeline
from helpers import logged, lora_config, make_trainer

from trl_guard.losses import SDE_LOSS_TYPES
from trl_guard.seeding import Stream

FLUX = dict(noise_schedule="dance_grpo", guidance_scale=3.5, init_same_noise=True)


@pytest.mark.parametrize("loss_type", SDE_LOSS_TYPES)
def test_flux_end_to_end_per_loss_type(loss_type, tiny_flux_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_flux_pipeline, [blueness], prompts, tmp_path, loss_type=loss_type, **FLUX)
    trainer.train()
    assert logged(trainer, "reward") and all(np.isfinite(logged(trainer, "loss")))
    assert logged(trainer, "timestep/03/grad_norm")


def test_flux_first_pass_ratio_is_exactly_one(tiny_flux_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_flux_pipeline,
        [blueness],
        prompts,
        tmp_path,
        steps_per_generation=1,
        max_steps=2,
        loss_type="flow_grpo",
        **FLUX,
    )
    trainer.train()
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        assert all(v == 0.0 for v in logged(trainer, key)), key


def test_init_same_noise_is_shared_within_groups_only(tiny_flux_pipeline, _base_flux_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_flux_pipeline, [blueness], prompts, tmp_path, **FLUX)
    latents = trainer._initial_latents(list(range(16)), Stream.INIT_NOISE, rollout_index=0)
    groups = latents.view(4, 4, *latents.shape[1:])
    for g in range(4):
        assert all(torch.equal(groups[g, 0], groups[g, i]) for i in range(4))
    assert all(not torch.equal(groups[a, 0], groups[b, 0]) for a in range(4) for b in range(a + 1, 4))
    other_round = trainer._initial_latents(list(range(16)), Stream.INIT_NOISE, rollout_index=1)
    assert not torch.equal(other_round[0], latents[0])

    independent = make_trainer(
        copy.deepcopy(_base_flux_pipeline), [blueness], prompts, tmp_path, **{**FLUX, "init_same_noise": False}
    )
    latents = independent._initial_latents(list(range(4)), Stream.INIT_NOISE, rollout_index=0)
    assert not torch.equal(latents[0], latents[1])


def test_flux_lora_loads_with_flux_pipeline_and_changes_output(tiny_flux_pipeline_dir, prompts, tmp_path):
    trainer = make_trainer(tiny_flux_pipeline_dir, [blueness], prompts, tmp_path / "run", max_steps=4, **FLUX)
    trainer.train()
    trainer.save_model()
    sample = dict(
        height=32, width=32, num_inference_steps=4, guidance_scale=3.5, max_sequence_length=16, output_type="np"
    )
    trained = trainer.pipeline("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images

    fresh = FluxPipeline.from_pretrained(tiny_flux_pipeline_dir)
    base = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


def test_flux_full_finetuning_and_true_cfg(tiny_flux_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_flux_pipeline,
        [blueness],
        prompts,
        tmp_path,
        peft_config=None,
        learning_rate=1e-3,
        true_cfg_scale=2.0,
        negative_prompt="blurry",
        max_steps=1,
        **FLUX,
    )
    before = trainer.adapter.denoiser.proj_out.weight.detach().clone()
    negative = trainer.adapter.encode_prompts(["blurry"]).tensors["encoder_hidden_states"]
    calls = record_text_conditioning(trainer.adapter.denoiser, trainer.train)
    # true CFG in sampling (no grad) and training (grad): every call is the negative prompt, then the prompts
    assert {grad for grad, _ in calls} == {False, True}
    for _, text in calls:
        uncond, cond = text.chunk(2)
        assert len(uncond) == len(cond) and torch.equal(uncond, negative.expand_as(uncond))
        assert not torch.equal(cond, negative.expand_as(cond))
    assert not torch.equal(before, trainer.adapter.denoiser.proj_out.weight)


def record_text_conditioning(denoiser, run) -> list[tuple[bool, torch.Tensor]]:
    """Call `run()` and return, for every call of `denoiser` meanwhile, whether gradients were on and the text
    conditioning (`encoder_hidden_states`) it got."""
    calls = []
    hook = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((torch.is_grad_enabled(), kwargs["encoder_hidden_states"].detach())),
        with_kwargs=True,
    )
    try:
        run()
    finally:
        hook.remove()
    return calls


def test_lora_default_targets_come_from_the_family(tiny_flux_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_flux_pipeline, [blueness], prompts, tmp_path, peft_config=lora_config(target_modules=None), **FLUX
    )
    targets = set(trainer.adapter.denoiser.peft_config["default"].target_modules)
    assert {"attn.to_q", "attn.add_q_proj"} <= targets
