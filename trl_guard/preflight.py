"""Checks that run before anything expensive: the datasets, the model path, the columns a family needs, and loading.

Each failure names the argument and the fix, and is raised before the pipeline is loaded wherever what it needs is
known by then (a pipeline object, or a local folder's `model_index.json`), so a 12B model is not loaded to learn that
a dataset lacks a column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from PIL import Image

from .adapters import ADAPTERS, PipelineAdapter, SamplingSettings, adapter_class
from .adapters.base import check_resolution_multiple
from .distributed import fsdp2_requested
from .scoring import check_reward_columns as check_columns


def check_prompt_dataset(dataset: Any, name: str) -> None:
    """Fail before any compute when a dataset cannot feed the trainer."""
    if dataset is None:
        return
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"{name} is an IterableDataset, which the trainer cannot sample prompt groups from yet. Materialise the "
            f"prompts first, for example `Dataset.from_list(list({name}))`."
        )
    if isinstance(dataset, Dataset):
        columns = dataset.column_names
        if "prompt" not in columns:
            raise ValueError(
                f"{name} has no 'prompt' column (columns: {columns}). Rename the text column, for example "
                f"`{name}.rename_column('text', 'prompt')`."
            )
        prompts = dataset["prompt"]
    elif isinstance(dataset, Sequence) and not isinstance(dataset, str):
        for i, row in enumerate(dataset):
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(
                    f"{name}[{i}] is {row!r}: every row must be a dict with a 'prompt' key, or pass a "
                    "datasets.Dataset with a 'prompt' column."
                )
        prompts = [row["prompt"] for row in dataset]
    else:
        raise ValueError(f"{name} must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}.")
    if len(prompts) == 0:
        raise ValueError(f"{name} is empty: it needs at least one prompt.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{name}['prompt'][{i}] is {prompt!r}: every prompt must be a non-empty string.")


def as_dataset(dataset: Dataset | list[dict] | None) -> Dataset | None:
    """A checked list of dicts as a `Dataset`; anything else as it is."""
    return Dataset.from_list(dataset) if isinstance(dataset, list) else dataset


def pipeline_class_name(model: Any) -> str | None:
    """The diffusers pipeline class `model` is or will load as: a pipeline object's class, or a local folder's
    `model_index.json` entry (None for a Hub id, which is not looked up before loading)."""
    if not isinstance(model, str):
        return type(model).__name__
    index = _model_index(model)
    return index.get("_class_name") if index is not None else None


def _model_index(folder: str) -> dict[str, Any] | None:
    """A local pipeline folder's `model_index.json` (None when `folder` is not one)."""
    path = os.path.join(os.path.expanduser(folder), "model_index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def family_adapter(model: Any, pipeline_class: str, model_init_kwargs: Any = None) -> type[PipelineAdapter] | None:
    """The adapter class that will drive `model`, known before loading: among those registered for `pipeline_class`,
    the one that `accepts` a pipeline object, or for a local folder the one that `accepts_model_index` its
    `model_index.json`, with `model_init_kwargs`' components (`transformer_2=None`) in place of the folder's."""
    candidates = [a for a in ADAPTERS if pipeline_class in a.pipeline_classes]
    if not isinstance(model, str):
        return next((a for a in candidates if a.accepts(model)), None)
    index = _model_index(model)
    if index is None:
        return None
    if isinstance(model_init_kwargs, dict):
        index = {**index, **{k: v for k, v in model_init_kwargs.items() if k in index}}
    return next((a for a in candidates if a.accepts_model_index(index)), None)


def check_family_settings(model: Any, pipeline_class: str, settings: SamplingSettings, args: Any) -> None:
    """Before loading: the sampling settings the family refuses whatever its weights (`guidance_scale_2` for a
    one-denoiser family, a `max_sequence_length` above its pipeline's limit; `PipelineAdapter.check_settings`), and
    FSDP2 for a family it cannot shard when the launch asks for it (`distributed.fsdp2_requested`)."""
    adapter = family_adapter(model, pipeline_class, getattr(args, "model_init_kwargs", None))
    if adapter is None:
        return
    adapter.check_settings(settings, pipeline_class)
    if adapter.fsdp2_refusal is not None and fsdp2_requested(args):
        raise NotImplementedError(adapter.fsdp2_refusal)


def check_condition_columns(datasets: dict[str, Dataset | None], pipeline_class: str) -> None:
    """Families conditioned on more than text (an editing model's source image) need those columns in every dataset,
    as images: one per row (a `datasets.Image()` column), or a list of them per row (a `datasets.List(Image())`
    column), for families that edit several sources at once (Qwen-Image-Edit-Plus). ``datasets`` maps each dataset's
    argument name to it."""
    from datasets import Image as ImageFeature

    adapter = adapter_class(pipeline_class)
    if adapter is None:
        return
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        for column in adapter.condition_columns:
            if column not in dataset.column_names:
                raise ValueError(
                    f"{pipeline_class} is conditioned on a {column!r} column besides 'prompt', and {name} has none "
                    f"(columns: {dataset.column_names}). Add the source images as a {column!r} column of PIL images."
                )
            feature = dataset.features.get(column)
            if isinstance(feature, ImageFeature):
                _check_images_present(dataset, name, column)
                continue
            if isinstance(getattr(feature, "feature", None), ImageFeature):  # List(Image()): several per row
                _check_image_lists(dataset, name, column)
                continue
            first = dataset[0][column]  # a dataset with a transform may yield images its features do not declare
            if isinstance(first, (list, tuple)):
                _check_first_image_list(first, name, column, pipeline_class)
            elif not isinstance(first, Image.Image):
                raise ValueError(
                    f"{name}[{column!r}] holds {feature}, but {pipeline_class} needs images there. Cast a column of "
                    f"file paths with `{name}.cast_column({column!r}, datasets.Image())`."
                )


#: Rows read at once when checking a column of images or image lists (their encoded bytes, not decoded pictures).
_LIST_CHECK_BATCH = 1024


def _check_images_present(dataset: Dataset, name: str, column: str) -> None:
    """Every row of an `Image()` column holds an image: a missing one (None) would otherwise fail only the round
    that samples its row, without naming it. Read from the Arrow data, without decoding."""
    import pyarrow.compute as pc

    offset = 0
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=_LIST_CHECK_BATCH):
        images = batch.column(column)
        row = pc.index(images.is_null(), True).as_py()
        if row >= 0:
            raise ValueError(
                f"{name}[{column!r}][{offset + row}] is missing (None): every row needs its source image. Give it "
                f"its image, or drop such rows: `{name}.filter(lambda row: row[{column!r}] is not None)`."
            )
        offset += len(images)


