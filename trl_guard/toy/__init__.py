"""A procedurally generated text-to-image world small enough to train and over-optimise on a CPU.

`world` draws scenes (one or two coloured shapes on a plain background) with captions; `scorers` holds a hackable
proxy reward and the gold scores that catch the hack.
"""

from .scorers import caption_fidelity, cleanliness, colour_proxy, seed_diversity
from .world import Scene, parse_caption, render, sample_scene

__all__ = [
    "Scene",
    "caption_fidelity",
    "cleanliness",
    "colour_proxy",
    "parse_caption",
    "render",
    "sample_scene",
    "seed_diversity",
]
