"""Z-Image and Z-Image-Turbo through the adapter, the trainer and the command line: sampling equals
`ZImagePipeline.__call__` with and without its CFG, the denoiser sees `1 - sigma` and unpadded captions and its output
is negated, training is exactly on-policy on its first pass and learns, resume mid-round is exact, the LoRA loads with
the pipeline, the shipped recipe trains, and the real checkpoint's widths sample, train and reload."""

import copy

import numpy as np
import pytest
import torch
from builders.zimage import ZIMAGE_REAL, build_real_width_zimage_pipeline, build_tiny_zimage_pipeline
from conftest import blueness
from diffusers import ZImagePipeline
from helpers import logged, lora_config, make_trainer, resume_mid_round
from safetensors.torch import load_file

from trl_guard.adapters import SamplingSettings, get_adapter
from trl_guard.adapters.zimage import ZImageAdapter
from trl_guard.losses import SDE_LOSS_TYPES
from trl_guard.rollout import sample_ode

PROMPTS = ["a red cat", "two blue dogs on a long green sofa"]  # different lengths: each caption is its own length
TURBO = dict(guidance_scale=0.0, max_sequence_length=64, peft_config=lora_config(target_modules=None))
BASE = dict(TURBO, guidance_scale=4.0)  # Z-Image (not Turbo) samples with CFG 4 in Flow-Factory's config


@pytest.fixture(scope="module")
def _base_zimage_pipeline():
    return build_tiny_zimage_pipeline(seed=0)


@pytest.fixture
def tiny_zimage_pipeline(_base_zimage_pipeline):
    return copy.deepcopy(_base_zimage_pipeline)


def configured(pipeline, guidance_scale=0.0, **settings) -> ZImageAdapter:
    adapter = get_adapter(pipeline)
    adapter.configure(SamplingSettings(32, 32, guidance_scale, max_sequence_length=64, **settings))
    return adapter


@pytest.mark.parametrize("guidance_scale", [0.0, 4.0])
def test_adapter_sampling_matches_the_pipeline(guidance_scale, tiny_zimage_pipeline):
    pipe = tiny_zimage_pipeline
    adapter = configured(pipe, guidance_scale)
    assert isinstance(adapter, ZImageAdapter) and adapter.uses_cfg == (guidance_scale > 0)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 16, 16)  # not packed: (C, H/2, W/2) for the tiny VAE
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents.clone(), adapter.sigmas(4))

    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_inference_steps=4, guidance_scale=guidance_scale, max_sequence_length=64)
    reference = pipe(list(PROMPTS), latents=latents.clone(), output_type="latent", **kwargs).images
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-5)
    ours = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in adapter.decode(final)])
    images = pipe(list(PROMPTS), latents=latents.clone(), output_type="np", **kwargs).images
    assert np.abs(ours - images).max() <= 1.5 / 255  # PIL's 8-bit rounding
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # the prompts reach the image


def test_denoiser_sees_one_minus_sigma_and_unpadded_captions_and_its_output_is_negated(tiny_zimage_pipeline):
    """One call: `t = 1 - sigma`, each caption as long as its prompt (the pipeline's own embeddings), and the
    velocity the negative of the transformer's output. Zero-padding a caption instead would change the output: the
    transformer attends to its own padding and places the image after it."""
    adapter = configured(tiny_zimage_pipeline)
    embeds = adapter.encode_prompts(PROMPTS)
    assert embeds.tensors["cap_feats"].shape[1] == 64
    captions, _ = tiny_zimage_pipeline.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert len(captions[0]) < len(captions[1]) < 64
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])
    seen = []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    with torch.no_grad():
        try:
            velocity = adapter.predict_velocity(latents, sigma, embeds, None)
        finally:
            hook.remove()
        torch.testing.assert_close(seen[0]["t"], 1 - sigma)
        for ours, theirs in zip(seen[0]["cap_feats"], captions):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        x = list(latents.unsqueeze(2).unbind(0))
        output = torch.stack(adapter.denoiser(x, 1 - sigma, captions, return_dict=False)[0]).squeeze(2)
        torch.testing.assert_close(velocity, -output, atol=1e-6, rtol=1e-6)
        padded = [torch.nn.functional.pad(c, (0, 0, 0, 64 - len(c))) for c in captions]
        with_padding = torch.stack(adapter.denoiser(x, 1 - sigma, padded, return_dict=False)[0]).squeeze(2)
    assert (with_padding - output).abs().max() > 1e-3