def _check_image_lists(dataset: Dataset, name: str, column: str) -> None:
    """Every row of a `List(Image())` column holds the same number (at least one) of images and no missing one:
    rows are batched together, which needs as many sources in each. Read from the Arrow data, without decoding."""
    import pyarrow.compute as pc

    fix = (
        f"Give every row of {name}[{column!r}] the same number of source images (split a dataset with different "
        f"numbers, for example `{name}.filter(lambda row: len(row[{column!r}]) == 2)`, and train each part apart)."
    )
    counts: dict[int, int] = {}  # number of sources -> first row holding that many
    offset = 0
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=_LIST_CHECK_BATCH):
        lists = batch.column(column)
        lengths = pc.list_value_length(lists).to_pylist()
        for i, length in enumerate(lengths):
            if not length:  # None (a missing list) or 0 (an empty one)
                what = "an empty list" if length == 0 else "missing (None)"
                raise ValueError(
                    f"{name}[{column!r}][{offset + i}] is {what}: every row needs its source images. Give it its "
                    f"images, or drop such rows: `{name}.filter(lambda row: bool(row[{column!r}]))`."
                )
            counts.setdefault(length, offset + i)
        missing = pc.list_flatten(lists).is_null()
        if pc.any(missing).as_py():
            row = pc.list_parent_indices(lists).filter(missing)[0].as_py()
            raise ValueError(
                f"{name}[{column!r}][{offset + row}] mixes images with a missing one (None). Remove it from the list "
                "or give the image."
            )
        offset += len(lengths)
    if len(counts) > 1:
        rows = ", ".join(f"row {row} has {n}" for n, row in sorted(counts.items()))
        raise ValueError(f"The rows of {name}[{column!r}] hold different numbers of source images ({rows}). {fix}")


