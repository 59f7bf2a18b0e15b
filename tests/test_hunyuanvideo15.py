"""HunyuanVideo 1.5 text-to-video through the adapter interface and trainer: the adapter reproduces
`HunyuanVideo15Pipeline` (its guider's CFG included), training is exactly on-policy on its first pass, and the LoRA
loads with the transformer's own loader (diffusers 0.42 gives this pipeline no `load_lora_weights`)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders.hunyuanvideo15 import (
    HUNYUANVIDEO15_480P_T2V,
    build_real_width_hunyuanvideo15_pipeline,
    build_tiny_hunyuanvideo15_pipeline,
)
from conftest import blueness
from datasets import Dataset
from diffusers import ClassifierFreeGuidance
from helpers import logged, lora_config, make_trainer, resume_mid_round

from trl_guard.adapters import HunyuanVideo15Adapter, SamplingSettings, get_adapter
from trl_guard.adapters.hunyuanvideo15 import HUNYUANVIDEO15_ATTENTION_PROJECTIONS
from trl_guard.rewards import video_reward
from trl_guard.rollout import sample_ode

# The second prompt quotes a text: its ByT5 glyph stream is not empty.
PROMPTS = ["a red cat", 'a sign that reads "hi"']
FRAMES = 5  # two latent frames: the VAE compresses time by 4
HUNYUAN = dict(num_frames=FRAMES, peft_config=lora_config(target_modules=None))


@pytest.fixture(scope="module")
def _base_pipeline():
    return build_tiny_hunyuanvideo15_pipeline(seed=0)


@pytest.fixture
def tiny_pipeline(_base_pipeline):
    return copy.deepcopy(_base_pipeline)


def video_blueness(**kwargs):
    return video_reward(blueness, **kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_adapter_sampling_matches_the_pipeline(guidance_scale, tiny_pipeline):
    adapter = get_adapter(tiny_pipeline)
    assert isinstance(adapter, HunyuanVideo15Adapter)
    adapter.configure(SamplingSettings(32, 32, guidance_scale, num_frames=FRAMES))
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 2, 8, 8)  # (B, C, F, H, W)
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents, adapter.sigmas(4))
    videos = adapter.decode(final)
    assert len(videos) == 2 and all(len(v) == FRAMES and v[0].size == (32, 32) for v in videos)
    ours = np.stack([[np.asarray(frame, dtype=np.float32) / 255 for frame in video] for video in videos])

    # The pipeline's CFG is its guider's: at the same scale, and off (one branch) at 1.
    tiny_pipeline.guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    tiny_pipeline.vae.enable_slicing()  # its VAE decodes one video at a time only
    tiny_pipeline.set_progress_bar_config(disable=True)
    calls = []
    hook = tiny_pipeline.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    kwargs = dict(height=32, width=32, num_frames=FRAMES, num_inference_steps=4, latents=latents.clone())
    reference_latents = tiny_pipeline(PROMPTS, output_type="latent", **kwargs).frames
    hook.remove()
    assert len(calls) == (8 if guidance_scale > 1 else 4)
    # Before decoding, the latents agree to float32 rounding (the pipeline attends to padding tokens we trim).
    torch.testing.assert_close(final, reference_latents, rtol=0, atol=1e-5)
    reference = tiny_pipeline(PROMPTS, output_type="np", **kwargs).frames
    assert reference.shape == ours.shape == (2, FRAMES, 32, 32, 3)
    assert np.abs(ours - reference).max() <= 1.5 / 255  # PIL's 8-bit rounding


def test_refuses_frame_counts_sizes_and_guiders_it_cannot_take(tiny_pipeline):
    adapter = get_adapter(tiny_pipeline)
    with pytest.raises(ValueError, match="num_frames=6 .* for example, 5"):
        adapter.configure(SamplingSettings(32, 32, num_frames=6))
    with pytest.raises(ValueError, match="width=40 .* for example, 32"):
        adapter.configure(SamplingSettings(32, 40, num_frames=FRAMES))
    tiny_pipeline.guider = ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.7)
    with pytest.raises(NotImplementedError, match="guidance_rescale"):
        get_adapter(tiny_pipeline)


def test_default_lora_targets_and_fsdp2_wrap_every_block(tiny_pipeline):
    """`examples/accelerate_configs/fsdp2.yaml` wraps the transformer's `_no_split_modules`: every dual-stream block,
    the patch embedding and the text refiner, and every default LoRA target sits inside one of them."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    transformer = tiny_pipeline.transformer
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    wrapped = [name for name, module in transformer.named_modules() if policy(module)]
    blocks = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    assert wrapped == ["x_embedder", "context_embedder", *blocks]
    targets = [
        n for n, _ in transformer.named_modules() if any(n.endswith(t) for t in HUNYUANVIDEO15_ATTENTION_PROJECTIONS)
    ]
    # all eight projections of each dual-stream block, and the refiner's self-attention
    assert {n for n in targets if n.startswith("transformer_blocks.")} == {
        f"{b}.{t}" for b in blocks for t in HUNYUANVIDEO15_ATTENTION_PROJECTIONS
    }
    assert all(any(name.startswith(f"{unit}.") for unit in wrapped) for name in targets)
    assert HunyuanVideo15Adapter.fsdp2_refusal is None


