"""HunyuanVideo 1.5 image-to-video through the adapter, the trainer and the command line: sampling equals
`HunyuanVideo15ImageToVideoPipeline.__call__` with and without CFG, each row starts from its own first frame (its VAE
latents and SigLIP states computed once per distinct image per round), rewards and the evaluation grid see the first
frames, training is exactly on-policy on its first pass with every algorithm family, the LoRA loads with the
transformer's own loader (diffusers 0.42 gives this pipeline no `load_lora_weights`), a mid-round resume is exact, the
shipped recipe trains, FSDP2 wraps each block, and the real widths run."""

import copy
import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders.hunyuanvideo15 import (
    HUNYUANVIDEO15_480P_I2V,
    HUNYUANVIDEO15_480P_T2V,
    build_real_width_hunyuanvideo15_pipeline,
    build_tiny_hunyuanvideo15_i2v_pipeline,
)
from conftest import blueness
from datasets import Dataset
from diffusers import ClassifierFreeGuidance, HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Transformer3DModel
from helpers import (
    denoiser_kwargs,
    logged,
    lora_config,
    make_trainer,
    random_image,
    resume_mid_round,
    train_on_policy,
    write_first_frame_jsonl,
)
from PIL import Image
from safetensors.torch import load_file

from trl_guard.adapters import PromptEmbeddings, SamplingSettings, get_adapter
from trl_guard.adapters.hunyuanvideo15 import HUNYUANVIDEO15_ATTENTION_PROJECTIONS
from trl_guard.adapters.hunyuanvideo15_i2v import HunyuanVideo15I2VAdapter
from trl_guard.conditioning import PromptEncoder
from trl_guard.rollout import sample_ode

# The second prompt quotes a text: its ByT5 glyph stream is not empty.
PROMPTS = ["a red cat", 'a sign that reads "hi"']
FRAMES = 5  # two latent frames: the VAE compresses time by 4
I2V = dict(num_frames=FRAMES, peft_config=lora_config(target_modules=None))


first_frame = random_image


def video_blueness(prompts, images, **kwargs):
    return [sum(blueness([p] * len(frames), frames)) / len(frames) for p, frames in zip(prompts, images)]


@pytest.fixture(scope="module")
def _base():
    return build_tiny_hunyuanvideo15_i2v_pipeline(seed=0)


@pytest.fixture
def pipe(_base):
    """A fresh copy of the tiny pipeline (training mutates the transformer)."""
    return copy.deepcopy(_base)


