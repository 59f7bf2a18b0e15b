"""Model-family adapters, picked from the pipeline's class.

Every module in this package is imported here, and every `PipelineAdapter` subclass that names its
`pipeline_classes` registers itself: adding a family is adding one file (docs/adding_a_model_family.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .._logging import quiet_known_noise

# The adapters import diffusers' pipeline modules, whose first import makes transformers log its torchvision notice.
with quiet_known_noise("torchvision_fallback"):
    from .base import ADAPTERS, PipelineAdapter, PromptEmbeddings, SamplingSettings

    for _module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{_module.name}")

from .flux import FluxAdapter  # noqa: E402
from .flux2 import Flux2Adapter, Flux2KleinAdapter  # noqa: E402
from .flux_kontext import FluxKontextAdapter  # noqa: E402
from .qwenimage import QwenImageAdapter  # noqa: E402
from .qwenimage_edit import QwenImageEditAdapter  # noqa: E402
from .sd3 import SD3Adapter  # noqa: E402
from .wan import WanAdapter  # noqa: E402
from .wan22 import Wan22Adapter  # noqa: E402
from .zimage import ZImageAdapter  # noqa: E402


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
    "PipelineAdapter",
    "PromptEmbeddings",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "SD3Adapter",
    "SamplingSettings",
    "Wan22Adapter",
    "WanAdapter",
    "ZImageAdapter",
    "adapter_class",
    "get_adapter",
]
