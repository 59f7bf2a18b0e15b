"""Model-family adapters, picked from the pipeline's class.

Each adapter module registers its classes (`@register`, into `ADAPTERS`) when it is imported, and the imports below
are the one list of the families, in the order `get_adapter` tries them (alphabetical, as isort keeps them; families
sharing a pipeline class tell their pipelines apart with `accepts`): adding a family is adding its file and its line
here (docs/adding_a_model_family.md).
"""

from __future__ import annotations

from typing import Any

from .._logging import quiet_known_noise

# The adapters import diffusers' pipeline modules, whose first import makes transformers log its torchvision notice.
with quiet_known_noise("torchvision_fallback"):
    # The families, one line each: importing a module registers its adapters.
    from .base import ADAPTERS, PipelineAdapter, PromptEmbeddings, SamplingSettings, register
    from .flux import FluxAdapter
    from .flux2 import Flux2Adapter, Flux2KleinAdapter
    from .flux_kontext import FluxKontextAdapter
    from .hunyuanvideo15 import HunyuanVideo15Adapter
    from .hunyuanvideo15_i2v import HunyuanVideo15I2VAdapter
    from .ltx2 import LTX2Adapter
    from .qwenimage import QwenImageAdapter
    from .qwenimage21 import QwenImage21Adapter
    from .qwenimage_edit import QwenImageEditAdapter
    from .sd3 import SD3Adapter
    from .wan import WanAdapter
    from .wan22 import Wan22Adapter
    from .wan_i2v import Wan22I2VAdapter, WanI2VAdapter
    from .zimage import ZImageAdapter


def adapter_class(pipeline_class: str) -> type[PipelineAdapter] | None:
    """The adapter registered for a pipeline class name, or None."""
    return next((a for a in ADAPTERS if pipeline_class in a.pipeline_classes), None)


def get_adapter(pipeline: Any) -> PipelineAdapter:
    """Return the adapter for `pipeline` (the registered adapter of its class that `accepts` it), or raise naming the
    supported pipeline classes."""
    name = type(pipeline).__name__
    cls = next((a for a in ADAPTERS if name in a.pipeline_classes and a.accepts(pipeline)), None)
    if cls is None:
        supported = sorted({c for a in ADAPTERS for c in a.pipeline_classes})
        raise ValueError(
            f"{type(pipeline).__name__} is not supported. Supported pipeline classes: {', '.join(supported)}."
        )
    return cls(pipeline)


__all__ = [
    "ADAPTERS",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "HunyuanVideo15Adapter",
    "HunyuanVideo15I2VAdapter",
    "LTX2Adapter",
    "PipelineAdapter",
    "PromptEmbeddings",
    "QwenImage21Adapter",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "SD3Adapter",
    "SamplingSettings",
    "Wan22Adapter",
    "Wan22I2VAdapter",
    "WanAdapter",
    "WanI2VAdapter",
    "ZImageAdapter",
    "adapter_class",
    "get_adapter",
    "register",
]
