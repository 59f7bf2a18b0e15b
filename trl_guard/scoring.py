"""Calling reward functions on a batch of images and checking what they return."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(type(value).__name__)
    return float(value)


def score_images(
    reward_funcs: Sequence,
    reward_names: Sequence[str],
    prompts: list[str],
    images: list[Image.Image],
    columns: dict[str, list] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Call every reward function once on the batch; return a (num_images, num_funcs) float32 tensor.

    A ``None`` from a function becomes NaN (the sample is skipped in that function's sum). A wrong count, a value
    that is not a real number, or a NaN/inf raises a ValueError that names the function and the prompt.
    """
    columns = columns or {}
    scores = torch.full((len(images), len(reward_funcs)), float("nan"))
    for j, (func, name) in enumerate(zip(reward_funcs, reward_names)):
        values = func(prompts=prompts, images=images, **columns, **kwargs)
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, Sequence) and not hasattr(values, "__len__"):
            raise ValueError(f"Reward function {name!r} returned {type(values).__name__}; it must return a list.")
        if len(values) != len(images):
            raise ValueError(
                f"Reward function {name!r} returned {len(values)} values for {len(images)} images; it must return "
                "one value (or None) per image."
            )
        for i, value in enumerate(values):
            try:
                number = _as_float(value)
            except TypeError as error:
                raise ValueError(
                    f"Reward function {name!r} returned a {error} for prompt {prompts[i]!r}; rewards must be real "
                    "numbers or None."
                ) from None
            if number is not None and not math.isfinite(number):
                raise ValueError(
                    f"Reward function {name!r} returned {number} for prompt {prompts[i]!r}; rewards must be finite."
                )
            if number is not None:
                scores[i, j] = number
    return scores
