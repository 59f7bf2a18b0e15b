"""Conditioning for the trainer: each distinct prompt encoded once per round, or once per run when the dataset's
prompts are precomputed; each distinct source image (editing families) encoded once per round; frozen modules
optionally kept on the CPU between uses."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import torch
from PIL import Image

from .adapters import PipelineAdapter, PromptEmbeddings


@contextlib.contextmanager
def on_device(modules: Iterable[torch.nn.Module], device: torch.device, offload: bool) -> Iterator[None]:
    """Move `modules` to `device` for the block and back to the CPU after it, when `offload` is on."""
    modules = list(modules)
    if offload:
        for module in modules:
            module.to(device)
    try:
        yield
    finally:
        if offload:
            for module in modules:
                module.to("cpu")


def content_key(value: Any) -> Hashable:
    """A key equal for equal values: the pixels' digest for images (a dataset decodes a new object per row), and for
    a list or tuple (a row's several source images) the tuple of its elements' keys, in order."""
    if isinstance(value, Image.Image):
        return (value.mode, value.size, hashlib.blake2b(value.tobytes(), digest_size=16).digest())
    if isinstance(value, (list, tuple)):
        return tuple(content_key(item) for item in value)
    return value if isinstance(value, Hashable) else repr(value)


class PromptEncoder:
    """Encodes prompts through the adapter, deduplicated, with an optional per-prompt cache on the CPU."""

    def __init__(self, adapter: PipelineAdapter, device: torch.device, offload: bool = False):
        self.adapter = adapter
        self.device = device
        self.offload = offload
        self.cache: dict[str, dict[str, torch.Tensor]] | None = None

    def _encode(self, prompts: list[str]) -> PromptEmbeddings:
        with on_device(self.adapter.text_encoders, self.device, self.offload):
            return self.adapter.encode_prompts(prompts)

    def precompute(self, prompts: Iterable[str], batch_size: int = 64) -> None:
        """Encode every distinct prompt once and keep the embeddings on the CPU for the rest of the run."""
        self.cache = {} if self.cache is None else self.cache
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            embeds = self._encode(batch)
            for i, prompt in enumerate(batch):
                self.cache[prompt] = {k: v[i : i + 1].cpu() for k, v in embeds.tensors.items()}

    def __call__(self, prompts: list[str]) -> tuple[PromptEmbeddings, torch.Tensor]:
        """Embeddings of the distinct prompts in order of first appearance, and each prompt's row in them."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        if self.cache is None:
            return self._encode(unique), index
        self.precompute(p for p in unique if p not in self.cache)
        keys = self.cache[unique[0]].keys()
        tensors = {k: torch.cat([self.cache[p][k] for p in unique]).to(self.device) for k in keys}
        return PromptEmbeddings(tensors), index

    def rows(self, prompts: list[str], columns: dict[str, list]) -> PromptEmbeddings:
        """The conditioning of each row: its prompt's embeddings and, for families conditioned on more than text
        (`adapter.condition_columns`, an editing model's source image), the adapter's encoding of those columns.
        Each distinct prompt and each distinct condition is encoded once."""
        unique, index = self(prompts)
        tensors = dict(unique.index(index).tensors)
        names = self.adapter.condition_columns
        if names:
            keys = [tuple(content_key(columns[name][i]) for name in names) for i in range(len(prompts))]
            first_row: dict[Hashable, int] = {}
            for i, key in enumerate(keys):
                first_row.setdefault(key, i)
            slot = {key: n for n, key in enumerate(first_row)}
            encoders = self.adapter.text_encoders
            others = [m for m in self.adapter.frozen_modules if all(m is not e for e in encoders)]
            with on_device(others, self.device, self.offload):
                distinct = {name: [columns[name][i] for i in first_row.values()] for name in names}
                conditions = self.adapter.encode_conditions(distinct)
            tensors.update(conditions.index(torch.tensor([slot[k] for k in keys], device=self.device)).tensors)
        return PromptEmbeddings(tensors)
