"""Wan image-to-video (Wan2.1 I2V with its CLIP image encoder, Wan2.2 I2V A14B with two experts) through the adapter,
the trainer and the command line: sampling equals `WanImageToVideoPipeline.__call__` with and without CFG, each row
starts from its own first frame (encoded once per round), rewards and the evaluation grid see the first frames,
training is exactly on-policy on its first pass with every algorithm family, the LoRA loads with the pipeline's
`load_lora_weights`, a mid-round resume is exact, the shipped recipes train, FSDP2 wraps each block, and the real
widths run.

`WanImageToVideoPipeline` calls ftfy to clean prompts even when it is not installed (then it fails); the adapter
cleans prompts itself as `WanPipeline` does. Where ftfy is missing, the pipeline's own calls below get an identity
stand-in (`_ftfy_for_the_pipeline`), which is what ftfy does to these ASCII prompts."""

import copy
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from builders.wan_i2v import (
    WAN21_I2V_14B,
    WAN22_I2V_A14B,
    build_tiny_wan22_i2v_pipeline,
    build_tiny_wan_i2v_pipeline,
    build_wan_i2v_pipeline_at_real_width,
)
from conftest import blueness
from datasets import Dataset
from diffusers import WanImageToVideoPipeline
from diffusers.pipelines.wan import pipeline_wan_i2v
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
from trl_guard.adapters.wan22 import LORA_WEIGHT_NAMES
from trl_guard.adapters.wan_i2v import WAN_I2V_LORA_TARGETS, Wan22I2VAdapter, WanI2VAdapter, clean_prompt
from trl_guard.conditioning import PromptEncoder
from trl_guard.rollout import sample_ode
from trl_guard.testing import build_tiny_wan_pipeline

PROMPTS = ["a red cat", "two blue dogs"]
FRAMES = 5  # two latent frames
# The tiny 4-step Euler grid (shift 3) has timesteps 1000, 857.7, 602.2, 8.9: a boundary of 0.7 gives each expert two.
BOUNDARY = 0.7
I2V = dict(num_frames=FRAMES, peft_config=lora_config(target_modules=None))
SAMPLE = dict(height=32, width=32, num_frames=FRAMES, num_inference_steps=4, max_sequence_length=16)


def first_frame(seed: int, size: int = 32) -> Image.Image:
    return random_image(seed, size, size)


def video_blueness(prompts, images, **kwargs):
    return [sum(blueness([p] * len(frames), frames)) / len(frames) for p, frames in zip(prompts, images)]


@pytest.fixture(autouse=True)
def _ftfy_for_the_pipeline(monkeypatch):
    try:
        import ftfy  # noqa: F401
    except ImportError:
        monkeypatch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


@pytest.fixture(scope="module")
def _bases():
    return {
        "wan21": build_tiny_wan_i2v_pipeline(seed=0),
        "wan22": build_tiny_wan22_i2v_pipeline(boundary_ratio=BOUNDARY),
    }


@pytest.fixture
def pipelines(_bases):
    """A fresh copy of a tiny pipeline by name (training mutates the transformers)."""
    return lambda name: copy.deepcopy(_bases[name])


@pytest.fixture(scope="module")
def pipeline_dirs(_bases, tmp_path_factory):
    folders = {}
    for name, pipe in _bases.items():
        folders[name] = str(tmp_path_factory.mktemp(f"tiny-{name}-i2v"))
        pipe.save_pretrained(folders[name])
    return folders


