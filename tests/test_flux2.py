"""FLUX.2 [dev] and FLUX.2 [klein] through the adapter, the trainer and the command line: sampling equals
`Flux2Pipeline.__call__` / `Flux2KleinPipeline.__call__` (guidance embedding; klein's CFG, and its step-distilled
variant that ignores it), training is exactly on-policy on its first pass and resumes exactly, the LoRA loads with the
pipelines' own `load_lora_weights`, the shipped recipes train from the command line, and the real checkpoints' widths
(FLUX.2-klein-4B, FLUX.2-dev; layer counts cut) sample, train one step and reload their LoRA."""

import copy
import gc
import inspect
import warnings

import numpy as np
import pytest
import torch
from builders.flux2 import (
    FAMILIES,
    build_real_width_flux2_pipeline,
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
)
from conftest import blueness
from datasets import Dataset
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from helpers import logged, lora_config, make_trainer, resume_mid_round
from safetensors.torch import load_file

from trl_guard.adapters import SamplingSettings, get_adapter
from trl_guard.adapters.flux2 import FLUX2_LORA_TARGETS, Flux2Adapter, Flux2KleinAdapter
from trl_guard.rollout import sample_ode

PROMPTS = ["a red cat", "two blue dogs on a long green sofa"]
PIPELINES = {"dev": Flux2Pipeline, "klein": Flux2KleinPipeline}


def family_settings() -> dict:
    """guidance_scale 4: [dev]'s guidance embedding (no CFG), [klein] base's CFG against the empty prompt; the default
    LoRA targets (a fresh config each time: `add_lora` fills in its targets)."""
    return dict(guidance_scale=4.0, peft_config=lora_config(target_modules=None))


@pytest.fixture(scope="module")
def base_pipelines():
    return {"dev": build_tiny_flux2_pipeline(seed=0), "klein": build_tiny_flux2_klein_pipeline(seed=0)}


@pytest.fixture(scope="module")
def pipeline_dirs(base_pipelines, tmp_path_factory):
    dirs = {}
    for name, pipe in base_pipelines.items():
        dirs[name] = str(tmp_path_factory.mktemp(f"tiny-flux2-{name}"))
        pipe.save_pretrained(dirs[name])
    return dirs


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


def unpacked(latents: torch.Tensor, size: int, vae_factor: int = 2) -> torch.Tensor:
    """Our packed tokens as the pipelines' `latents` argument: the (B, 4C, h, w) patch grid they draw and pack."""
    side = size // (2 * vae_factor)
    return latents.transpose(1, 2).reshape(len(latents), -1, side, side)


