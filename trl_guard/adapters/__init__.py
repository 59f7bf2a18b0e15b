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
from .flux_kontext import FluxKontextAdapter  # noqa: E402
from .qwenimage import QwenImageAdapter  # noqa: E402
from .sd3 import SD3Adapter  # noqa: E402
from .wan import WanAdapter  # noqa: E402


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
    "FluxKontextAdapter",
    "PipelineAdapter",
    "PromptEmbeddings",
    "QwenImageAdapter",
    "SD3Adapter",
    "SamplingSettings",
    "WanAdapter",
    "get_adapter",
]
