"""Qwen-Image 2.1 through the adapter, the trainer and the command line: sampling equals `QwenImage21Pipeline.__call__`
with and without true CFG and on a checkpoint's own `sample_sigmas`; each row is computed as the pipeline computes
its prompt alone, whatever its batch; training is exactly on-policy on its first pass and learns, with every
algorithm family; resume mid-round is exact; the LoRA loads with the pipeline; the shipped recipe trains; FSDP2 shards
each block; and the real checkpoint's widths sample, train and reload.

The pipeline pads a batch of prompts to its longest, which moves the shorter prompts' image on the RoPE grid (the
test below shows it), so the references are the pipeline called on one prompt at a time."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders.qwenimage21 import (
    QWEN_IMAGE_21_REAL,
    build_real_width_qwenimage21_pipeline,
    build_tiny_qwenimage21_pipeline,
)
from conftest import blueness
from datasets import Dataset
from helpers import logged, lora_config, make_trainer, resume_mid_round
from safetensors.torch import load_file

from trl_guard.adapters import SamplingSettings, get_adapter
from trl_guard.adapters.qwenimage21 import QWEN_IMAGE_21_LORA_TARGETS, QwenImage21Adapter
from trl_guard.rollout import sample_ode

PROMPTS = ["a red cat", "two blue dogs on a long green sofa"]  # different token counts: each is its own layout
#: The Turbo checkpoint's 8 sigmas (Qwen/Qwen-Image-2.1-Turbo model_index.json, as quoted on its Hub discussions).
TURBO_SIGMAS = [1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568]
#: True CFG 4 against a one-space negative prompt, on the adapter's default LoRA targets.
CFG = dict(
    true_cfg_scale=4.0,
    negative_prompt=" ",
    num_inference_steps=3,
    max_sequence_length=64,
    peft_config=lora_config(target_modules=None),
)


@pytest.fixture(scope="module")
def _base_pipeline():
    pipe = build_tiny_qwenimage21_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipeline(_base_pipeline):
    return copy.deepcopy(_base_pipeline)


@pytest.fixture
def varied():
    """8 prompts of 4 token counts, so that batches mix layouts."""
    return Dataset.from_dict(
        {"prompt": [("a cat", "a red cat", "two blue dogs", "a tall green tree")[i % 4] for i in range(8)]}
    )


def configured(pipeline, true_cfg_scale=1.0, height=32, width=64, **settings) -> QwenImage21Adapter:
    adapter = get_adapter(pipeline)
    adapter.configure(
        SamplingSettings(height, width, true_cfg_scale=true_cfg_scale, max_sequence_length=64, **settings)
    )
    return adapter


def pipe_one_at_a_time(pipe, prompts, latents, **kwargs):
    return torch.cat([pipe(p, latents=latents[i : i + 1].clone(), **kwargs).images for i, p in enumerate(prompts)])


def test_tiny_processor_drops_exactly_the_system_turn(tiny_pipeline):
    pipe = tiny_pipeline
    ids = pipe.processor(text=[pipe.prompt_template_t2i.format("a red cat")]).input_ids[0]
    kept = pipe.processor.tokenizer.convert_ids_to_tokens(ids[pipe._drop_idx :])
    assert kept[:2] == ["<|im_start|>", "user"]


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_adapter_sampling_matches_the_pipeline(true_cfg_scale, tiny_pipeline):
    pipe = tiny_pipeline
    adapter = configured(pipe, true_cfg_scale)
    assert isinstance(adapter, QwenImage21Adapter) and adapter.uses_cfg == (true_cfg_scale > 1)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 2 * 4, 4)  # 32 x 64 px at 16x: one token per latent pixel, not packed
    negative = adapter.encode_prompts([" "]) if adapter.uses_cfg else None
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents.clone(), adapter.sigmas(4))

    kwargs = dict(height=32, width=64, num_inference_steps=4, true_cfg_scale=true_cfg_scale)
    if true_cfg_scale > 1:
        kwargs["negative_prompt"] = " "
    reference = pipe_one_at_a_time(pipe, PROMPTS, latents, output_type="latent", **kwargs)
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-5)
    ours = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in adapter.decode(final)])
    assert ours.shape == (2, 32, 64, 4)  # RGBA, as the pipeline's images
    images = np.concatenate(
        [pipe(p, latents=latents[i : i + 1].clone(), output_type="np", **kwargs).images for i, p in enumerate(PROMPTS)]
    )
    assert np.abs(ours - images).max() <= 1.5 / 255  # PIL's 8-bit rounding
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # the prompts reach the image


def test_each_row_is_its_prompt_alone_whatever_the_batch(tiny_pipeline):
    """One forward over prompts of two lengths calls the denoiser once per length with the unpadded text, and each row
    equals its prompt's call alone. The right padding the pipeline uses for a batch would move the shorter prompt's
    image instead."""
    adapter = configured(tiny_pipeline)
    embeds = adapter.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert embeds.tensors["encoder_hidden_states"].shape[1] == 64
    latents = torch.randn(3, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.6, 0.3])
    seen = []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            (len(kwargs["hidden_states"]), kwargs["encoder_hidden_states"].shape[1])
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        try:
            velocity = adapter.predict_velocity(latents, sigma, embeds, None)
        finally:
            hook.remove()
        alone = torch.cat(
            [
                adapter.predict_velocity(latents[i : i + 1], sigma[i : i + 1], embeds.index(slice(i, i + 1)), None)
                for i in range(3)
            ]
        )
        text, mask, _ = tiny_pipeline.encode_prompt(PROMPTS)  # right padded to the longer prompt
        padded = adapter.denoiser(
            hidden_states=latents[:1],
            timestep=sigma[:1],
            encoder_hidden_states=text[:1],
            encoder_hidden_states_mask=mask[:1],
            img_shapes=[[(1, 2, 4)]],
            img_mask=torch.cat(
                [torch.zeros(1, text.shape[1], dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)], 1
            ),
            return_dict=False,
        )[0][:, -8:]
    lengths = embeds.tensors["encoder_hidden_states_mask"].sum(dim=1).tolist()
    assert lengths[0] == lengths[2] < lengths[1] and seen == [(2, lengths[0]), (1, lengths[1])]
    torch.testing.assert_close(velocity, alone, rtol=0, atol=1e-6)
    assert (padded - velocity[:1]).abs().max() > 1e-3


def test_under_fsdp2_each_row_is_its_own_call(tiny_pipeline, monkeypatch):
    """Every FSDP2 forward is a collective: one call per row, so that processes with different numbers of distinct
    prompt lengths still make as many calls."""
    import torch.distributed.fsdp

    adapter = configured(tiny_pipeline)
    assert adapter._row_groups([5, 7, 5], adapter.denoiser) == [(5, [0, 2]), (7, [1])]
    monkeypatch.setattr(torch.distributed.fsdp, "FSDPModule", torch.nn.Module)  # as if the denoiser were sharded
    assert adapter._row_groups([5, 7, 5], adapter.denoiser) == [(5, [0]), (7, [1]), (5, [2])]


def test_fsdp2_shards_each_block_and_the_lora_targets_live_in_them(tiny_pipeline):
    """`examples/accelerate_configs/fsdp2.yaml` wraps the classes the transformer lists in `_no_split_modules`: each
    single-stream block is its own shard group, and every default LoRA target sits inside one."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    transformer = tiny_pipeline.transformer
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    wrapped = [name for name, module in transformer.named_modules() if policy(module)]
    assert wrapped == [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    targets = [
        name
        for name, _ in transformer.named_modules()
        if any(name.endswith(target) for target in QWEN_IMAGE_21_LORA_TARGETS)
    ]
    assert len(targets) == len(QWEN_IMAGE_21_LORA_TARGETS) * len(wrapped)
    assert all(any(name.startswith(f"{block}.") for block in wrapped) for name in targets)


def test_true_cfg_is_one_doubled_forward_combined_plainly(tiny_pipeline):
    from helpers import guided_and_branches

    adapter = configured(tiny_pipeline, true_cfg_scale=4.0)
    guided, cond, uncond, batch_sizes = guided_and_branches(adapter, PROMPTS, " ")
    assert sum(batch_sizes) == 4  # one forward of both branches (a call per distinct text length)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-5)  # no norm rescaling
    assert (guided - cond).abs().max() > 1e-3


def test_a_checkpoints_own_sigmas_are_sampled_and_another_step_count_refused(tiny_pipeline):
    pipe = tiny_pipeline
    pipe.register_to_config(sample_sigmas=TURBO_SIGMAS)  # as QwenImage21Pipeline(..., sample_sigmas=...) records them
    adapter = configured(pipe)
    with pytest.raises(ValueError, match="num_inference_steps=4, .* Set num_inference_steps to 8"):
        adapter.sigmas(4)
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS[:1]), None, latents.clone(), adapter.sigmas(8))
    # num_inference_steps is ignored by the pipeline: its sigmas are the checkpoint's
    reference = pipe(
        PROMPTS[0], latents=latents.clone(), height=32, width=64, num_inference_steps=3, output_type="latent"
    )
    torch.testing.assert_close(final, reference.images, rtol=0, atol=1e-5)


