"""Silence two library log lines that are expected here and say nothing actionable, and nothing else.

- transformers, when diffusers imports its CLIP / SigLIP image processors: "`CLIPImageProcessor` requires
  torchvision (not installed); falling back to `CLIPImageProcessorPil`". We do not install torchvision on purpose (its
  wheels pull a CUDA torch build); the Pillow processors compute the same inputs.
- diffusers, loading the toy world: "Expected types for vae: (AutoencoderKL,), got PixelSpaceAutoencoder". The toy
  world puts a pixel-space identity autoencoder in the SD3 pipeline's `vae` slot by design.

Each filter matches one message shape on one logger; every other warning of those loggers still shows.
"""

from __future__ import annotations

import logging
import re


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_FILTERS = {
    "transformers.utils.import_utils": r"requires torchvision \(not installed\); falling back to `\w+Pil`",
    "diffusers.pipelines.pipeline_utils": r"^Expected types for vae: .*got <class 'trl_guard\.toy\.model\.",
}


def quiet_known_noise() -> None:
    """Install the filters (once; calling again is a no-op)."""
    for name, pattern in _FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