@pytest.mark.parametrize(
    ("family", "guidance_scale", "distilled"),
    [("dev", 4.0, False), ("klein", 1.0, False), ("klein", 4.0, False), ("klein", 4.0, True)],
    ids=["dev-guidance-embedding", "klein-no-cfg", "klein-cfg", "klein-distilled-ignores-cfg"],
)
def test_adapter_sampling_matches_the_pipeline(base_pipelines, family, guidance_scale, distilled):
    pipe = copy.deepcopy(base_pipelines[family])
    if distilled:
        pipe.register_to_config(is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    adapter = get_adapter(pipe)
    assert type(adapter) is (Flux2Adapter if family == "dev" else Flux2KleinAdapter)
    settings = SamplingSettings(32, 32, guidance_scale, max_sequence_length=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter.configure(settings)
    assert any("is ignored" in str(w.message) for w in caught) == distilled
    assert adapter.uses_cfg == (family == "klein" and guidance_scale > 1 and not distilled)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 64, 8)  # 8 x 8 tokens of 2 channels x a 2x2 patch
    text = adapter.encode_prompts(PROMPTS)
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    final = sample_ode(adapter, text, negative, latents.clone(), adapter.sigmas(4))

    call = dict(prompt=PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=guidance_scale)
    call.update(max_sequence_length=16, latents=unpacked(latents, 32))
    reference = pipe(**call, output_type="np").images
    assert reference.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(pixels(adapter.decode(final)), reference, atol=1.5 / 255)  # PIL's 8-bit rounding
    if family == "dev":  # Flux2Pipeline returns the packed tokens themselves
        torch.testing.assert_close(final, pipe(**call, output_type="latent").images, rtol=0, atol=1e-5)

    # The guidance is not decoration: a different guidance embedding, or CFG off, samples something else (the
    # tiny random transformer reads its text weakly: the change is ~1e-3 against float32 noise of ~1e-7).
    if family == "dev":
        adapter.configure(SamplingSettings(32, 32, 1.0, max_sequence_length=16))
        other = sample_ode(adapter, text, None, latents.clone(), adapter.sigmas(4))
    else:
        other = sample_ode(adapter, text, None, latents.clone(), adapter.sigmas(4))  # no negative: no CFG
    change = (other - final).abs().mean() / final.abs().mean()
    assert (change > 1e-4) == (family == "dev" or adapter.uses_cfg)


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_prompt_embeddings_have_one_length_and_do_not_depend_on_the_batch(base_pipelines, family):
    """Every prompt is padded to `max_sequence_length` and the padding is attended to (no mask reaches the
    transformer): embeddings of different prompts concatenate, and a prompt cached alone equals it in a batch."""
    adapter = get_adapter(copy.deepcopy(base_pipelines[family]))
    adapter.configure(SamplingSettings(32, 32, max_sequence_length=24))
    batch = adapter.encode_prompts(PROMPTS).tensors["encoder_hidden_states"]
    assert batch.shape == (2, 24, 3 * 16)  # three stacked hidden layers of the 16-wide text encoder
    alone = adapter.encode_prompts(PROMPTS[1:]).tensors["encoder_hidden_states"]
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])
    # the layers stacked are the pipeline's defaults, which the tiny text encoders are deep enough to have
    default = inspect.signature(adapter.pipeline.encode_prompt).parameters["text_encoder_out_layers"].default
    assert adapter.text_encoder_out_layers == default == ((10, 20, 30) if family == "dev" else (9, 18, 27))


def test_guidance_settings_the_pipelines_have_no_counterpart_for_are_refused(base_pipelines):
    dev, klein = (get_adapter(copy.deepcopy(base_pipelines[name])) for name in ("dev", "klein"))
    with pytest.raises(ValueError, match=r"true_cfg_scale=2.0, but Flux2Pipeline has no real classifier-free"):
        dev.configure(SamplingSettings(32, 32, 4.0, true_cfg_scale=2.0))
    with pytest.raises(ValueError, match=r"Flux2KleinPipeline's classifier-free guidance is guidance_scale"):
        klein.configure(SamplingSettings(32, 32, 4.0, true_cfg_scale=2.0))
    with pytest.raises(ValueError, match=r"width=30 does not fit FLUX.2 .* for example, 28"):
        klein.configure(SamplingSettings(32, 30))  # the tiny VAE's factor 2, x 2 for the patches
    # [dev] hands guidance_scale to the guidance embedding; [klein] passes none (its guidance_scale is CFG)
    seen = {}
    for name, adapter in (("dev", dev), ("klein", klein)):
        adapter.configure(SamplingSettings(32, 32, 3.5, max_sequence_length=16))
        hook = adapter.denoiser.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: seen.update({name: kwargs["guidance"]}), with_kwargs=True
        )
        latents = torch.zeros(2, *adapter.latent_shape())
        adapter.forward(adapter.denoiser, latents, torch.full((2,), 0.5), adapter.encode_prompts(PROMPTS))
        hook.remove()
    assert torch.equal(seen["dev"], torch.full((2,), 3.5)) and seen["klein"] is None


def test_default_lora_targets_cover_both_block_types(base_pipelines):
    """Flow-Factory's targets: both streams' attention and MLPs in the double-stream blocks, the fused QKV+MLP input
    of the single-stream blocks (whose `attn.to_out` Flow-Factory's list does not reach)."""
    for name in ("dev", "klein"):
        adapter = get_adapter(copy.deepcopy(base_pipelines[name]))
        adapter.add_lora(lora_config(target_modules=None))
        assert adapted_modules(adapter.denoiser) == expected_targets(double_stream=True)