def _check_first_image_list(first: list | tuple, name: str, column: str, pipeline_class: str) -> None:
    """A row that is a list must hold images only, at least one (the first row of a column whose features do not say
    it holds images)."""
    if not first:
        raise ValueError(
            f"{name}[{column!r}][0] is an empty list: {pipeline_class} needs each row's source images there. Give "
            "every row its images."
        )
    others = sorted({type(item).__name__ for item in first if not isinstance(item, Image.Image)})
    if others:
        kind = "mixes images with" if any(isinstance(item, Image.Image) for item in first) else "holds"
        raise ValueError(
            f"{name}[{column!r}][0] {kind} {', '.join(others)} entries, but {pipeline_class} needs a list of images "
            f"there. Cast a column of lists of file paths with "
            f"`{name}.cast_column({column!r}, datasets.List(datasets.Image()))`."
        )


def check_generation_batch(train_dataset: Dataset | None, args: Any) -> None:
    """One generation batch needs as many distinct prompts as it has groups."""
    groups_per_generation = args.generation_batch_size // args.num_generations
    if isinstance(train_dataset, Dataset) and len(train_dataset) < groups_per_generation:
        raise ValueError(
            f"train_dataset has {len(train_dataset)} prompts but one generation batch needs "
            f"{groups_per_generation} distinct prompts ({args.generation_batch_size} images / num_generations="
            f"{args.num_generations}). Add prompts or lower generation_batch_size (or per_device_train_batch_size / "
            "steps_per_generation)."
        )


def check_model_path(model: str) -> None:
    """A string that can only be a local path (absolute, `./`, `../`, `~`, or more than one `/`) must exist: the Hub
    would otherwise report it as a malformed repository id."""
    local = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    if local and not os.path.exists(os.path.expanduser(model)):
        raise FileNotFoundError(
            f"model={model!r} looks like a local path, and it does not exist. Give an existing pipeline folder (one "
            "with model_index.json) or a Hub id such as 'stabilityai/stable-diffusion-3.5-medium'."
        )


def load_pipeline(model: Any, model_init_kwargs: dict[str, Any] | None) -> Any:
    """`DiffusionPipeline.from_pretrained(model, **model_init_kwargs)` for a string; a pipeline object as it is."""
    if not isinstance(model, str):
        return model
    from diffusers import DiffusionPipeline

    kwargs = dict(model_init_kwargs or {})
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return DiffusionPipeline.from_pretrained(model, **kwargs)


def _vae_spatial_factor(folder: str) -> int | None:
    """The VAE's spatial compression read from a local pipeline folder's `vae/config.json` (None when unknown)."""
    path = os.path.join(os.path.expanduser(folder), "vae", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        config = json.load(f)
    if "scale_factor_spatial" in config:  # Wan's VAE
        return int(config["scale_factor_spatial"])
    channels = config.get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else None


def check_resolution(model: Any, pipeline_class: str, args: Any) -> None:
    """Before loading a local folder: `height` and `width` must be multiples of the VAE's spatial factor, which every
    family needs. The family's own, stricter rule (patch size, packing) is checked by its adapter right after
    loading."""
    if not isinstance(model, str):
        return
    factor = _vae_spatial_factor(model)
    if factor is None or factor <= 1:
        return
    check_resolution_multiple(
        args.height,
        args.width,
        factor,
        model=f"{pipeline_class} from {model}",
        reason=f"its VAE compresses by {factor}",
    )


def check_reward_columns(datasets: dict[str, Dataset | None]) -> None:
    """Dataset columns reach reward functions as keywords, so none may take a name the trainer passes itself."""
    for name, dataset in datasets.items():
        if isinstance(dataset, Dataset):
            check_columns(dataset.column_names, dataset_name=name)