@pytest.fixture(scope="module")
def pipeline_dir(_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hunyuanvideo15-i2v")
    _base.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def rows():
    """8 prompts on 4 first frames: rows 2k and 2k+1 share image k, rows 0 and 4 share their prompt."""
    return Dataset.from_dict(
        {"prompt": [f"prompt number {i % 4}" for i in range(8)], "image": [first_frame(i // 2) for i in range(8)]}
    )


def configured(pipe, guidance_scale=1.0):
    adapter = get_adapter(pipe)
    adapter.configure(SamplingSettings(32, 32, guidance_scale, num_frames=FRAMES))
    return adapter


def conditioned(adapter, prompts, images) -> PromptEmbeddings:
    text = adapter.encode_prompts(prompts).tensors
    return PromptEmbeddings({**text, **adapter.encode_conditions({"image": images}).tensors})


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_sampling_matches_the_pipeline(guidance_scale, pipe):
    adapter = configured(pipe, guidance_scale)
    assert type(adapter) is HunyuanVideo15I2VAdapter
    # The second image is 36 x 32: the pipeline's bucket for it is 32 x 32, which it resizes and centre-crops to.
    sources = [first_frame(0), first_frame(1, width=36)]
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert adapter.latent_shape() == (4, 2, 8, 8)  # the VAE's channels: the transformer's 9 add condition and mask
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    sigmas = adapter.sigmas(4)
    conditioning = conditioned(adapter, PROMPTS, sources)
    final = sample_ode(adapter, conditioning, negative, latents.clone(), sigmas)

    pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    pipe.set_progress_bar_config(disable=True)
    sample = dict(num_frames=FRAMES, num_inference_steps=4)
    for i in range(2):  # the pipeline takes one first frame per call
        call = dict(image=sources[i], prompt=PROMPTS[i], latents=latents[i : i + 1].clone(), **sample)
        reference = pipe(output_type="latent", **call).frames
        # float32 rounding: the pipeline attends to padding tokens the adapter trims
        torch.testing.assert_close(final[i : i + 1], reference, rtol=0, atol=1e-5)
    if guidance_scale > 1:
        return
    # decoding and the first frame's effect do not depend on CFG: checked once
    frames = pipe(output_type="np", **call).frames[0]  # the last row's video, decoded by the pipeline
    ours = np.stack([np.asarray(frame, dtype=np.float32) / 255 for frame in adapter.decode(final[1:])[0]])
    assert ours.shape == frames.shape == (FRAMES, 32, 32, 3)
    assert np.abs(ours - frames).max() <= 1.5 / 255  # PIL's 8-bit rounding
    # the first frame conditions the video: other first frames give other videos
    others = sample_ode(
        adapter, conditioned(adapter, PROMPTS, [first_frame(2), first_frame(3)]), negative, latents, sigmas
    )
    assert (others - final).abs().mean() > 1e-3 * final.abs().mean()


def test_the_first_frame_and_its_siglip_states_reach_the_transformer_encoded_once_per_image(pipe, rows):
    adapter = configured(pipe)
    condition = adapter.encode_conditions({"image": [first_frame(0)]}).tensors
    first, states = condition["first_frame_latents"], condition["image_embeds"]
    assert first.shape == (1, 4, 1, 8, 8) and first.dtype == torch.float32  # one latent frame: the image alone
    assert states.shape == (1, (32 // 8) ** 2, 16)  # SigLIP's patch tokens (no class token) of its width
    kwargs, noise = denoiser_kwargs(adapter, pipe.transformer, condition)
    hidden = kwargs["hidden_states"]  # channels: noise, the first frame's latents then zeros, the mask
    assert hidden.shape == (1, 4 + 4 + 1, 2, 8, 8)
    assert torch.equal(hidden[:, :4], noise) and torch.equal(hidden[:, 4:8, :1], first)
    assert not hidden[:, 4:8, 1:].any()
    assert torch.equal(hidden[:, 8, 0], torch.ones(1, 8, 8)) and not hidden[:, 8, 1:].any()
    assert torch.equal(kwargs["image_embeds"], states)

    # A round's conditioning: each distinct first frame through the VAE and SigLIP once, whatever its rows.
    calls = {"vae": [], "siglip": []}
    hooks = [
        pipe.vae.encoder.register_forward_pre_hook(lambda m, a: calls["vae"].append(len(a[0]))),
        pipe.image_encoder.register_forward_pre_hook(
            lambda m, a, kw: calls["siglip"].append(len(kw["pixel_values"])), with_kwargs=True
        ),
    ]
    conditioning = PromptEncoder(adapter, torch.device("cpu")).rows(rows["prompt"], {"image": rows["image"]})
    for h in hooks:
        h.remove()
    assert calls == {"vae": [1] * 4, "siglip": [4]}  # 8 rows, 4 distinct first frames
    first, states = conditioning.tensors["first_frame_latents"], conditioning.tensors["image_embeds"]
    assert first.shape[0] == states.shape[0] == 8
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


def test_training_is_on_policy_and_rewards_and_the_grid_see_the_first_frames(pipe, rows, tmp_path):
    seen = []

    def first_frame_blueness(prompts, images, image, **kwargs):
        seen.extend(zip(prompts, (np.asarray(s).tobytes() for s in image)))
        return video_blueness(prompts, images)

    trainer = make_trainer(
        pipe,
        [first_frame_blueness],
        rows,
        tmp_path,
        num_generations=2,
        per_device_train_batch_size=4,  # one round of 2 rows x 2 videos, 2 sampling steps: a short run
        steps_per_generation=1,
        max_steps=1,
        num_inference_steps=2,
        guidance_scale=6.0,  # CFG: both branches share the row's first frame
        noise_level=0.7,
        **I2V,
    )
    siglip_calls = []
    pipe.image_encoder.register_forward_pre_hook(lambda m, a, kw: siglip_calls.append(1), with_kwargs=True)
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    assert siglip_calls == [1]  # one round, its distinct first frames in one batch: never per step
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        assert logged(trainer, key) == [0.0], key
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # every video was scored next to its own row's first frame
    pairs = {(p, np.asarray(s).tobytes()) for p, s in zip(rows["prompt"], rows["image"])}
    assert len(seen) == 4 and set(seen) <= pairs
    # the evaluation grid: per row, the first frame, then the video's frames
    trainer.evaluate(eval_dataset=rows.select([0, 2]))
    grid = Image.open(tmp_path / "eval_images" / f"step-{trainer.state.global_step:06d}.png")
    assert grid.size == ((1 + FRAMES) * 32, 2 * 32)
    assert np.array_equal(np.asarray(grid.crop((0, 32, 32, 64))), np.asarray(first_frame(1)))


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft"])
def test_every_algorithm_family_trains_it(loss_type, pipe, rows, tmp_path):
    """An SDE-ratio loss and a forward-process one: exactly on-policy on the first pass, and the LoRA learns."""
    schedule = dict(noise_level=0.7) if loss_type != "nft" else {}
    trainer = make_trainer(
        pipe, [video_blueness], rows, tmp_path, loss_type=loss_type, steps_per_generation=1, **schedule, **I2V
    )
    train_on_policy(trainer)


def test_lora_loads_with_the_transformers_loader_and_reproduces_the_policy(_base, rows, tmp_path):
    trainer = make_trainer(
        copy.deepcopy(_base),
        [video_blueness],
        rows,
        tmp_path,
        num_generations=2,
        per_device_train_batch_size=4,
        steps_per_generation=1,
        max_steps=1,
        num_inference_steps=2,
        **I2V,
    )
    trainer.train()
    trainer.save_model()
    lora = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") for k in lora)  # the diffusers layout `load_lora_adapter` reads
    assert any(k.startswith("transformer.transformer_blocks.") for k in lora)
    sample = dict(image=first_frame(0), prompt="prompt number 1", num_frames=FRAMES, num_inference_steps=2)
    trained = trainer.pipeline(generator=torch.Generator().manual_seed(0), **sample).frames
    fresh = copy.deepcopy(_base)
    fresh.set_progress_bar_config(disable=True)
    base = fresh(generator=torch.Generator().manual_seed(0), **sample).frames
    assert not hasattr(fresh, "load_lora_weights")  # when diffusers adds it, test it here
    exec(trainer.adapter.lora_load_code(str(tmp_path)), {"pipe": fresh})  # the model card's loading line
    reloaded = fresh(generator=torch.Generator().manual_seed(0), **sample).frames
    assert np.abs(reloaded - base).mean() > 1e-4
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_is_exact(_base, rows, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(_base), [video_blueness], rows, tmp_path, **I2V)


@pytest.mark.slow  # the saved pipeline encodes at the published text lengths
def test_trains_from_the_command_line_with_the_shipped_recipe(pipeline_dir, tmp_path):
    """Flow-Factory's I2V layout (a jsonl of prompts and image paths) trains with the shipped recipe; only the model,
    the sizes, the reward (PickScore on frames there) and the run length change."""
    from trl_guard.scripts.grpo import main as grpo_main

    prompts = [f'a sign that reads "{i}"' for i in range(4)]
    rows = write_first_frame_jsonl(tmp_path / "sharegpt4o_image_mini", prompts)
    trainer = grpo_main(
        [
            "--config", "examples/recipes/hunyuanvideo15_i2v_guard.yaml",
            "--model_name_or_path", pipeline_dir,
            "--model_init_kwargs", "{}",
            "--dataset_name", str(rows),
            "--eval_dataset_name", str(rows),
            "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.video_blueness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_frames", "5", "--num_inference_steps", "3",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.pipeline, HunyuanVideo15ImageToVideoPipeline)
    assert trainer.args.guidance_scale == 6.0 and trainer.adapter.uses_cfg
    parts = trainer.adapter.lora_parts
    assert set(parts["transformer"].peft_config["default"].target_modules) == set(HUNYUANVIDEO15_ATTENTION_PROJECTIONS)
    assert any(
        "attn.add_q_proj.lora_A" in key for key in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    )


def test_fsdp2_wraps_every_block_around_the_default_targets(_base):
    """`examples/accelerate_configs/fsdp2.yaml` wraps the transformer's `_no_split_modules`: the patch embedding, the
    text refiner and every dual-stream block, and every default LoRA target sits inside one of them. The image
    projection (`image_embedder`) is not a target and stays in the root unit, as in text-to-video."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    transformer = _base.transformer
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    wrapped = [name for name, module in transformer.named_modules() if policy(module)]
    blocks = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    assert wrapped == ["x_embedder", "context_embedder", *blocks]
    targets = [
        n for n, _ in transformer.named_modules() if any(n.endswith(t) for t in HUNYUANVIDEO15_ATTENTION_PROJECTIONS)
    ]
    assert {n for n in targets if n.startswith("transformer_blocks.")} == {
        f"{b}.{t}" for b in blocks for t in HUNYUANVIDEO15_ATTENTION_PROJECTIONS
    }
    assert all(any(name.startswith(f"{unit}.") for unit in wrapped) for name in targets)
    assert HunyuanVideo15I2VAdapter.fsdp2_refusal is None


def test_a_dataset_without_first_frames_is_refused_before_loading(pipeline_dir, rows, tmp_path, monkeypatch):
    import trl_guard.preflight

    monkeypatch.setattr(trl_guard.preflight, "load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="HunyuanVideo15ImageToVideoPipeline is conditioned on a 'image' column"):
        make_trainer(pipeline_dir, [video_blueness], rows.remove_columns("image"), tmp_path, **I2V)
    missing = Dataset.from_dict({"prompt": rows["prompt"], "image": [first_frame(0), None, *rows["image"][2:]]})
    with pytest.raises(ValueError, match=r"\['image'\]\[1\] is missing"):
        make_trainer(pipeline_dir, [video_blueness], missing, tmp_path, **I2V)


def test_pipelines_and_rows_it_cannot_take_are_refused(_base):
    blind = HunyuanVideo15ImageToVideoPipeline(**{**_base.components, "image_encoder": None})
    with pytest.raises(ValueError, match="no image_encoder: the transformer attends to SigLIP states"):
        get_adapter(blind)
    transformer = HunyuanVideo15Transformer3DModel.from_config(_base.transformer.config, in_channels=8)
    wrong = HunyuanVideo15ImageToVideoPipeline(**{**_base.components, "transformer": transformer})
    with pytest.raises(ValueError, match="takes 8 input channels, but HunyuanVideo15ImageToVideoPipeline feeds it 9"):
        get_adapter(wrong)
    rescaled = copy.copy(_base)
    rescaled.guider = ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.7)
    with pytest.raises(NotImplementedError, match="guidance_rescale"):
        get_adapter(rescaled)
    with pytest.raises(TypeError, match=r"cast_column\('image', datasets.Image\(\)\)"):
        configured(copy.deepcopy(_base)).encode_conditions({"image": ["a.png"]})


def test_the_published_record_is_text_to_videos_with_the_i2v_transformer_and_siglip():
    """The image-to-video transformer's values are exactly HunyuanVideo15Transformer3DModel's defaults (whose
    `task_type` default is "i2v"); everything else but the SigLIP tower is text-to-video's."""
    defaults = {
        k: v.default
        for k, v in inspect.signature(HunyuanVideo15Transformer3DModel.__init__).parameters.items()
        if k != "self"
    }
    assert dict(HUNYUANVIDEO15_480P_I2V["transformer"].values) == defaults
    components = HUNYUANVIDEO15_480P_I2V.components
    assert {k for k in components if components[k] is not HUNYUANVIDEO15_480P_T2V.components.get(k)} == {
        "transformer",
        "image_encoder",
        "pipeline",
    }
    siglip = HUNYUANVIDEO15_480P_I2V["image_encoder"]
    assert siglip["hidden_size"] == defaults["image_embed_dim"]
    assert (siglip["image_size"] // siglip["patch_size"]) ** 2 == 729  # the pipeline's vision_num_semantic_tokens


@pytest.mark.slow  # ~1 min: the real-width text encoder, one 2048-wide block, one SigLIP-so400m-wide layer
def test_real_widths_sample_train_save_and_reload(tmp_path):
    """The 480p image-to-video checkpoint's real widths (`HUNYUANVIDEO15_480P_I2V`: 2048-wide blocks, 65 input
    channels, SigLIP so400m's 729 tokens of 1152 at 384 px, the 32-channel VAE at 16x / 4x) with one dual-stream block
    and one SigLIP layer: sample from a first frame with CFG, one LoRA step on the default targets, save, and load the
    LoRA with the model card's line (`transformer.load_lora_adapter`): it gives the trained policy's velocity."""
    real = HUNYUANVIDEO15_480P_I2V
    pipe = build_real_width_hunyuanvideo15_pipeline(seed=0, image_to_video=True)
    assert isinstance(pipe, HunyuanVideo15ImageToVideoPipeline) and pipe.transformer.config.task_type == "i2v"
    assert pipe.transformer.config.in_channels == 2 * pipe.vae.config.latent_channels + 1 == 65
    assert pipe.image_encoder.config.hidden_size == pipe.transformer.config.image_embed_dim == 1152
    adapter = get_adapter(pipe)
    adapter.configure(SamplingSettings(32, 32, real["pipeline"]["guidance_scale"], num_frames=FRAMES))
    assert adapter.latent_shape() == (32, 2, 2, 2)
    prompt = conditioned(adapter, PROMPTS[1:], [first_frame(0, width=48)])
    assert prompt.tensors["image_embeds"].shape == (1, 729, 1152)
    assert prompt.tensors["first_frame_latents"].shape == (1, 32, 1, 2, 2)
    negative = adapter.encode_prompts([""])
    adapter.add_lora(lora_config(target_modules=None, r=4, lora_alpha=8))
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (video,) = adapter.decode(sample_ode(adapter, prompt, negative, latents, adapter.sigmas(2)))
    assert len(video) == FRAMES and video[0].size == (32, 32)

    trainable = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    sigma = torch.tensor([0.8])
    adapter.predict_velocity(latents, sigma, prompt, negative).square().mean().backward()
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    changed = {n for n, p in trainable.items() if not torch.equal(before[n], p)}
    # B starts at zero: only Bs move (the only block's text-query and text-output Bs get no gradient: the last block's
    # text stream is discarded)
    assert changed and all(".lora_B." in n for n in changed)
    assert "transformer_blocks.0.attn.to_q.lora_B.default.weight" in changed
    adapter.save_lora(tmp_path)
    with torch.no_grad():
        trained = adapter.predict_velocity(latents, sigma, prompt, negative)
        adapter.denoiser.delete_adapters("default")
        base = adapter.predict_velocity(latents, sigma, prompt, negative)
        exec(adapter.lora_load_code(str(tmp_path)), {"pipe": pipe})  # the model card's loading line
        reloaded = adapter.predict_velocity(latents, sigma, prompt, negative)
    assert (trained - base).abs().max() > 1e-4
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
