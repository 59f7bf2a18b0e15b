"""Shared machinery of model-based rewards: lazy loading, placement on the trainer's device, batching."""

from __future__ import annotations

import importlib.util
import inspect

import torch


def require(module: str, extra: str, what: str) -> None:
    """Raise an ImportError naming the pip extra when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f'{what} needs the `{module}` package: pip install "trl-guard[{extra}]"')


class ModelReward:
    """Base of rewards backed by a model: loaded once, on first call, on the device and dtype it was placed on.

    The trainer calls `place(device, dtype)` before training for rewards that were not given a device; a reward used
    on its own defaults to the CPU in float32. Subclasses implement `_load()` and `_score(prompts, images)`.
    """

    #: Name used in logs (`rewards/{__name__}/mean`) and by `reward_funcs=["..."]`.
    __name__ = "model_reward"

    def __init__(
        self, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, batch_size: int = 32
    ):
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.batch_size = batch_size
        self._loaded = False

    def place(self, device: str | torch.device, dtype: torch.dtype | None = None) -> None:
        """Set the device (and dtype) unless the user fixed them; moves an already loaded model."""
        if self.device is None:
            self.device = torch.device(device)
        if self.dtype is None:
            self.dtype = dtype
        if self._loaded:
            self._move()

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.device = self.device or torch.device("cpu")
            self.dtype = self.dtype or torch.float32
            self._load()
            self._loaded = True

    def _load(self) -> None:
        raise NotImplementedError

    def _move(self) -> None:
        """Move loaded modules to `self.device` / `self.dtype`."""

    def _score(self, prompts: list[str], images: list) -> list[float | None]:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list, **kwargs) -> list[float | None]:
        self._ensure_loaded()
        parameters = inspect.signature(self._score).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        columns = {
            k: v
            for k, v in kwargs.items()
            if isinstance(v, (list, tuple)) and len(v) == len(images) and (takes_all or k in parameters)
        }
        scores: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            batch = slice(start, start + self.batch_size)
            scores.extend(
                self._score(
                    list(prompts[batch]), list(images[batch]), **{k: list(v[batch]) for k, v in columns.items()}
                )
            )
        return scores
