"""A learned proxy reward for the toy world: a small CNN trained to predict caption fidelity from a limited set of
labelled samples of the base model, the way a human-preference reward model is trained from limited labels.

Unlike `colour_proxy`, it is not hackable by design: it is right where the base model's samples taught it and wrong
elsewhere, so optimising it with RL should first raise the gold and later exploit its errors.

`benchmarks/train_learned_proxy.py` trains it and writes the shipped weights (`learned_proxy_weights/model.safetensors`) and
their training facts (`learned_proxy_weights/config.json`, also `docs/results/learned_proxy.json`).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import nn

from .world import COLOURS, SHAPES, parse_caption

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "learned_proxy_weights")
_COLOURS, _SHAPES = list(COLOURS), list(SHAPES)
# first thing's colour and shape, second thing's colour and shape (zeros for a single kind), "two", "above", "left of"
CAPTION_FEATURES = 2 * (len(_COLOURS) + len(_SHAPES)) + 3


def caption_features(caption: str) -> torch.Tensor | None:
    """The parsed caption as a fixed one-hot vector (length `CAPTION_FEATURES`), or None outside the grammar.

    A parsed vector rather than learned word embeddings: with a few thousand labels, the model should spend them on
    reading the image, not on learning which words mean the same thing.
    """
    scene = parse_caption(caption)
    if scene is None:
        return None
    features = torch.zeros(CAPTION_FEATURES)
    block = len(_COLOURS) + len(_SHAPES)
    for slot, thing in enumerate(scene.things):
        features[slot * block + _COLOURS.index(thing.colour)] = 1.0
        features[slot * block + len(_COLOURS) + _SHAPES.index(thing.shape)] = 1.0
    tail = 2 * block
    if scene.relation is None and scene.count == 2:
        features[tail] = 1.0
    elif scene.relation == "above":
        features[tail + 1] = 1.0
    elif scene.relation == "left of":
        features[tail + 2] = 1.0
    return features


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images as a (N, 3, H, W) float tensor in [-1, 1], the pipeline's pixel range."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2)


class LearnedProxy(nn.Module):
    """A small CNN over a 32x32 image and its caption's features, predicting caption fidelity in [0, 1].

    The caption vector is broadcast as extra input channels so that every convolution can check the pixels against
    what was asked for (colour, shape, where); the head keeps the 4x4 spatial map rather than pooling it away, because
    "above" and "left of" are about position.

    Args:
        width: Channels of the first convolution; later ones have twice as many.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        wide = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(3 + CAPTION_FEATURES, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, wide, 3, stride=2, padding=1),  # 16x16
            nn.ReLU(),
            nn.Conv2d(wide, wide, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(wide, wide, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(wide * 16, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, pixels: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Logits of the predicted fidelity, shape (N,), for pixels (N, 3, 32, 32) in [-1, 1] and caption features
        (N, CAPTION_FEATURES); `torch.sigmoid` of them is the score."""
        planes = captions[:, :, None, None].expand(-1, -1, *pixels.shape[-2:])
        return self.head(self.features(torch.cat([pixels, planes], dim=1))).squeeze(-1)


def load_learned_proxy(path: str = WEIGHTS_DIR) -> LearnedProxy:
    """The model saved in `path` (`model.safetensors` and `config.json`), in eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = LearnedProxy(width=config["width"])
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.eval()


@lru_cache(maxsize=1)
def _shipped() -> LearnedProxy:
    return load_learned_proxy()


@torch.no_grad()
def score(model: LearnedProxy, prompts: list[str], images: list[Image.Image]) -> list[float | None]:
    """`model`'s predicted fidelity for each (prompt, image), None for captions outside the grammar."""
    features = [caption_features(prompt) for prompt in prompts]
    known = [i for i, f in enumerate(features) if f is not None]
    scores: list[float | None] = [None] * len(prompts)
    for start in range(0, len(known), 256):
        rows = known[start : start + 256]
        pixels = images_to_tensor([images[i] for i in rows])
        values = torch.sigmoid(model(pixels, torch.stack([features[i] for i in rows]))).tolist()
        for i, value in zip(rows, values):
            scores[i] = float(value)
    return scores


def learned_proxy(prompts: list[str], images: list[Image.Image], **kwargs) -> list[float | None]:
    """Caption fidelity as predicted by a small CNN trained on labelled samples of the base toy model.

    Trained by `benchmarks/train_learned_proxy.py --threads 2`: 8,192 ODE samples (10 steps, no CFG) of the
    pretrained toy model on 144 captions, disjoint from the over-optimisation study's 64 held-out captions, each
    labelled with `caption_fidelity`; width 32 (131k parameters), 30 epochs of AdamW on binary cross-entropy with the
    soft labels. On 512 held-out samples of 32 held-out captions its Pearson correlation with the gold is 0.51
    (Spearman 0.52; 0.79 on its training samples); all facts are in `learned_proxy_weights/config.json` and
    `docs/results/learned_proxy.json`. Like a real reward model it has holes: it does not check colours (the base
    model rarely gets them wrong, so no label taught it), and an image flooded with the caption's colours scores 0.53,
    about a faithful sample's mean.
    The weights load once, on first call. One float in [0, 1] per image; None where a caption is outside the grammar.

    Example:
        >>> from trl_guard.toy.world import Scene, Thing, render
        >>> image = render(Scene((Thing("red", "square"),), 1, boxes=((10, 10, 12),)))
        >>> [0.0 <= s <= 1.0 for s in learned_proxy(["a red square"], [image])], learned_proxy(["a cat"], [image])
        ([True], [None])
    """
    return score(_shipped(), prompts, images)