def test_trains_and_its_first_pass_is_exactly_on_policy(tiny_pipeline, prompts, tmp_path):
    seen = []

    def record_blueness(prompts, images, **kwargs):
        seen.append(images)
        return blueness(prompts, images, **kwargs)

    trainer = make_trainer(
        tiny_pipeline,
        [video_reward(record_blueness)],
        prompts,
        tmp_path,
        steps_per_generation=1,
        max_steps=2,
        guidance_scale=6.0,  # CFG: both branches batched in one forward, in sampling and in training
        **HUNYUAN,
    )
    assert set(trainer.adapter.denoiser.peft_config["default"].target_modules) == set(
        HUNYUANVIDEO15_ATTENTION_PROJECTIONS
    )
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    assert len(seen[0]) == 8 * FRAMES and seen[0][0].size == (32, 32)  # every frame of every video
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        values = logged(trainer, key)
        assert len(values) == 2 and all(v == 0.0 for v in values), (key, values)
    assert all(np.isfinite(logged(trainer, "loss")))
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft"])
def test_the_other_algorithm_families_train_it(loss_type, tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [video_blueness()], prompts, tmp_path, loss_type=loss_type, max_steps=2, **HUNYUAN
    )
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(np.isfinite(logged(trainer, "loss")))
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_lora_loads_with_the_transformers_loader_and_reproduces_the_policy(_base_pipeline, prompts, tmp_path):
    trainer = make_trainer(copy.deepcopy(_base_pipeline), [video_blueness()], prompts, tmp_path, **HUNYUAN)
    trainer.train()
    trainer.save_model()
    sample = dict(height=32, width=32, num_frames=FRAMES, num_inference_steps=2, output_type="np")
    trained = trainer.pipeline("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).frames
    fresh = copy.deepcopy(_base_pipeline)
    fresh.set_progress_bar_config(disable=True)
    base = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).frames
    assert not hasattr(fresh, "load_lora_weights")  # when diffusers adds it, test it here
    exec(trainer.adapter.lora_load_code(str(tmp_path)), {"pipe": fresh})  # the model card's loading line
    reloaded = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).frames
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_is_exact(_base_pipeline, prompts, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [video_blueness()], prompts, tmp_path, **HUNYUAN)


