"""FLUX.1 Kontext (image editing) through the adapter, the trainer and the command line: sampling equals
`FluxKontextPipeline.__call__`, each row is conditioned on its own source image (encoded once), rewards receive the
sources, training is on-policy on its first pass and resumes exactly, and the LoRA loads with the pipeline."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import blueness
from datasets import Dataset
from diffusers import FluxKontextPipeline
from helpers import logged, make_trainer, resume_mid_round
from PIL import Image
from safetensors.torch import load_file

from trl_guard.adapters import FluxKontextAdapter, PromptEmbeddings, SamplingSettings, get_adapter
from trl_guard.conditioning import PromptEncoder
from trl_guard.rewards import ClipScoreReward, ImageSimilarityReward
from trl_guard.rollout import sample_ode
from trl_guard.testing import build_tiny_clip, build_tiny_flux_kontext_pipeline

KONTEXT = dict(guidance_scale=2.5, noise_level=0.9)


def source_image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def _base_kontext_pipeline():
    return build_tiny_flux_kontext_pipeline(seed=0)


@pytest.fixture
def tiny_kontext_pipeline(_base_kontext_pipeline):
    return copy.deepcopy(_base_kontext_pipeline)


@pytest.fixture
def edits():
    """8 instructions on 4 source images: rows 2k and 2k+1 share image k, rows 0 and 4 share their instruction."""
    prompts = [f"edit number {i % 4}" for i in range(8)]
    return Dataset.from_dict({"prompt": prompts, "image": [source_image(i // 2) for i in range(8)]})


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


@pytest.mark.parametrize("true_cfg_scale", [1.0, 2.0])
def test_adapter_sampling_matches_the_pipeline(tiny_kontext_pipeline, true_cfg_scale):
    pipe = tiny_kontext_pipeline
    adapter = get_adapter(pipe)
    assert isinstance(adapter, FluxKontextAdapter)
    adapter.configure(SamplingSettings(32, 32, 2.5, true_cfg_scale=true_cfg_scale, max_sequence_length=16))
    prompts, sources = ["make it red", "add a cat"], [source_image(0), source_image(1, size=48)]
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    negative = adapter.encode_prompts([""]) if true_cfg_scale > 1 else None
    sigmas = adapter.sigmas(4)

    def ours(images):
        text = adapter.encode_prompts(prompts)
        conditioning = PromptEmbeddings({**text.tensors, **adapter.encode_conditions({"image": images}).tensors})
        return sample_ode(adapter, conditioning, negative, latents.clone(), sigmas)

    cfg = dict(negative_prompt="", true_cfg_scale=true_cfg_scale) if true_cfg_scale > 1 else {}
    reference = pipe(
        prompt=prompts,
        image=[s.resize((32, 32), Image.LANCZOS) for s in sources],  # what the adapter does to a 48 px source
        height=32,
        width=32,
        max_area=32 * 32,
        _auto_resize=False,  # keep the source at the training resolution, as Flow-GRPO's training does
        num_inference_steps=4,
        guidance_scale=2.5,
        max_sequence_length=16,
        latents=latents.clone(),
        output_type="pil",
        **cfg,
    ).images
    edited = ours(sources)
    # within 1.5/255, as for FLUX: batched true CFG rounds differently from the pipeline's two calls
    np.testing.assert_allclose(pixels(adapter.decode(edited)), pixels(reference), atol=1.5)
    # the source image is conditioning, not decoration: other sources give other edits (float32 noise is ~1e-7; the
    # tiny random transformer attends to them only weakly, about 1e-3)
    change = (ours([source_image(2), source_image(3)]) - edited).abs().mean() / edited.abs().mean()
    assert change > 1e-4


def test_each_distinct_source_is_encoded_once_and_conditions_its_rows(tiny_kontext_pipeline, edits):
    adapter = get_adapter(tiny_kontext_pipeline)
    adapter.configure(SamplingSettings(32, 32, 2.5, max_sequence_length=16))
    calls = []
    encode = adapter.encode_conditions
    adapter.encode_conditions = lambda columns: calls.append(len(columns["image"])) or encode(columns)
    rows = PromptEncoder(adapter, torch.device("cpu")).rows(edits["prompt"], {"image": edits["image"]})
    assert calls == [4]  # 8 rows, 4 distinct images (each row decodes to a new PIL object)
    image_latents = rows.tensors["image_latents"]
    assert image_latents.shape == (8, *adapter.latent_shape())
    assert torch.equal(image_latents[0], image_latents[1]) and not torch.equal(image_latents[0], image_latents[2])
    # rows 0 and 4: the same instruction on different images
    text = rows.tensors["encoder_hidden_states"]
    assert torch.equal(text[0], text[4]) and not torch.equal(image_latents[0], image_latents[4])


@pytest.mark.parametrize("loss_type", ["flow_grpo", "grpo_guard"])
def test_training_is_on_policy_and_rewards_see_the_sources(tiny_kontext_pipeline, edits, loss_type, tmp_path):
    seen = []

    def source_blueness(prompts, images, image, **kwargs):
        seen.extend(zip(prompts, (np.asarray(s).tobytes() for s in image)))
        return blueness(prompts, images)

    trainer = make_trainer(
        tiny_kontext_pipeline,
        [source_blueness],
        edits,
        tmp_path,
        loss_type=loss_type,
        steps_per_generation=1,
        max_steps=2,
        **KONTEXT,
    )
    trainer.train()
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        assert all(v == 0.0 for v in logged(trainer, key)), key
    assert all(np.isfinite(logged(trainer, "loss"))) and logged(trainer, "timestep/01/grad_norm")
    # every sample was scored next to its own row's source image
    rows = {(p, np.asarray(s).tobytes()) for p, s in zip(edits["prompt"], edits["image"])}
    assert len(seen) == 2 * 8 and set(seen) <= rows
    # the evaluation grid pairs each source (left) with its edit (right)
    trainer.evaluate(eval_dataset=edits.select([0, 2]))
    grid = Image.open(tmp_path / "eval_images" / f"step-{trainer.state.global_step:06d}.png")
    assert grid.size == (2 * 64, 32)
    assert np.array_equal(np.asarray(grid.crop((64, 0, 96, 32))), np.asarray(source_image(1)))


def test_resume_in_the_middle_of_a_round_is_exact(_base_kontext_pipeline, edits, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(_base_kontext_pipeline), [blueness], edits, tmp_path, **KONTEXT)


def test_lora_loads_with_flux_kontext_pipeline(_base_kontext_pipeline, edits, tmp_path):
    folder = tmp_path / "model"
    _base_kontext_pipeline.save_pretrained(folder)
    trainer = make_trainer(str(folder), [blueness], edits, tmp_path / "run", max_steps=2, **KONTEXT)
    trainer.train()
    trainer.save_model()
    sample = dict(
        prompt="edit number 1",
        image=source_image(0),
        height=32,
        width=32,
        max_area=32 * 32,
        _auto_resize=False,
        num_inference_steps=4,
        guidance_scale=2.5,
        max_sequence_length=16,
        output_type="np",
    )
    trained = trainer.pipeline(generator=torch.Generator().manual_seed(0), **sample).images
    fresh = FluxKontextPipeline.from_pretrained(folder)
    base = fresh(generator=torch.Generator().manual_seed(0), **sample).images
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh(generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


def test_a_dataset_without_source_images_is_refused_before_training(tiny_kontext_pipeline, edits, tmp_path):
    with pytest.raises(ValueError, match=r"'image' column besides 'prompt'.*train_dataset has none"):
        make_trainer(tiny_kontext_pipeline, [blueness], edits.remove_columns("image"), tmp_path, **KONTEXT)
    paths = Dataset.from_dict({"prompt": edits["prompt"], "image": ["a.png"] * 8})
    with pytest.raises(ValueError, match=r"cast_column\('image', datasets.Image\(\)\)"):
        make_trainer(tiny_kontext_pipeline, [blueness], paths, tmp_path, **KONTEXT)


def test_a_folder_model_is_checked_before_it_loads(_base_kontext_pipeline, edits, tmp_path, monkeypatch):
    import trl_guard.trainer

    folder = tmp_path / "model"
    _base_kontext_pipeline.save_pretrained(folder)
    monkeypatch.setattr(trl_guard.preflight, "load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="FluxKontextPipeline is conditioned on a 'image' column"):
        make_trainer(str(folder), [blueness], edits.remove_columns("image"), tmp_path / "run", **KONTEXT)


def test_image_path_columns_of_prompt_files(tmp_path):
    from trl_guard.scripts.grpo import load_prompts

    source_image(0).save(tmp_path / "a.png")
    rows = [{"prompt": "edit", "image": "a.png"}, {"prompt": "edit", "image": "b.png"}]
    (tmp_path / "partial.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FileNotFoundError, match="1 files that do not exist, for example 'b.png'"):
        load_prompts(str(tmp_path / "partial.jsonl"))
    (tmp_path / "images.jsonl").write_text(json.dumps(rows[0]))
    (loaded,) = load_prompts(str(tmp_path / "images.jsonl"))["image"]
    assert np.array_equal(np.asarray(loaded), np.asarray(source_image(0)))
    (tmp_path / "ids.jsonl").write_text(json.dumps({"prompt": "a cat", "image": "coco-000123"}))
    assert load_prompts(str(tmp_path / "ids.jsonl"))["image"] == ["coco-000123"]  # not paths: left alone


def test_image_similarity_reward(tmp_path):
    reward = ImageSimilarityReward(build_tiny_clip(str(tmp_path / "clip")))
    a, b = source_image(0), source_image(1)
    same, other = reward(["x", "x"], [a, a], image=[a.copy(), b])
    assert same == pytest.approx(1.0, abs=1e-5) and other < 0.999
    with pytest.raises(ValueError, match="source image"):
        reward(["x"], [a])
    # model rewards that name no column ignore the dataset's columns, the source image included
    assert len(ClipScoreReward(build_tiny_clip(str(tmp_path / "clip")))(["x"], [a], image=[b], tag=["counting"])) == 1


def test_trains_from_the_command_line_with_the_shipped_recipe(_base_kontext_pipeline, tmp_path, monkeypatch):
    """The official counting-edit layout (a jsonl of instructions and image paths relative to it) trains with the
    shipped recipe; only the model, the sizes and the count reward (a server there, a local function here) change."""
    from trl_guard.rewards import clip
    from trl_guard.scripts.grpo import main as grpo_main

    model_dir = tmp_path / "model"
    _base_kontext_pipeline.save_pretrained(model_dir)
    monkeypatch.setattr(clip, "CLIP_MODEL", build_tiny_clip(str(tmp_path / "clip")))  # image_similarity's default
    data = tmp_path / "counting_edit"
    (data / "generated_images").mkdir(parents=True)
    with open(data / "train_metadata.jsonl", "w") as f:
        for i in range(4):
            source_image(i).save(data / "generated_images" / f"image_{i}.png")
            row = {
                "tag": "counting",
                "include": [{"class": "clock", "count": 2}],
                "image": f"generated_images/image_{i}.png",
            }
            f.write(json.dumps({"prompt": f"Change the number of clock in the image to {i}.", **row}) + "\n")
    trainer = grpo_main(
        [
            "--config", "examples/recipes/flux_kontext_counting_edit_guard.yaml",
            "--model_name_or_path", str(model_dir),
            "--model_init_kwargs", "{}",
            "--dataset_name", str(data / "train_metadata.jsonl"),
            "--eval_dataset_name", str(data / "train_metadata.jsonl"),
            "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.blueness", "image_similarity",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_inference_steps", "3", "--max_sequence_length", "16",
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.pipeline, FluxKontextPipeline)
    similarity = logged(trainer, "rewards/image_similarity/mean")
    assert similarity and -1 <= similarity[0] <= 1
    assert any("lora_A" in key for key in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