def test_what_the_pipeline_cannot_take_is_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="width=48 .* multiples of 32"):
        configured(tiny_pipeline, width=48)
    adapter = configured(tiny_pipeline)
    with pytest.raises(ValueError, match="'two blue dogs on a long green sofa' is .* Set max_sequence_length to"):
        adapter.configure(SamplingSettings(32, 64, max_sequence_length=8))
        adapter.encode_prompts(PROMPTS)


@pytest.mark.parametrize(
    ("loss_type", "settings"),
    [
        ("grpo_guard", dict(CFG, num_inference_steps=2)),
        pytest.param("flow_grpo", dict(CFG, true_cfg_scale=1.0), marks=pytest.mark.slow),
        pytest.param("nft", dict(CFG, true_cfg_scale=1.0), marks=pytest.mark.slow),
        pytest.param("awm", dict(CFG, true_cfg_scale=1.0), marks=pytest.mark.slow),
    ],
)
def test_first_pass_is_exactly_on_policy_and_training_learns(loss_type, settings, tiny_pipeline, varied, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        varied,
        tmp_path,
        steps_per_generation=1,
        max_steps=2,
        loss_type=loss_type,
        **settings,
    )
    targets = set(trainer.adapter.denoiser.peft_config["default"].target_modules)
    assert targets == set(QWEN_IMAGE_21_LORA_TARGETS)
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    assert logged(trainer, "reward") and all(np.isfinite(logged(trainer, "loss")))
    if loss_type not in ("nft", "awm"):  # steps_per_generation=1: each pass is the first on its round
        for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
            values = logged(trainer, key)
            assert len(values) == 2 and all(v == 0.0 for v in values), (key, values)
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_is_exact(_base_pipeline, varied, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [blueness], varied, tmp_path, **CFG)