def test_cfg_is_one_doubled_forward_in_the_pipelines_form(tiny_zimage_pipeline):
    """guidance_scale g > 0: the prompts and the negative prompt in one forward, combined as `cond + g (cond -
    uncond)` (ZImagePipeline's form, the standard one at scale g + 1); g = 0 (Turbo): no negative branch."""
    adapter = configured(tiny_zimage_pipeline, guidance_scale=3.0)
    assert adapter.cfg_scale == 4.0
    prompts, negative = adapter.encode_prompts(PROMPTS), adapter.encode_prompts([""])
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    sigma = torch.full((2,), 0.6)
    sizes = []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(len(kwargs["x"])), with_kwargs=True
    )
    with torch.no_grad():
        try:
            guided = adapter.predict_velocity(latents, sigma, prompts, negative)
        finally:
            hook.remove()
        cond = adapter.forward(adapter.denoiser, latents, sigma, prompts)
        uncond = adapter.forward(adapter.denoiser, latents, sigma, negative.expand(2))
    assert sizes == [4]
    torch.testing.assert_close(guided, cond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert (guided - cond).abs().max() > 1e-3
    assert not configured(tiny_zimage_pipeline, guidance_scale=0.0).uses_cfg


def test_resolution_must_fit_the_patches(tiny_zimage_pipeline):
    with pytest.raises(ValueError, match="width=34 .* multiples of 4"):
        configured(tiny_zimage_pipeline).configure(SamplingSettings(32, 34))


@pytest.mark.parametrize(
    ("loss_type", "settings"), [(loss, TURBO) for loss in SDE_LOSS_TYPES] + [("grpo_guard", BASE), ("nft", TURBO)]
)
def test_first_pass_is_exactly_on_policy_and_training_learns(
    loss_type, settings, tiny_zimage_pipeline, prompts, tmp_path
):
    trainer = make_trainer(
        tiny_zimage_pipeline,
        [blueness],
        prompts,
        tmp_path,
        steps_per_generation=1,
        max_steps=2,
        loss_type=loss_type,
        **settings,
    )
    targets = set(trainer.adapter.denoiser.peft_config["default"].target_modules)
    assert targets == {"attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"} | {
        f"feed_forward.w{i}" for i in (1, 2, 3)
    }
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    # every block is adapted: the main layers and both refiners
    assert {n.split(".")[0] for n in before} == {"layers", "noise_refiner", "context_refiner"}
    batch_sizes = []
    hook = trainer.adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(len(kwargs["x"])), with_kwargs=True
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    # CFG doubles every call (sampling and training); Turbo's calls are the micro-batch alone
    assert set(batch_sizes) == ({16} if settings["guidance_scale"] > 0 else {8})
    assert logged(trainer, "reward") and all(np.isfinite(logged(trainer, "loss")))
    if loss_type != "nft":  # steps_per_generation=1: each pass is the first on its round
        for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
            values = logged(trainer, key)
            assert len(values) == 2 and all(v == 0.0 for v in values), (key, values)
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_is_exact(_base_zimage_pipeline, prompts, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(_base_zimage_pipeline), [blueness], prompts, tmp_path, **BASE)


def test_lora_loads_with_zimage_pipeline_and_reproduces_the_policy(_base_zimage_pipeline, prompts, tmp_path):
    folder = tmp_path / "model"
    _base_zimage_pipeline.save_pretrained(folder)
    trainer = make_trainer(str(folder), [blueness], prompts, tmp_path / "run", max_steps=2, **BASE)
    trainer.train()
    trainer.save_model()
    sample = dict(height=32, width=32, num_inference_steps=4, guidance_scale=4.0, max_sequence_length=64)
    trainer.pipeline.set_progress_bar_config(disable=True)
    trained = trainer.pipeline(
        "prompt number 1", generator=torch.Generator().manual_seed(0), output_type="np", **sample
    )
    fresh = ZImagePipeline.from_pretrained(folder)
    fresh.set_progress_bar_config(disable=True)
    base = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), output_type="np", **sample).images
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), output_type="np", **sample).images
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained.images, atol=1e-5)


