"""Text conditioning for the trainer: each distinct prompt encoded once per round, or once per run when the
dataset's prompts are precomputed; frozen modules optionally kept on the CPU between uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

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