@pytest.fixture
def rows():
    """8 prompts on 4 first frames: rows 2k and 2k+1 share image k, rows 0 and 4 share their prompt."""
    return Dataset.from_dict(
        {"prompt": [f"prompt number {i % 4}" for i in range(8)], "image": [first_frame(i // 2) for i in range(8)]}
    )


def configured(pipe, guidance_scale=1.0, guidance_scale_2=None):
    adapter = get_adapter(pipe)
    adapter.configure(
        SamplingSettings(
            32, 32, guidance_scale, max_sequence_length=16, num_frames=FRAMES, guidance_scale_2=guidance_scale_2
        )
    )
    return adapter


def conditioned(adapter, prompts, images) -> PromptEmbeddings:
    text = adapter.encode_prompts(prompts).tensors
    return PromptEmbeddings({**text, **adapter.encode_conditions({"image": images}).tensors})


@pytest.mark.parametrize(
    ("name", "guidance_scale", "guidance_scale_2"),
    [("wan21", 1.0, None), ("wan21", 5.0, None), ("wan22", 1.0, None), ("wan22", 3.5, 2.0)],
)
def test_sampling_matches_the_pipeline(name, guidance_scale, guidance_scale_2, pipelines):
    pipe = pipelines(name)
    adapter = configured(pipe, guidance_scale, guidance_scale_2)
    assert type(adapter) is {"wan21": WanI2VAdapter, "wan22": Wan22I2VAdapter}[name]
    sources = [first_frame(0), first_frame(1, size=48)]  # the second is resized to 32 x 32, as the pipeline does
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert adapter.latent_shape() == (4, 2, 4, 4)  # the VAE's channels: the transformer's 12 add mask and condition
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    sigmas = adapter.sigmas(4)
    conditioning = conditioned(adapter, PROMPTS, sources)
    # Wan2.1 I2V attends to CLIP states of the first frame, Wan2.2 I2V has no image encoder
    assert ("encoder_hidden_states_image" in conditioning.tensors) == (name == "wan21")
    final = sample_ode(adapter, conditioning, negative, latents.clone(), sigmas)
    videos = adapter.decode(final)

    pipe.set_progress_bar_config(disable=True)
    cfg = dict(negative_prompt="", guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2)
    for i in range(2):  # the pipeline takes one first frame per call
        call = dict(image=sources[i], prompt=PROMPTS[i], latents=latents[i : i + 1].clone(), **cfg, **SAMPLE)
        reference = pipe(output_type="latent", **call).frames
        torch.testing.assert_close(final[i : i + 1], reference, rtol=0, atol=1e-5)  # batch-of-2 rounding, ~1e-6
    frames = pipe(output_type="np", **call).frames[0]  # the last row's video, decoded by the pipeline
    ours = np.stack([np.asarray(frame, dtype=np.float32) / 255 for frame in videos[-1]])
    assert ours.shape == frames.shape == (FRAMES, 32, 32, 3)
    assert np.abs(ours - frames).max() <= 1.5 / 255  # PIL's 8-bit rounding
    # the first frame conditions the video: other first frames give other videos
    others = conditioned(adapter, PROMPTS, [first_frame(2), first_frame(3)])
    others = sample_ode(adapter, others, negative, latents.clone(), sigmas)
    assert (others - final).abs().mean() > 1e-3 * final.abs().mean()


def test_the_condition_is_the_masked_first_frame_and_clip_states_reach_the_transformer(pipelines, monkeypatch):
    pipe = pipelines("wan21")
    adapter = configured(pipe)
    source = first_frame(0)
    condition = adapter.encode_conditions({"image": [source]}).tensors
    latents = condition["condition_latents"]
    assert latents.shape == (1, 4 + 4, 2, 4, 4) and latents.dtype == torch.float32
    mask = latents[:, :4]
    assert torch.equal(mask[:, :, 0], torch.ones_like(mask[:, :, 0])) and not mask[:, :, 1:].any()
    # the CLIP tower's penultimate hidden states: (1 + (32/8)^2) tokens of its width
    states = condition["encoder_hidden_states_image"]
    assert states.shape == (1, 17, 16)
    kwargs, noise = denoiser_kwargs(adapter, pipe.transformer, condition)
    assert torch.equal(kwargs["hidden_states"], torch.cat([noise, latents], dim=1))  # channels: noise, mask, frame
    assert torch.equal(kwargs["encoder_hidden_states_image"], states)
    assert kwargs["timestep"].tolist() == [500.0]
    # the prompts are cleaned as the pipeline cleans them, whitespace and HTML entities included, and encoded as the
    # pipeline encodes them; the adapter needs no ftfy (the pipeline's own encoding fails without it)
    assert clean_prompt("  a  red &amp;amp; blue\tcat ") == "a red & blue cat"
    with torch.no_grad():  # as the pipeline's __call__ runs it
        reference, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False, max_sequence_length=16)
    monkeypatch.delattr(pipeline_wan_i2v, "ftfy", raising=False)
    with pytest.raises(NameError, match="ftfy"):
        pipe.encode_prompt("a cat", do_classifier_free_guidance=False, max_sequence_length=16)
    text = adapter.encode_prompts(["a cat"])
    assert torch.equal(text.tensors["encoder_hidden_states"], reference)
    torch.testing.assert_close(
        adapter.encode_prompts([" a   cat "]).tensors["encoder_hidden_states"], text.tensors["encoder_hidden_states"]
    )


def test_each_distinct_first_frame_is_encoded_once_per_round(pipelines, rows):
    adapter = configured(pipelines("wan21"))
    calls = []
    encode = adapter._first_frame_condition
    adapter._first_frame_condition = lambda images: calls.append(len(images)) or encode(images)
    conditioning = PromptEncoder(adapter, torch.device("cpu")).rows(rows["prompt"], {"image": rows["image"]})
    assert calls == [1] * 4  # 8 rows, 4 distinct first frames (each row decodes to a new PIL object)
    latents, states = conditioning.tensors["condition_latents"], conditioning.tensors["encoder_hidden_states_image"]
    assert latents.shape[0] == states.shape[0] == 8
    assert torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])
    text = conditioning.tensors["encoder_hidden_states"]  # rows 0 and 4: one prompt, two first frames
    assert torch.equal(text[0], text[4]) and not torch.equal(latents[0], latents[4])