def test_trains_from_the_command_line_with_the_shipped_recipe(_base_zimage_pipeline, tmp_path):
    """The shipped Z-Image-Turbo recipe trains; only the model, the prompts, the reward and the sizes change."""
    from trl_guard.scripts.grpo import main as grpo_main

    model_dir = tmp_path / "model"
    _base_zimage_pipeline.save_pretrained(model_dir)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(f"prompt number {i}" for i in range(4)))
    trainer = grpo_main(
        [
            "--config", "examples/recipes/zimage_guard.yaml",
            "--model_name_or_path", str(model_dir),
            "--model_init_kwargs", "{}",
            "--dataset_name", str(data), "--eval_dataset_name", str(data), "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.blueness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_inference_steps", "4", "--max_sequence_length", "64",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.pipeline, ZImagePipeline)
    assert trainer.args.guidance_scale == 0.0 and not trainer.adapter.uses_cfg  # Turbo: no CFG
    assert trainer.args.sde_window_size == 1
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("feed_forward.w2.lora_A" in key for key in lora)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the reloaded LoRA is a second adapter
def test_real_width_samples_trains_and_reloads(prompts, tmp_path):
    """Z-Image-Turbo's real widths (3840-wide blocks of 30 heads, Qwen3-4B's 2560-wide text, the 16-channel VAE) with
    one block of each kind: sample 2 steps, train one step with LoRA on the default targets, save, and reload the
    LoRA through `ZImagePipeline.load_lora_weights` into the same pipeline as a second adapter: it gives the trained
    policy's velocity."""
    pipe = build_real_width_zimage_pipeline(seed=0)
    assert pipe.transformer.config.dim == ZIMAGE_REAL["transformer"]["dim"] == 3840
    assert pipe.text_encoder.config.hidden_size == ZIMAGE_REAL["transformer"]["cap_feat_dim"]
    trainer = make_trainer(
        pipe,
        [blueness],
        prompts.select(range(2)),
        tmp_path / "run",
        num_generations=2,
        per_device_train_batch_size=2,
        steps_per_generation=1,
        max_steps=1,
        num_inference_steps=2,
        timestep_fraction=0.5,  # train the first of the 2 steps
        max_sequence_length=16,
        learning_rate=1e-3,
        **{k: v for k, v in TURBO.items() if k != "max_sequence_length"},
    )
    adapter = trainer.adapter
    assert adapter.latent_shape() == (16, 4, 4)  # 32 px through the 8x VAE
    trainer.train()
    assert logged(trainer, "log_ratio_mean") == [0.0] and np.isfinite(logged(trainer, "loss")[0])
    trainer.save_model()

    embeds = adapter.encode_prompts(["prompt number 0"])
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8])
    lora_b = [p for n, p in adapter.denoiser.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # the step moved the LoRA (its B matrices start at zero)
    with torch.no_grad():
        trained = adapter.predict_velocity(latents, sigma, embeds, None)
        pipe.load_lora_weights(str(tmp_path / "run"), adapter_name="reloaded")
        pipe.set_adapters("reloaded")
        reloaded = adapter.predict_velocity(latents, sigma, embeds, None)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
