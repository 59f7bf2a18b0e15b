"""Scoped filters for two library log lines that our own code triggers, that are expected and say nothing
actionable.

- `torchvision_fallback`: transformers, when the diffusers pipeline modules the adapters import load its CLIP /
  SigLIP image processors: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`". We do not install torchvision on purpose (its wheels pull a CUDA torch build); the Pillow
  processors compute the same inputs.
- `toy_vae_slot`: diffusers, loading the toy world: "Expected types for vae: (AutoencoderKL,), got
  PixelSpaceAutoencoder". The toy world puts a pixel-space identity autoencoder in the SD3 pipeline's `vae` slot by
  design.

Nothing is installed at import: each filter is on its logger only while the step of ours that causes the message
runs (`with quiet_known_noise(...)`), and matches that one message shape. Other libraries' loggers are left as they
were, and their other messages always show.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

#: Known message -> (logger it comes from, pattern of the message).
KNOWN_NOISE = {
    "torchvision_fallback": (
        "transformers.utils.import_utils",
        r"requires torchvision \(not installed\); falling back to `\w+Pil`",
    ),
    "toy_vae_slot": (
        "diffusers.pipelines.pipeline_utils",
        r"^Expected types for vae: .*got <class 'trl_guard\.toy\.model\.",
    ),
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def quiet_known_noise(*names: str) -> Iterator[None]:
    """Drop the `KNOWN_NOISE` messages `names` for the duration of the block, then remove the filters again.

    Args:
        names: Keys of `KNOWN_NOISE`.
    """
    filters = [(logging.getLogger(KNOWN_NOISE[n][0]), _DropMatching(KNOWN_NOISE[n][1])) for n in names]
    for logger, message_filter in filters:
        logger.addFilter(message_filter)
    try:
        yield
    finally:
        for logger, message_filter in filters:
            logger.removeFilter(message_filter)