def adapted_modules(transformer: torch.nn.Module) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}


def expected_targets(double_stream: bool) -> set[str]:
    """The default targets in a transformer with one single-stream block, and one double-stream block if asked."""
    single = "attn.to_qkv_mlp_proj"
    double = {f"transformer_blocks.0.{t}" for t in FLUX2_LORA_TARGETS if t != single} if double_stream else set()
    return double | {f"single_transformer_blocks.0.{single}"}


@pytest.mark.parametrize("family", ["dev", "klein"])
@pytest.mark.parametrize("loss_type", ["flow_grpo", "grpo_guard"])
def test_training_is_on_policy_on_its_first_pass_and_learns(base_pipelines, prompts, family, loss_type, tmp_path):
    trainer = make_trainer(
        copy.deepcopy(base_pipelines[family]),
        [blueness],
        prompts,
        tmp_path,
        loss_type=loss_type,
        steps_per_generation=1,
        max_steps=2,
        **family_settings(),
    )
    assert trainer.adapter.uses_cfg == (family == "klein")
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        assert all(v == 0.0 for v in logged(trainer, key)), key
    assert all(np.isfinite(logged(trainer, "loss"))) and logged(trainer, "reward")
    assert all(g > 0 for g in logged(trainer, "timestep/01/grad_norm"))
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert sum(not torch.equal(before[n], after[n]) for n in before) >= len(before) // 2


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_lora_loads_with_the_pipeline_and_reproduces_the_policy(pipeline_dirs, prompts, family, tmp_path):
    trainer = make_trainer(pipeline_dirs[family], [blueness], prompts, tmp_path / "run", **family_settings())
    trainer.train()
    trainer.save_model()
    sample = dict(
        prompt="prompt number 1",
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=4.0,
        max_sequence_length=16,
        output_type="np",
    )
    trainer.pipeline.set_progress_bar_config(disable=True)
    trained = trainer.pipeline(generator=torch.Generator().manual_seed(0), **sample).images
    fresh = PIPELINES[family].from_pretrained(pipeline_dirs[family])
    fresh.set_progress_bar_config(disable=True)
    base = fresh(generator=torch.Generator().manual_seed(0), **sample).images
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh(generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_resume_in_the_middle_of_a_round_is_exact(base_pipelines, prompts, family, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(base_pipelines[family]), [blueness], prompts, tmp_path, **family_settings())


@pytest.mark.parametrize(
    ("recipe", "family", "rewards"),
    [
        ("flux2_dev_guard.yaml", "dev", ["cli_rewards.blueness", "jpeg_compressibility"]),  # 2 rewards, 2 weights
        ("flux2_klein_guard.yaml", "klein", ["cli_rewards.blueness"]),
    ],
)
def test_trains_from_the_command_line_with_the_shipped_recipe(pipeline_dirs, recipe, family, rewards, tmp_path):
    """Each shipped recipe trains as written (its steps, SDE window, guidance, LoRA, loss, EMA); only the model, the
    data, the rewards (which need downloads), the sizes and the batch layout change."""
    from trl_guard.scripts.grpo import main as grpo_main

    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(f"a drawing number {i}" for i in range(4)))
    trainer = grpo_main(
        [
            "--config", f"examples/recipes/{recipe}",
            "--model_name_or_path", pipeline_dirs[family],
            "--model_init_kwargs", "{}",
            "--dataset_name", str(data),
            "--eval_dataset_name", str(data),
            "--eval_strategy", "no",
            "--reward_funcs", *rewards,
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--max_sequence_length", "16",
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.pipeline, PIPELINES[family])
    assert trainer.args.num_inference_steps == 8 and trainer.args.sde_window_size == 1
    assert trainer.adapter.uses_cfg == (family == "klein")
    assert set(trainer.adapter.denoiser.peft_config["default"].target_modules) == set(FLUX2_LORA_TARGETS)
    assert all(np.isfinite(logged(trainer, "loss")))
    assert any("lora_A" in key for key in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors"))


#: Layers kept at the real widths, in bfloat16 (CPU bf16 matmuls are ~7x faster than float32 here): one double- and
#: one single-stream block each, [klein] 4B with 2 Qwen3 layers (~2.2 GB), [dev] with one full-width Mistral layer
#: (6.5 GB peak, about 30 s on one thread: a [dev] block is 0.5-1B parameters next to 0.75B of global layers). The
#: cut text encoders lack the pipelines' default hidden layers, so both the adapter and the pipeline stack layers
#: they have.
REAL_WIDTH = {
    "klein": dict(layers=(1, 1, 2), out_layers=(0, 1, 2), text_overrides=None),
    "dev": dict(layers=(1, 1, 1), out_layers=(0, 1, 1), text_overrides=None),
}


def contiguous_output_projections(transformer: torch.nn.Module) -> None:
    """Hand the double-stream blocks' output projections contiguous inputs. FLUX.2's attention passes them slices of
    the joint sequence, on which torch's CPU bfloat16 `linear` is ~200x slower (1.3 s instead of 6 ms at the real
    width); the values are the same."""
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_out.0", "attn.to_add_out")):
            module.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["klein", "dev"])
def test_real_widths_sample_train_and_reload_the_lora(family, tmp_path, monkeypatch):
    gc.collect()  # a previous real-width pipeline (trainers hold reference cycles) must not count against this one
    spec = REAL_WIDTH[family]
    pipe = build_real_width_flux2_pipeline(family, *spec["layers"], text_overrides=spec["text_overrides"])
    pipe.set_progress_bar_config(disable=True)
    contiguous_output_projections(pipe.transformer)
    monkeypatch.setattr(
        Flux2Adapter if family == "dev" else Flux2KleinAdapter, "text_encoder_out_layers", spec["out_layers"]
    )
    real, text = FAMILIES[family].components["transformer"], FAMILIES[family].components["text_encoder"]
    transformer = pipe.transformer
    assert transformer.inner_dim == real["num_attention_heads"] * real["attention_head_dim"]
    assert transformer.context_embedder.in_features == real["joint_attention_dim"] == 3 * text["hidden_size"]
    assert pipe.text_encoder.config.get_text_config().hidden_size == text["hidden_size"]
    assert transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 128
    assert (transformer.time_guidance_embed.guidance_embedder is not None) == (family == "dev")

    prompts = Dataset.from_dict({"prompt": ["a red cat", "two blue dogs"]})
    trainer = make_trainer(
        pipe,
        [blueness],
        prompts,
        tmp_path / "run",
        num_generations=2,
        per_device_train_batch_size=2,
        steps_per_generation=1,
        max_steps=1,
        num_inference_steps=2,
        guidance_scale=4.0,  # [dev]: the guidance embedding; [klein] base: CFG
        peft_config=lora_config(target_modules=None),
    )
    assert adapted_modules(transformer) == expected_targets(double_stream=spec["layers"][0] > 0)
    trainer.train()
    assert all(v == 0.0 for v in logged(trainer, "log_ratio_mean")) and all(np.isfinite(logged(trainer, "loss")))
    trainer.save_model()

    sample = dict(prompt="a red cat", height=32, width=32, num_inference_steps=1, guidance_scale=4.0)
    sample.update(max_sequence_length=16, text_encoder_out_layers=spec["out_layers"], output_type="latent")
    trained = pipe(generator=torch.Generator().manual_seed(0), **sample).images.float()
    transformer.delete_adapters("default")
    base = pipe(generator=torch.Generator().manual_seed(0), **sample).images.float()
    pipe.load_lora_weights(str(tmp_path / "run"))
    reloaded = pipe(generator=torch.Generator().manual_seed(0), **sample).images.float()
    effect = (trained - base).abs().mean()
    assert effect > 1e-2 * base.abs().mean()  # one step at lr 0.1 moves the policy
    assert (reloaded - trained).abs().mean() < 0.05 * effect  # bfloat16 rounding of the reloaded LoRA, not its loss