@pytest.mark.slow  # ~18 s: the saved pipeline encodes at the published text lengths
def test_trains_from_the_command_line_with_the_shipped_recipe(_base_pipeline, tmp_path):
    """The shipped recipe trains; only the model, the prompts, the reward and the sizes change. The saved pipeline
    loads with the published text lengths (1000 Qwen tokens, 256 ByT5 tokens), which `forward` trims."""
    from safetensors.torch import load_file

    from trl_guard.scripts.grpo import main as grpo_main

    model_dir = tmp_path / "model"
    _base_pipeline.save_pretrained(model_dir)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(f'a sign that reads "{i}"' for i in range(4)))
    widths = []
    trainer = grpo_main(
        [
            "--config", "examples/recipes/hunyuanvideo15_t2v_guard.yaml",
            "--model_name_or_path", str(model_dir),
            "--model_init_kwargs", "{}",
            "--dataset_name", str(data), "--eval_dataset_name", str(data), "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.video_blueness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_frames", "5", "--num_inference_steps", "3",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and trainer.pipeline.tokenizer_max_length == 1000
    assert trainer.args.guidance_scale == 6.0 and trainer.adapter.uses_cfg
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("attn.add_q_proj.lora_A" in key for key in lora)
    # the stored text is padded to the pipeline's lengths; the denoiser saw only the columns some row uses
    embeds = trainer.adapter.encode_prompts(['a sign that reads "1"'])
    assert embeds.tensors["encoder_attention_mask"].shape == (1, 1000)
    hook = trainer.adapter.denoiser.register_forward_pre_hook(
        lambda m, a, k: widths.append(k["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    latents = torch.randn(1, *trainer.adapter.latent_shape())
    trainer.adapter.predict_velocity(latents, torch.ones(1), embeds, None)
    hook.remove()
    assert widths == [int(embeds.tensors["encoder_attention_mask"].sum())]


def test_the_published_record_is_the_classes_defaults_but_the_task():
    """The record's transformer and VAE values are diffusers' class defaults (which the conversion script that wrote
    the checkpoint builds the VAE from) but `task_type`: the class defaults to image-to-video."""
    import inspect

    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel

    for component, cls in (("transformer", HunyuanVideo15Transformer3DModel), ("vae", AutoencoderKLHunyuanVideo15)):
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        values = HUNYUANVIDEO15_480P_T2V[component].values
        assert set(values) == set(defaults), component
        assert {k for k in values if values[k] != defaults[k]} == (
            {"task_type"} if component == "transformer" else set()
        )
    assert HUNYUANVIDEO15_480P_T2V["transformer"]["task_type"] == "t2v"


@pytest.mark.slow  # ~1 min: 1 G parameters (the 3-layer, 3584-wide Qwen text model is 0.7 G of them)
def test_real_widths_sample_train_save_and_reload(tmp_path):
    """The 480p checkpoint's real widths (`HUNYUANVIDEO15_480P_T2V`: 2048-wide blocks of 16 heads x 128, Qwen2.5-VL's
    3584-wide and ByT5's 1472-wide text states, SigLIP's 1152-wide image slot, the 32-channel VAE at 16x / 4x) with one
    dual-stream block and the published scheduler shift and CFG scale: sample and train one LoRA step on the default
    targets, save, and load the LoRA with the model card's line (`transformer.load_lora_adapter`): it gives the trained
    policy's velocity."""
    real = HUNYUANVIDEO15_480P_T2V
    spec = real["transformer"]
    pipe = build_real_width_hunyuanvideo15_pipeline(seed=0)
    transformer = pipe.transformer
    width = spec["num_attention_heads"] * spec["attention_head_dim"]
    assert width == 2048 and transformer.x_embedder.proj.out_channels == width
    assert transformer.x_embedder.proj.in_channels == spec["in_channels"] == 2 * spec["out_channels"] + 1
    assert transformer.transformer_blocks[0].ff.net[2].in_features == spec["mlp_ratio"] * width
    assert tuple(transformer.rope.rope_dim) == spec["rope_axes_dim"] and sum(spec["rope_axes_dim"]) == 128
    assert pipe.text_encoder.config.hidden_size == spec["text_embed_dim"] == real["text_encoder"]["hidden_size"]
    assert pipe.text_encoder_2.config.d_model == spec["text_embed_2_dim"] == real["text_encoder_2"]["d_model"]
    assert pipe.vae.config.latent_channels == spec["out_channels"] == real["vae"]["latent_channels"]
    assert pipe.guider.guidance_scale == 6.0 and pipe.scheduler.config.shift == 5.0

    captions = Dataset.from_dict({"prompt": PROMPTS})  # the second one fills ByT5's glyph stream
    trainer = make_trainer(
        pipe,
        [video_blueness()],
        captions,
        tmp_path / "run",
        num_generations=2,
        per_device_train_batch_size=2,
        steps_per_generation=1,
        max_steps=1,
        num_inference_steps=2,
        timestep_fraction=0.5,  # train the first of the 2 steps
        guidance_scale=real["pipeline"]["guidance_scale"],
        learning_rate=1e-3,
        **HUNYUAN,
    )
    adapter = trainer.adapter
    assert adapter.uses_cfg
    assert adapter.latent_shape() == (32, 2, 2, 2)  # 5 frames, 32 px: 2 latent frames of 2 x 2, 8 tokens
    trainer.train()
    assert logged(trainer, "log_ratio_mean") == [0.0] and np.isfinite(logged(trainer, "loss")[0])
    trainer.save_model()

    embeds, negative = adapter.encode_prompts(PROMPTS[1:]), adapter.encode_prompts([""])
    assert embeds.tensors["encoder_hidden_states"].shape[-1] == 3584
    assert embeds.tensors["encoder_hidden_states_2"].shape[-1] == 1472
    assert embeds.tensors["encoder_attention_mask_2"].sum() > 0
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8])
    with torch.no_grad():
        trained = adapter.predict_velocity(latents, sigma, embeds, negative)
        transformer.delete_adapters("default")
        base = adapter.predict_velocity(latents, sigma, embeds, negative)
        exec(adapter.lora_load_code(str(tmp_path / "run")), {"pipe": pipe})  # the model card's loading line
        reloaded = adapter.predict_velocity(latents, sigma, embeds, negative)
    assert (trained - base).abs().max() > 1e-4  # the step moved the LoRA (its B matrices start at zero)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
