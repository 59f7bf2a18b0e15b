"""Qwen-Image-Edit (Plus and the one-image pipeline) through the adapter, the trainer and the command line: sampling
equals the pipelines' `__call__` with one and two sources, with and without true CFG; the text embeddings are the
pipeline's own for each (instruction, sources) pair, each computed once; training is on-policy on its first pass and
learns, resume mid-round is exact, the LoRA loads with the pipeline, the shipped recipe trains, and the real
checkpoint's widths sample, train and reload.

The pipelines' own calls resize each source to a 1024 x 1024 area for the VAE (the adapter: to the training size), so
the comparisons set that area to the training one (`VAE_IMAGE_SIZE`, and the first edit pipeline's
`calculate_dimensions`)."""

import copy
import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from builders.qwenimage_edit import (
    QWEN_IMAGE_EDIT_REAL,
    build_real_width_qwenimage_edit_plus_pipeline,
    build_tiny_qwenimage_edit_plus_pipeline,
)
from conftest import blueness
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from datasets.info import DatasetInfo
from datasets.table import InMemoryTable
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from helpers import logged, lora_config, make_trainer, resume_mid_round
from PIL import Image
from safetensors.torch import load_file

from trl_guard import preflight
from trl_guard.adapters import PromptEmbeddings, SamplingSettings, get_adapter
from trl_guard.adapters.qwenimage_edit import QwenImageEditAdapter
from trl_guard.conditioning import PromptEncoder, content_key
from trl_guard.rewards import ImageSimilarityReward
from trl_guard.rollout import sample_ode
from trl_guard.testing import build_tiny_clip

#: Flow-Factory's Qwen-Image-Edit-Plus sampling: true CFG 4 (here against a one-space negative prompt).
EDIT = dict(
    true_cfg_scale=4.0, negative_prompt=" ", num_inference_steps=3, peft_config=lora_config(target_modules=None)
)


def source_image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def _base_edit_pipeline():
    return build_tiny_qwenimage_edit_plus_pipeline(seed=0)


@pytest.fixture
def tiny_edit_pipeline(_base_edit_pipeline):
    return copy.deepcopy(_base_edit_pipeline)


@pytest.fixture
def vae_at_training_size(monkeypatch):
    """The pipelines' VAE sources at the 32 x 32 training size, as the adapter encodes them."""
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 32 * 32)
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (32, 32, None))