def test_lora_loads_with_the_pipeline_and_reproduces_the_policy(_base_pipeline, prompts, tmp_path):
    """`QwenImage21Pipeline.load_lora_weights` on a fresh copy of the base pipeline (a saved pipeline cannot be loaded
    without torchvision: see `tiny_qwen3_vl_processor`)."""
    settings = dict(CFG, true_cfg_scale=1.0, num_inference_steps=2, max_steps=1)
    trainer = make_trainer(copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path / "run", **settings)
    trainer.train()
    trainer.save_model()
    sample = dict(height=32, width=32, num_inference_steps=3, output_type="np")
    trained = trainer.pipeline("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images
    fresh = copy.deepcopy(_base_pipeline)
    base = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


def test_trains_from_the_command_line_with_the_shipped_recipe(_base_pipeline, tmp_path, monkeypatch):
    """The shipped recipe trains; only the model, the prompts, the reward and the sizes change. The folder holds only
    model_index.json and the pipeline comes from memory (a saved one needs torchvision to load)."""
    from diffusers import QwenImage21Pipeline

    import trl_guard.preflight
    from trl_guard.scripts.grpo import main as grpo_main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    monkeypatch.setattr(trl_guard.preflight, "load_pipeline", lambda model, kwargs: copy.deepcopy(_base_pipeline))
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(["a cat", "a red cat", "two blue dogs", "a tall green tree"]))
    trainer = grpo_main(
        [
            "--config", "examples/recipes/qwenimage21_guard.yaml",
            "--model_name_or_path", str(model_dir),
            "--model_init_kwargs", "{}",
            "--dataset_name", str(data), "--eval_dataset_name", str(data), "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.blueness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_inference_steps", "5", "--max_sequence_length", "64",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.pipeline, QwenImage21Pipeline)
    assert not trainer.adapter.uses_cfg and trainer.args.sde_window_size == 2  # 2.1 samples without guidance
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("img_mlp.gate_layer.lora_A" in key for key in lora)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the reloaded LoRA is a second adapter
def test_real_width_samples_trains_and_reloads(prompts, tmp_path):
    """Qwen-Image 2.1's real widths (4096-wide blocks of 32 heads, Qwen3-VL-8B's 4096-wide text, the 64-channel VAE at
    16x) with one block: sample 2 steps, train one LoRA step on the default targets, save, and reload the LoRA through
    `QwenImage21Pipeline.load_lora_weights` into the same pipeline as a second adapter: it gives the trained policy's
    velocity."""
    pipe = build_real_width_qwenimage21_pipeline(seed=0)
    assert pipe.transformer.inner_dim == 4096 == QWEN_IMAGE_21_REAL["transformer"]["context_in_dim"]
    assert pipe.text_encoder.config.text_config.hidden_size == QWEN_IMAGE_21_REAL["text_encoder"]["hidden_size"]
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
        max_sequence_length=64,
        learning_rate=1e-3,
        peft_config=lora_config(target_modules=None),
    )
    adapter = trainer.adapter
    assert adapter.latent_shape() == (4, 64)  # 32 px through the 16x VAE: 2 x 2 tokens of 64 channels
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
