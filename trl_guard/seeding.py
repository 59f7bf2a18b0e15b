"""Streams of randomness keyed by what they are for, not by where they run.

Every random draw of a run (initial noise, the SDE's noise, the timesteps trained, evaluation noise, the SDE window)
comes from a generator seeded by a hash of ``(seed, stream, round, sample)``. The same key gives the same numbers on
any process, in any micro-batch and after a resume, which is what makes multi-process runs equal one-process runs and
resumed runs equal uninterrupted ones.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """What a generator draws for. The values are part of the key: changing them changes every run's noise."""

    INIT_NOISE = 0
    SDE_NOISE = 1
    TIMESTEPS = 2
    EVAL_NOISE = 3
    WINDOW = 4


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``key``.

    Example:
        >>> a, b = keyed_generator(0, Stream.SDE_NOISE, 3), keyed_generator(0, Stream.SDE_NOISE, 3)
        >>> bool(torch.equal(torch.randn(2, generator=a), torch.randn(2, generator=b)))
        True
    """
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)