@pytest.fixture
def edits():
    """8 instructions on 4 source images: rows 2k and 2k+1 share image k, rows 0 and 4 share their instruction."""
    prompts = [f"edit number {i % 4}" for i in range(8)]
    return Dataset.from_dict({"prompt": prompts, "image": [source_image(i // 2) for i in range(8)]})


def configured(pipeline, true_cfg_scale=1.0) -> QwenImageEditAdapter:
    adapter = get_adapter(pipeline)
    adapter.configure(SamplingSettings(32, 32, true_cfg_scale=true_cfg_scale, max_sequence_length=32))
    return adapter


def conditioning(adapter, prompts, images) -> PromptEmbeddings:
    text = adapter.encode_prompts(prompts)
    return PromptEmbeddings({**text.tensors, **adapter.encode_conditions({"image": images}).tensors})


def test_tiny_tokenizer_drops_exactly_the_template_prefix(tiny_edit_pipeline):
    pipe = tiny_edit_pipeline
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("sources", [1, 2])
def test_adapter_sampling_matches_the_plus_pipeline(sources, true_cfg_scale, tiny_edit_pipeline, vae_at_training_size):
    pipe = tiny_edit_pipeline
    adapter = configured(pipe, true_cfg_scale)
    assert isinstance(adapter, QwenImageEditAdapter)
    images = [source_image(i, size=48 - 16 * i) for i in range(sources)]  # 48 px and 32 px: resized to 32
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    negative = adapter.encode_prompts([" "]) if adapter.uses_cfg else None

    def ours(row_images):
        cond = conditioning(adapter, ["make it red"], [row_images])
        return sample_ode(adapter, cond, negative, latents.clone(), adapter.sigmas(3))

    final = ours(images)
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(negative_prompt=" ") if true_cfg_scale > 1 else {}
    kwargs = dict(height=32, width=32, num_inference_steps=3, true_cfg_scale=true_cfg_scale, **cfg)
    resized = [image.resize((32, 32), Image.LANCZOS) for image in images]  # what the adapter does to each source
    reference = pipe(image=resized, prompt="make it red", latents=latents.clone(), output_type="latent", **kwargs)
    torch.testing.assert_close(final, reference.images, rtol=0, atol=1e-5)
    decoded = np.asarray(adapter.decode(final)[0], dtype=np.float32) / 255
    pixels = pipe(image=resized, prompt="make it red", latents=latents.clone(), output_type="np", **kwargs).images[0]
    assert np.abs(decoded - pixels).max() <= 1.5 / 255  # PIL's 8-bit rounding
    # the sources condition the edit (the tiny random transformer attends to them weakly)
    change = (ours([source_image(7 + i) for i in range(sources)]) - final).abs().mean() / final.abs().mean()
    assert change > 1e-4


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_adapter_sampling_matches_the_one_image_edit_pipeline(
    true_cfg_scale, _base_edit_pipeline, vae_at_training_size
):
    pipe = QwenImageEditPipeline(**copy.deepcopy(_base_edit_pipeline).components)
    adapter = configured(pipe, true_cfg_scale)
    assert isinstance(adapter, QwenImageEditAdapter) and not adapter._plus
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    negative = adapter.encode_prompts([" "]) if adapter.uses_cfg else None
    final = sample_ode(
        adapter, conditioning(adapter, ["add a cat"], [source_image(0)]), negative, latents.clone(), adapter.sigmas(3)
    )
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(negative_prompt=" ") if true_cfg_scale > 1 else {}
    reference = pipe(
        image=source_image(0),
        prompt="add a cat",
        height=32,
        width=32,
        num_inference_steps=3,
        true_cfg_scale=true_cfg_scale,
        latents=latents.clone(),
        output_type="latent",
        **cfg,
    ).images
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one source image per row"):
        adapter.encode_conditions({"image": [[source_image(0), source_image(1)]]})


def test_text_embeddings_are_the_pipelines_for_each_prompt_and_sources(tiny_edit_pipeline):
    """The instruction is read after the sources: the same instruction on other sources has other embeddings, each
    equal to `encode_prompt` with the sources' 384 x 384 pictures."""
    adapter = configured(tiny_edit_pipeline)
    rows = [[source_image(0)], [source_image(1)], [source_image(0)]]
    cond = conditioning(adapter, ["make it red", "make it red", "add a cat"], rows)
    text, mask = adapter._text_states(cond)
    for row, (prompt, images) in enumerate(zip(["make it red", "make it red", "add a cat"], rows)):
        pictures = [image.resize((384, 384), Image.LANCZOS) for image in images]  # the pipeline's condition size
        expected, _ = tiny_edit_pipeline.encode_prompt(prompt, image=pictures)
        assert int(mask[row].sum()) == expected.shape[1]
        torch.testing.assert_close(text[row, : expected.shape[1]], expected[0], rtol=0, atol=1e-6)
    assert not torch.equal(text[0], text[1])


def test_context_parallel_keeps_the_text_a_multiple_of_the_degree(tiny_edit_pipeline):
    """Under context parallelism diffusers splits the text tokens in equal parts: the rows are padded (masked) to a
    multiple of the degree, and the velocity is the same as without."""
    adapter = configured(tiny_edit_pipeline)
    cond = conditioning(adapter, ["make it red", "add a small cat"], [[source_image(0)], [source_image(1)]])
    longest = int(adapter._text_states(cond)[1].sum(dim=1).max())
    multiple = next(m for m in (3, 4, 5) if longest % m)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = adapter.predict_velocity(latents, torch.full((2,), 0.7), cond, None)
        adapter.configure(
            SamplingSettings(32, 32, max_sequence_length=60, sequence_multiple=multiple)
        )  # 3, 4, 5 divide 60
        text, mask = adapter._text_states(cond)
        split = adapter.predict_velocity(latents, torch.full((2,), 0.7), cond, None)
    assert text.shape[1] % multiple == 0 and longest < text.shape[1] < longest + multiple
    assert int(mask.sum(dim=1).max()) == longest
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=1e-5)


def test_each_distinct_pair_is_encoded_once_and_rewards_see_the_sources(tiny_edit_pipeline, edits, tmp_path):
    """Over a training run with true CFG: one text encoding per distinct (instruction, source) of a round and one per
    source for the negative prompt, however many samples and denoiser calls use them; rewards get each sample's own
    source. Training is exactly on-policy on its first pass and moves the LoRA."""
    encodes = []
    encode_prompt = tiny_edit_pipeline.encode_prompt
    tiny_edit_pipeline.encode_prompt = lambda prompt, image, **kw: (
        encodes.append(prompt[0]) or encode_prompt(prompt, image, **kw)
    )
    seen = []

    def source_blueness(prompts, images, image, **kwargs):
        seen.extend(zip(prompts, (np.asarray(s).tobytes() for s in image)))
        return blueness(prompts, images)

    trainer = make_trainer(
        tiny_edit_pipeline, [source_blueness], edits, tmp_path, steps_per_generation=1, max_steps=2, **EDIT
    )
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        assert all(v == 0.0 for v in logged(trainer, key)), key
    assert all(np.isfinite(logged(trainer, "loss")))
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # 2 rounds of 2 groups: each round's rows are 2 (instruction, source) pairs; the 8 edits' pairs are all distinct
    pairs = {(p, np.asarray(s).tobytes()) for p, s in zip(edits["prompt"], edits["image"])}
    assert len(seen) == 2 * 8 and set(seen) <= pairs
    distinct_sources = {s for _, s in seen}
    assert encodes.count(" ") == len(distinct_sources)  # the negative prompt, once per source
    assert len(encodes) - encodes.count(" ") == len(set(seen))  # each pair once


def test_rows_of_several_sources_and_what_is_refused(tiny_edit_pipeline):
    adapter = configured(tiny_edit_pipeline)
    two = [[source_image(0), source_image(1)], [source_image(1), source_image(0)]]
    rows = PromptEncoder(adapter, torch.device("cpu")).rows(["a", "a"], {"image": two})
    assert rows.tensors["image_latents"].shape == (2, 2 * adapter.latent_shape()[0], 16)
    assert rows.tensors["condition_pixels"].shape == (2, 2, 384, 384, 3)
    assert not torch.equal(rows.tensors["image_latents"][0], rows.tensors["image_latents"][1])  # the order counts
    with pytest.raises(ValueError, match="1 and 2 source images"):
        adapter.encode_conditions({"image": [[source_image(0)], two[0]]})
    with pytest.raises(TypeError, match="holds a str"):
        adapter.encode_conditions({"image": ["a.png"]})


def test_content_key_makes_equal_lists_of_sources_one_key(tiny_edit_pipeline):
    """A dataset decodes new image objects for every row: lists of the same pictures in the same order share a key
    (and are encoded once), other pictures or another order do not."""
    a, b = source_image(0), source_image(1)
    key = content_key([a, b])
    assert key == content_key([a.copy(), b.copy()]) == content_key((a.copy(), b.copy()))
    assert len({key, content_key([b, a]), content_key([a]), content_key(a), content_key([a, source_image(2)])}) == 5
    adapter = configured(tiny_edit_pipeline)
    encoded = []
    encode_conditions = adapter.encode_conditions
    adapter.encode_conditions = lambda columns: encoded.append(columns["image"]) or encode_conditions(columns)
    rows = [[a, b], [a.copy(), b.copy()], [b, a], [a.copy(), b.copy()]]
    conditioning = PromptEncoder(adapter, torch.device("cpu")).rows(["x", "y", "x", "z"], {"image": rows})
    assert len(encoded) == 1 and [[id(s) for s in row] for row in encoded[0]] == [[id(a), id(b)], [id(b), id(a)]]
    latents = conditioning.tensors["image_latents"]
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[3])
    assert not torch.equal(latents[0], latents[2])


def source_lists(rows: int = 8) -> Dataset:
    """`rows` instructions, each on two sources: rows 2k and 2k+1 share the pictures (decoded apart), a
    `datasets.List(Image())` column."""
    lists = [[source_image(i // 2), source_image(10 + i // 2)] for i in range(rows)]
    return Dataset.from_dict({"prompt": [f"edit number {i}" for i in range(rows)], "image": lists})


def test_a_dataset_of_source_lists_trains_and_encodes_each_distinct_list_once(tiny_edit_pipeline, tmp_path):
    """Through the trainer with true CFG: the `image` column holds two sources per row; each distinct list of a
    round goes through `encode_conditions` once however many samples use it, rewards see each sample's list, the
    first pass is on-policy and the LoRA moves; the evaluation grid shows both sources next to the edit."""
    dataset = source_lists()
    assert isinstance(dataset.features["image"], List)
    seen = []

    def sources_blueness(prompts, images, image, **kwargs):
        assert all(isinstance(row, list) and len(row) == 2 for row in image)
        seen.extend(tuple(np.asarray(s).tobytes() for s in row) for row in image)
        return blueness(prompts, images)

    trainer = make_trainer(
        tiny_edit_pipeline,
        [sources_blueness],
        dataset,
        tmp_path,
        steps_per_generation=1,
        max_steps=1,
        eval_num_inference_steps=2,
        **EDIT,
    )
    encoded = []
    encode_conditions = trainer.adapter.encode_conditions
    trainer.adapter.encode_conditions = lambda columns: encoded.append(columns["image"]) or encode_conditions(columns)
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 1
    assert logged(trainer, "log_ratio_mean") == [0.0] and np.isfinite(logged(trainer, "loss")[0])
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # one round of 2 groups of 4 samples: one encoding, of each distinct list once
    assert len(seen) == 8 and len(encoded) == 1
    distinct = [tuple(np.asarray(s).tobytes() for s in row) for row in encoded[0]]
    assert len(distinct) == len(set(distinct)) and set(distinct) == set(seen)

    trainer.evaluate(source_lists(2))  # one grid entry per row: its 2 sources and the edit, 2 entries a row
    (grid,) = (tmp_path / "eval_images").glob("*.png")
    assert Image.open(grid).size == (2 * 3 * 32, 32)

    a, b = source_image(0, size=48), source_image(1)  # a source at another size is shown at the training size
    edit = Image.new("RGB", (32, 32), "red")
    (entry,) = trainer._grid_entries([edit], {"image": [[a, b]]})
    tiles = [np.asarray(entry.crop((32 * k, 0, 32 * (k + 1), 32))) for k in range(3)]
    assert entry.size == (96, 32)
    assert np.array_equal(tiles[0], np.asarray(a.resize((32, 32), Image.LANCZOS))) and np.array_equal(
        tiles[1], np.asarray(b)
    )
    assert np.array_equal(tiles[2], np.asarray(edit))


def test_preflight_takes_lists_of_sources_and_refuses_bad_ones(tiny_edit_pipeline, tmp_path, monkeypatch):
    a, b = source_image(0), source_image(1)
    check = preflight.check_condition_columns
    plus = "QwenImageEditPlusPipeline"
    check({"train_dataset": source_lists()}, plus)  # List(Image()), two per row
    transformed = Dataset.from_dict({"prompt": ["x"], "image": ["a.png"]}).with_transform(
        lambda batch: {"prompt": batch["prompt"], "image": [[a, b] for _ in batch["image"]]}
    )
    check({"train_dataset": transformed}, plus)  # lists of images its features do not declare
    refused = {
        "is an empty list: every row needs its source images": [[a], []],
        r"\[1\] is missing \(None\)": [[a], None],
        r"different numbers of source images \(row 0 has 1, row 1 has 2\).*filter": [[a], [a, b]],
        r"holds str entries.*cast_column\('image', datasets.List\(datasets.Image\(\)\)\)": [["a.png", "b.png"]],
        r"\[0\] is an empty list": [[]],  # no image anywhere: a list of nulls
    }
    for message, images in refused.items():
        dataset = Dataset.from_dict({"prompt": ["x"] * len(images), "image": images})
        with pytest.raises(ValueError, match=r"train_dataset\['image'\]" + ".*" + message):
            check({"train_dataset": dataset}, plus)
    # a missing image inside a list (only Arrow data can hold one), found in the second batch the check reads
    monkeypatch.setattr(preflight, "_LIST_CHECK_BATCH", 2)
    png = io.BytesIO()
    a.save(png, "PNG")
    encoded = {"bytes": png.getvalue(), "path": None}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    lists = pa.array([[encoded, encoded]] * 2 + [[encoded, None]], type=pa.list_(struct))
    table = InMemoryTable(pa.table({"prompt": ["x"] * 3, "image": lists}))
    holed = Dataset(
        table, info=DatasetInfo(features=Features({"prompt": Value("string"), "image": List(ImageFeature())}))
    )
    with pytest.raises(ValueError, match=r"\[2\] mixes images with a missing one"):
        check({"train_dataset": holed.select([1, 0, 2])}, plus)
    uneven = Dataset.from_dict({"prompt": ["x"] * 3, "image": [[a], [b], [a, b]]})
    with pytest.raises(ValueError, match=r"\(row 0 has 1, row 2 has 2\)"):  # counted over the batches
        check({"train_dataset": uneven}, plus)
    mixed = transformed.with_transform(lambda batch: {"prompt": batch["prompt"], "image": [[a, "b.png"]]})
    with pytest.raises(ValueError, match=r"\[0\] mixes images with str entries"):
        check({"eval_dataset": mixed}, plus)
    # the trainer runs the check before it builds anything
    counts = Dataset.from_dict({"prompt": ["x", "y"], "image": [[a], [a, b]]})
    with pytest.raises(ValueError, match="different numbers of source images"):
        make_trainer(
            tiny_edit_pipeline, [blueness], counts, tmp_path, num_generations=2, per_device_train_batch_size=2
        )


def test_a_prompt_file_names_several_sources_per_row(tmp_path):
    """A `.jsonl` row may list its sources' paths (relative to the file): each is read; a missing one is named."""
    from trl_guard.scripts.grpo import load_prompts

    (tmp_path / "images").mkdir()
    for i in range(3):
        source_image(i).save(tmp_path / "images" / f"{i}.png")
    rows = [{"prompt": "put 0 in 1", "image": ["images/0.png", "images/1.png"]}]
    rows.append({"prompt": "put 2 in 0", "image": ["images/2.png", str(tmp_path / "images" / "0.png")]})
    (tmp_path / "lists.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_prompts(str(tmp_path / "lists.jsonl"))
    assert isinstance(dataset.features["image"], List)
    for row, expected in zip(dataset["image"], [[0, 1], [2, 0]]):
        assert [np.asarray(image).tobytes() for image in row] == [
            np.asarray(source_image(i)).tobytes() for i in expected
        ]
    rows[1]["image"][1] = "images/missing.png"
    (tmp_path / "partial.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FileNotFoundError, match="1 files that do not exist, for example 'images/missing.png'"):
        load_prompts(str(tmp_path / "partial.jsonl"))
    (tmp_path / "ids.jsonl").write_text(json.dumps({"prompt": "a", "image": ["coco-1", "coco-2"]}))
    assert load_prompts(str(tmp_path / "ids.jsonl"))["image"] == [["coco-1", "coco-2"]]  # not paths: left alone


def test_image_similarity_scores_several_sources_by_their_mean(tmp_path):
    clip = build_tiny_clip(str(tmp_path / "clip"))
    reward, first = ImageSimilarityReward(clip), ImageSimilarityReward(clip, sources="first")
    a, b, c = source_image(0), source_image(1), source_image(2)
    to_a, to_b = reward(["x", "x"], [c, c], image=[a, b])  # one source per row: as before
    (both,) = reward(["x"], [c], image=[[a, b]])
    assert both == pytest.approx((to_a + to_b) / 2, abs=1e-5) and abs(to_a - to_b) > 1e-4
    # rows with one and with two sources in one batch; "first" compares with the first only
    assert reward(["x", "x"], [a, c], image=[[a], (a.copy(), b)]) == pytest.approx([1.0, both], abs=1e-5)
    assert first(["x"], [c], image=[[a, b]]) == pytest.approx([to_a], abs=1e-5)
    with pytest.raises(ValueError, match="empty list of source images"):
        reward(["x"], [c], image=[[]])
    with pytest.raises(ValueError, match="sources='last'"):
        ImageSimilarityReward(clip, sources="last")


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_is_exact(_base_edit_pipeline, edits, tmp_path):
    resume_mid_round(lambda: copy.deepcopy(_base_edit_pipeline), [blueness], edits, tmp_path, **EDIT)


@pytest.mark.slow
def test_lora_loads_with_the_pipeline_and_reproduces_the_policy(
    _base_edit_pipeline, edits, tmp_path, vae_at_training_size
):
    """`QwenImageEditPlusPipeline.load_lora_weights` on a fresh copy of the base pipeline (a saved edit pipeline
    cannot be loaded without torchvision: see `tiny_qwen2_vl_processor`)."""
    trainer = make_trainer(
        copy.deepcopy(_base_edit_pipeline), [blueness], edits, tmp_path / "run", max_steps=2, **EDIT
    )
    trainer.train()
    trainer.save_model()
    sample = dict(
        image=[source_image(0)],
        prompt="edit number 1",
        height=32,
        width=32,
        num_inference_steps=3,
        true_cfg_scale=4.0,
        negative_prompt=" ",
        output_type="np",
    )
    trainer.pipeline.set_progress_bar_config(disable=True)
    trained = trainer.pipeline(generator=torch.Generator().manual_seed(0), **sample).images
    fresh = copy.deepcopy(_base_edit_pipeline)
    fresh.set_progress_bar_config(disable=True)
    base = fresh(generator=torch.Generator().manual_seed(0), **sample).images
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh(generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


@pytest.mark.parametrize("sources", [1, 2])
def test_trains_from_the_command_line_with_the_shipped_recipe(sources, _base_edit_pipeline, tmp_path, monkeypatch):
    """The shipped recipe's layout (a jsonl of instructions and image paths relative to it, or lists of them: several
    sources per row) trains; only the model, the sizes and the reward change. The folder holds only model_index.json
    and the pipeline comes from memory: a saved edit pipeline cannot be loaded without torchvision."""
    import trl_guard.preflight
    from trl_guard.scripts.grpo import main as grpo_main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    monkeypatch.setattr(trl_guard.preflight, "load_pipeline", lambda model, kwargs: copy.deepcopy(_base_edit_pipeline))
    data = tmp_path / "edits"
    (data / "images").mkdir(parents=True)
    with open(data / "train.jsonl", "w") as f:
        for i in range(4):
            source_image(i).save(data / "images" / f"{i}.png")
            paths = [f"images/{(i + k) % 4}.png" for k in range(sources)]
            image = paths[0] if sources == 1 else paths
            f.write(json.dumps({"prompt": f"make the sky number {i} red", "image": image}) + "\n")
    trainer = grpo_main(
        [
            "--config", "examples/recipes/qwenimage_edit_guard.yaml",
            "--model_name_or_path", str(model_dir),
            "--model_init_kwargs", "{}",
            "--dataset_name", str(data / "train.jsonl"), "--eval_dataset_name", str(data / "train.jsonl"),
            "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.blueness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_inference_steps", "4", "--max_sequence_length", "32",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.pipeline, QwenImageEditPlusPipeline)
    first = trainer.train_dataset[0]["image"]  # the paths were read as images
    first = first if sources > 1 else [first]
    assert len(first) == sources and all(isinstance(image, Image.Image) for image in first)
    assert trainer.adapter.uses_cfg and trainer.args.sde_window_size == 1
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("img_mlp.net.2.lora_A" in key for key in lora)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the reloaded LoRA is a second adapter
def test_real_width_samples_trains_and_reloads(edits, tmp_path):
    """Qwen-Image-Edit-2511's real widths (24 heads of 128, Qwen2.5-VL-7B's 3584-wide text and 1280-wide vision tower
    with 14 px patches, the 16-channel VAE, zero_cond_t) with one layer each: sample 2 steps with true CFG, train one
    step with LoRA on the default targets, save, and reload the LoRA through `load_lora_weights` as a second adapter:
    it gives the trained policy's velocity."""
    pipe = build_real_width_qwenimage_edit_plus_pipeline(seed=0)
    real = QWEN_IMAGE_EDIT_REAL
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size == 3584
    assert pipe.text_encoder.config.vision_config.hidden_size == real["vision"]["hidden_size"]
    trainer = make_trainer(
        pipe,
        [blueness],
        edits.select([0, 1]),
        tmp_path / "run",
        num_generations=2,
        per_device_train_batch_size=2,
        steps_per_generation=1,
        max_steps=1,
        timestep_fraction=0.5,  # train the first of the 2 steps
        max_sequence_length=16,
        learning_rate=1e-3,
        **{**EDIT, "num_inference_steps": 2},
    )
    adapter = trainer.adapter
    assert adapter.latent_shape() == (4, 64)  # 32 px: 4x4 latents in 2x2 patches of 16 channels
    trainer.train()
    assert logged(trainer, "log_ratio_mean") == [0.0] and np.isfinite(logged(trainer, "loss")[0])
    trainer.save_model()
    assert any(p.abs().max() > 0 for n, p in adapter.denoiser.named_parameters() if "lora_B" in n)

    cond = conditioning(adapter, ["edit number 0"], [source_image(0)])
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8])
    with torch.no_grad():
        trained = adapter.predict_velocity(latents, sigma, cond, None)
        pipe.load_lora_weights(str(tmp_path / "run"), adapter_name="reloaded")
        pipe.set_adapters("reloaded")
        reloaded = adapter.predict_velocity(latents, sigma, cond, None)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
