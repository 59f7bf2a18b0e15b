"""Calling reward functions on a batch of images and checking what they return."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .rewards import resolve_reward_func, reward_func_name
from .rewards.remote import RemoteReward, RemoteRewardError


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
        if isinstance(values, (torch.Tensor, np.ndarray)):
            values = values.tolist()
        # A dict or a set has a length too, but iterating it gives keys in no set order: never scores.
        if not isinstance(values, (list, tuple)):
            raise ValueError(
                f"Reward function {name!r} returned a {type(values).__name__}; it must return a list (or tuple, "
                "array or tensor) of one float or None per image, in the order of the images."
            )
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


def _check_signature(func: Any, field: str) -> None:
    """Reward functions are called as `f(prompts=..., images=..., **columns, trainer_state=...)`: refuse, before any
    compute, one that cannot take those keywords."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    name = reward_func_name(func)
    raise ValueError(
        f"{field}: the reward function {name!r} has no **kwargs. It is called with prompts=, images=, every other "
        f"dataset column and trainer_state= as keywords; define it as `def {name}(prompts, images, **kwargs)`."
    )


class RewardSet:
    """Reward functions resolved from callables, built-in names, URLs or import paths, with unique log names and
    weights. Calling it scores a batch with every function (see `score_images`)."""

    def __init__(self, reward_funcs: Any, weights: Sequence[float] | None = None, *, field: str = "reward_funcs"):
        if not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError(f"{field} is empty: give at least one reward function.")
        self.funcs = [resolve_reward_func(f) for f in reward_funcs]
        for func in self.funcs:
            _check_signature(func, field)
            remote = getattr(func, "image_reward", func)  # video_reward wraps the image reward it scores frames with
            if isinstance(remote, RemoteReward):
                try:
                    remote.check_reachable()
                except RemoteRewardError as error:
                    raise RemoteRewardError(f"{field}: {error}", url=error.url, attempts=1) from None
        self.names: list[str] = []
        for func in self.funcs:
            name = reward_func_name(func)
            # Two functions with one name (say two remote scorers) would overwrite each other's logs.
            self.names.append(name if name not in self.names else f"{name}_{len(self.names)}")
        weights = list(weights) if weights is not None else [1.0] * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.funcs)} reward functions; give one weight "
                "per function."
            )
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.funcs)

    def place(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """Put model-based rewards on the trainer's device (they load there lazily, on first call)."""
        for func in self.funcs:
            if hasattr(func, "place"):
                func.place(device, dtype)

    def __call__(
        self, prompts: list[str], images: list[Image.Image], columns: dict[str, list] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        return score_images(self.funcs, self.names, prompts, images, columns, **kwargs)

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions; a function's `None` (NaN) counts as missing, not as 0."""
        return (scores * self.weights.to(scores.device)).nansum(dim=1)
