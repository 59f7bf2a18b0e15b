"""Model-family adapters, picked from the pipeline's class."""

from __future__ import annotations

from typing import Any

from .base import PipelineAdapter, PromptEmbeddings, SamplingSettings
from .flux import FluxAdapter
from .sd3 import SD3Adapter

ADAPTERS: list[type[PipelineAdapter]] = [SD3Adapter, FluxAdapter]


def get_adapter(pipeline: Any) -> PipelineAdapter:
    """Return the adapter for `pipeline`, or raise naming the supported pipeline classes."""
    name = type(pipeline).__name__
    for adapter_cls in ADAPTERS:
        if name in adapter_cls.pipeline_classes:
            return adapter_cls(pipeline)
    supported = sorted(c for a in ADAPTERS for c in a.pipeline_classes)
    raise ValueError(f"{name} is not supported. Supported pipeline classes: {', '.join(supported)}.")


__all__ = [
    "ADAPTERS",
    "FluxAdapter",
    "PipelineAdapter",
    "PromptEmbeddings",
    "SD3Adapter",
    "SamplingSettings",
    "get_adapter",
]