@pytest.mark.parametrize(("name", "loss_type"), [("wan21", "grpo_guard"), ("wan22", "flow_grpo")])
def test_training_is_on_policy_and_rewards_and_the_grid_see_the_first_frames(
    name, loss_type, pipelines, rows, tmp_path
):
    seen = []

    def first_frame_blueness(prompts, images, image, **kwargs):
        seen.extend(zip(prompts, (np.asarray(s).tobytes() for s in image)))
        return video_blueness(prompts, images)

    trainer = make_trainer(
        pipelines(name),
        [first_frame_blueness],
        rows,
        tmp_path,
        loss_type=loss_type,
        steps_per_generation=1,
        max_steps=2,
        guidance_scale=4.0,
        noise_level=0.7,
        **I2V,
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        assert all(v == 0.0 for v in logged(trainer, key)), key
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # every video was scored next to its own row's first frame
    pairs = {(p, np.asarray(s).tobytes()) for p, s in zip(rows["prompt"], rows["image"])}
    assert len(seen) == 2 * 8 and set(seen) <= pairs
    # the evaluation grid: per row, the first frame, then the video's frames
    trainer.evaluate(eval_dataset=rows.select([0, 2]))
    grid = Image.open(tmp_path / "eval_images" / f"step-{trainer.state.global_step:06d}.png")
    assert grid.size == ((1 + FRAMES) * 32, 2 * 32)
    assert np.array_equal(np.asarray(grid.crop((0, 32, 32, 64))), np.asarray(first_frame(1)))
    assert (tmp_path / "eval_images" / f"step-{trainer.state.global_step:06d}.gif").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan21", "wan22"])
@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft"])
def test_every_algorithm_family_trains_it(name, loss_type, pipelines, rows, tmp_path):
    """An SDE-ratio loss and a forward-process one (whose noised samples straddle Wan2.2's boundary): exactly
    on-policy on the first pass, and the LoRA learns."""
    schedule = dict(noise_level=0.7) if loss_type != "nft" else {}
    trainer = make_trainer(
        pipelines(name),
        [video_blueness],
        rows,
        tmp_path,
        loss_type=loss_type,
        steps_per_generation=1,
        **schedule,
        **I2V,
    )
    train_on_policy(trainer)


@pytest.mark.parametrize("name", ["wan21", "wan22"])
def test_lora_loads_with_the_pipelines_loader(name, pipeline_dirs, rows, tmp_path):
    trainer = make_trainer(pipeline_dirs[name], [video_blueness], rows, tmp_path / "run", guidance_scale=4.0, **I2V)
    trainer.train()
    trainer.save_model()
    files = {expert: weight for expert, weight in LORA_WEIGHT_NAMES.items() if expert in trainer.adapter.lora_parts}
    assert list(files) == (["transformer"] if name == "wan21" else ["transformer", "transformer_2"])
    sample = dict(image=first_frame(0), prompt="prompt number 1", guidance_scale=4.0, output_type="np", **SAMPLE)
    pipe = trainer.pipeline
    pipe.set_progress_bar_config(disable=True)
    trained = pipe(generator=torch.Generator().manual_seed(0), **sample).frames

    fresh = WanImageToVideoPipeline.from_pretrained(pipeline_dirs[name])
    fresh.set_progress_bar_config(disable=True)
    base = fresh(generator=torch.Generator().manual_seed(0), **sample).frames
    for expert, weight in files.items():
        assert all(k.startswith("transformer.blocks.") for k in load_file(tmp_path / "run" / weight))
        into = dict(load_into_transformer_2=True) if expert == "transformer_2" else {}
        fresh.load_lora_weights(str(tmp_path / "run"), weight_name=weight, **into)
    reloaded = fresh(generator=torch.Generator().manual_seed(0), **sample).frames
    assert np.abs(reloaded - base).mean() > 1e-4
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


@pytest.mark.parametrize("name", ["wan21", pytest.param("wan22", marks=pytest.mark.slow)])
def test_resume_in_the_middle_of_a_round_is_exact(name, _bases, rows, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(_bases[name]), [video_blueness], rows, tmp_path, guidance_scale=4.0, **I2V)


@pytest.mark.parametrize(
    ("recipe", "name"),
    [("examples/recipes/wan21_i2v_guard.yaml", "wan21"), ("examples/recipes/wan22_i2v_guard.yaml", "wan22")],
)
def test_trains_from_the_command_line_with_the_shipped_recipe(recipe, name, pipeline_dirs, tmp_path):
    """Flow-Factory's I2V layout (a jsonl of prompts and image paths) trains with the shipped recipe; only the model,
    the sizes, the reward (PickScore on frames there) and the run length change."""
    from trl_guard.scripts.grpo import main as grpo_main

    rows = write_first_frame_jsonl(tmp_path / "sharegpt4o_image_mini", [f"a scene number {i}" for i in range(4)])
    trainer = grpo_main(
        [
            "--config", recipe,
            "--model_name_or_path", pipeline_dirs[name],
            "--model_init_kwargs", "{}",
            "--dataset_name", str(rows),
            "--eval_dataset_name", str(rows),
            "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.video_blueness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_frames", "5", "--max_sequence_length", "16",
            "--num_inference_steps", "4",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.pipeline, WanImageToVideoPipeline)
    parts = trainer.adapter.lora_parts
    # Flow-Factory's Wan2.2 I2V run trains the high-noise expert only (`transformer.default`)
    assert list(parts) == ["transformer"]
    assert set(parts["transformer"].peft_config["default"].target_modules) == set(WAN_I2V_LORA_TARGETS)
    assert any("lora_A" in key for key in load_file(tmp_path / "out" / LORA_WEIGHT_NAMES["transformer"]))


def test_fsdp2_wraps_each_block_of_wan21_and_of_both_wan22_experts(_bases):
    """`examples/accelerate_configs/fsdp2.yaml` wraps the classes the transformer lists in `_no_split_modules`: each
    Wan block, and every default LoRA target (the image cross-attention's included) sits inside one. Wan2.2's two
    experts shard too (tests/test_wan22_fsdp2.py): the same policy wraps each block of both."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    transformer = _bases["wan21"].transformer
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    wrapped = [name for name, module in transformer.named_modules() if policy(module)]
    assert wrapped == [f"blocks.{i}" for i in range(len(transformer.blocks))]
    targets = [n for n, _ in transformer.named_modules() if any(n.endswith(t) for t in WAN_I2V_LORA_TARGETS)]
    assert len(targets) == len(WAN_I2V_LORA_TARGETS) * len(wrapped)
    assert all(any(name.startswith(f"{block}.") for block in wrapped) for name in targets)
    assert any(n.endswith("attn2.add_k_proj") for n, _ in transformer.named_modules())  # the image's, frozen
    assert WanI2VAdapter.fsdp2_refusal is None and Wan22I2VAdapter.fsdp2_refusal is None
    experts = get_adapter(_bases["wan22"]).denoiser
    policy = fsdp2_prepare_auto_wrap_policy(plugin, experts)
    wrapped = [name for name, module in experts.named_modules() if policy(module)]
    blocks = range(len(experts.transformer.blocks))
    assert wrapped == [f"{expert}.blocks.{i}" for expert in ("transformer", "transformer_2") for i in blocks]


def test_a_dataset_without_first_frames_is_refused_before_loading(pipeline_dirs, rows, tmp_path, monkeypatch):
    import trl_guard.preflight

    monkeypatch.setattr(trl_guard.preflight, "load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    for name in ("wan21", "wan22"):
        with pytest.raises(ValueError, match="WanImageToVideoPipeline is conditioned on a 'image' column"):
            make_trainer(pipeline_dirs[name], [video_blueness], rows.remove_columns("image"), tmp_path, **I2V)
        missing = Dataset.from_dict({"prompt": rows["prompt"], "image": [first_frame(0), None, *rows["image"][2:]]})
        with pytest.raises(ValueError, match=r"\['image'\]\[1\] is missing"):
            make_trainer(pipeline_dirs[name], [video_blueness], missing, tmp_path, **I2V)


def test_pipelines_it_cannot_drive_are_refused(_bases, pipelines):
    assert (
        type(get_adapter(_bases["wan21"])) is WanI2VAdapter and type(get_adapter(_bases["wan22"])) is Wan22I2VAdapter
    )
    # Wan2.2 TI2V-5B through this pipeline: per-token timesteps
    ti2v = pipelines("wan21")
    ti2v.register_to_config(expand_timesteps=True)
    with pytest.raises(
        NotImplementedError, match="per-token timesteps .*TI2V-5B.*train Wan2.1 I2V or Wan2.2 I2V A14B"
    ):
        get_adapter(ti2v)
    # a text-to-video transformer in the image-to-video pipeline
    t2v = WanImageToVideoPipeline(
        **{**_bases["wan22"].components, "transformer": build_tiny_wan_pipeline().transformer}
    )
    with pytest.raises(ValueError, match="takes 4 input channels, but WanImageToVideoPipeline feeds it 12"):
        get_adapter(t2v)
    # Wan2.1 I2V without its image encoder
    blind = WanImageToVideoPipeline(**{**_bases["wan21"].components, "image_encoder": None})
    with pytest.raises(ValueError, match="image_dim=16, Wan2.1 I2V.* no image_encoder"):
        get_adapter(blind)
    # rows must hold images
    adapter = configured(pipelines("wan21"))
    with pytest.raises(TypeError, match=r"cast_column\('image', datasets.Image\(\)\)"):
        adapter.encode_conditions({"image": ["a.png"]})


@pytest.mark.slow
@pytest.mark.parametrize("two_experts", [False, True], ids=["wan21-i2v-14b", "wan22-i2v-a14b"])
def test_real_widths_sample_train_save_and_reload(two_experts, tmp_path):
    """Wan2.1-I2V-14B (5120 wide, 36 input channels, ViT-H/14 image states of 1280 into `add_k_proj`) and
    Wan2.2-I2V-A14B (two such experts without image states) with one block each, in bfloat16: 2-step sampling from a
    first frame with CFG, one LoRA step, and the LoRA reloaded with `load_lora_weights`."""
    family = WAN22_I2V_A14B if two_experts else WAN21_I2V_14B
    pipe = build_wan_i2v_pipeline_at_real_width(two_experts=two_experts, num_layers=1)
    spec = family["transformer"]
    config = pipe.transformer.config
    assert config.num_attention_heads * config.attention_head_dim == 5120 and config.in_channels == spec["in_channels"]
    assert config.image_dim == spec["image_dim"] and pipe.text_encoder.config.d_model == config.text_dim == 4096
    adapter = get_adapter(pipe)
    adapter.configure(SamplingSettings(16, 16, 3.5, max_sequence_length=8))
    assert adapter.latent_shape() == (16, 1, 2, 2)
    prompt = conditioned(adapter, ["a cat"], [first_frame(0, size=24)])
    if not two_experts:  # 257 ViT-H/14 tokens at 224 px
        assert prompt.tensors["encoder_hidden_states_image"].shape == (1, 257, 1280)
    assert prompt.tensors["condition_latents"].shape == (1, 4 + 16, 1, 2, 2)
    negative = adapter.encode_prompts([""])
    adapter.add_lora(lora_config(target_modules=None, r=4, lora_alpha=8))
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (video,) = adapter.decode(sample_ode(adapter, prompt, negative, latents, adapter.sigmas(2)))
    assert len(video) == 1 and video[0].size == (16, 16)

    trainable = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    for p in trainable.values():
        p.data = p.data.float()  # LoRA weights train in float32, as the trainer keeps them
    before = {n: p.detach().clone() for n, p in trainable.items()}
    both = torch.cat([latents, latents])
    sigma = torch.tensor([0.95, 0.5])  # Wan2.2: one sample per expert
    adapter.predict_velocity(both, sigma, prompt.expand(2), negative).float().square().mean().backward()
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    changed = {n for n, p in trainable.items() if not torch.equal(before[n], p)}
    assert changed == {n for n in trainable if ".lora_B." in n}  # B starts at zero: every B moves, no A

    adapter.save_lora(tmp_path)
    for p in trainable.values():
        p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        trained = adapter.predict_velocity(both, sigma, prompt.expand(2), negative)
    for expert in adapter.lora_parts.values():
        expert.delete_adapters("default")
    pipe.load_lora_weights(str(tmp_path), adapter_name="default")
    if two_experts:
        pipe.load_lora_weights(
            str(tmp_path),
            weight_name=LORA_WEIGHT_NAMES["transformer_2"],
            adapter_name="default",
            load_into_transformer_2=True,
        )
    with torch.no_grad():
        reloaded = adapter.predict_velocity(both, sigma, prompt.expand(2), negative)
    torch.testing.assert_close(reloaded.float(), trained.float(), rtol=0, atol=0)
