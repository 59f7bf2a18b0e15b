"""OCR reward (Flow-GRPO's "TextRender" task): how well the image spells the text quoted in its prompt.

The prompt's quoted text is the target, RapidOCR (PP-OCR models run with ONNX Runtime, shipped inside the wheel, so
it works offline) reads the image, and the score is one minus the normalised edit distance between the two. Needs the
optional extra: `pip install "trl-guard[ocr]"`.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

from PIL import Image

from .base import require

# Straight and typographic double quotes are unambiguous delimiters.
_DOUBLE_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')
# A single quote is also an apostrophe ("cat's", "DON'T"), so a span must open after a non-word character and close
# before one; it is only looked for when the prompt has no double-quoted span.
_SINGLE_QUOTED = re.compile(r"(?<!\w)'(.+?)'(?!\w)|(?<!\w)‘(.+?)’(?!\w)")

# Detection at 128 px on the short side (upscaling smaller images) reads rendered words reliably at a fraction of
# RapidOCR's default 736 px cost.
_DEFAULT_DET_LIMIT_SIDE_LEN = 128
_DEFAULT_DET_LIMIT_TYPE = "min"


def extract_quoted_text(prompt: str) -> str | None:
    """The text a prompt asks to render: its quoted spans joined with a space, or None if it quotes nothing.

    Double quotes (`"..."`, `“...”`) are used when present; otherwise single-quote pairs (`'...'`, `‘...’`) whose
    opening quote follows a non-word character and whose closing quote precedes one, so apostrophes do not count.

    Example:
        >>> extract_quoted_text('a sign that says "HELLO" and "WORLD"')
        'HELLO WORLD'
        >>> extract_quoted_text("a cat's mug reading 'DON'T PANIC'")
        "DON'T PANIC"
        >>> extract_quoted_text("a photo of a cat") is None
        True
    """
    spans = [a or b for a, b in _DOUBLE_QUOTED.findall(prompt)] or [a or b for a, b in _SINGLE_QUOTED.findall(prompt)]
    return " ".join(spans) if spans else None


def levenshtein_distance(a: str, b: str) -> int:
    """Minimum number of single-character insertions, deletions and substitutions turning `a` into `b`.

    Example:
        >>> levenshtein_distance("kitten", "sitting")
        3
    """
    if len(a) < len(b):
        a, b = b, a  # the DP row spans the shorter string
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _normalize(text: str, ignore_case: bool, ignore_whitespace: bool) -> str:
    if ignore_case:
        text = text.lower()
    # OCR splits and joins lines and words unpredictably, so spacing is either dropped or made canonical
    return "".join(text.split()) if ignore_whitespace else " ".join(text.split())


def text_match_score(
    target: str, recognized: str, *, ignore_case: bool = True, ignore_whitespace: bool = True
) -> float | None:
    """`1 - min(d, n) / n`: `d` the edit distance between the recognised and target texts, `n` the target length.

    Both texts are normalised first: lowercased if `ignore_case`; all whitespace removed if `ignore_whitespace`,
    otherwise runs of whitespace collapsed to one space and the ends stripped. An exact match scores 1.0, an empty
    recognition 0.0, and extra recognised characters lower the score down to 0.0 at most (the `min`). None if the
    normalised target is empty (nothing to render).

    Example:
        >>> text_match_score("Hello World", "HELLO WORD")
        0.9
    """
    target = _normalize(target, ignore_case, ignore_whitespace)
    if not target:
        return None
    recognized = _normalize(recognized, ignore_case, ignore_whitespace)
    return 1.0 - min(levenshtein_distance(recognized, target), len(target)) / len(target)


class OcrReward:
    """Text-rendering reward: 1 - normalised edit distance between the prompt's quoted text and the OCR reading.

    Scores are in [0, 1] (see :func:`text_match_score`); a prompt with no quoted text (see :func:`extract_quoted_text`)
    gives None for that sample and is not read. The RapidOCR engine is created on the first call and reused; its models
    ship inside the `rapidocr` wheel, so nothing is downloaded. It runs on the CPU, whatever device the trainer uses.

    Args:
        det_limit_side_len: RapidOCR's `Det.limit_side_len`: the side length the detector resizes to.
        det_limit_type: RapidOCR's `Det.limit_type`: `"min"` upscales images whose short side is below
            `det_limit_side_len`, `"max"` downscales images whose long side is above it.
        ignore_case: compare lowercased texts.
        ignore_whitespace: drop all whitespace before comparing (else collapse it to single spaces).
        params: further RapidOCR settings, as for `RapidOCR(params=...)` (e.g. `{"Global.text_score": 0.3}`); they
            override this class's defaults (angle classifier off, log level "error").

    Example:
        ```python
        reward = OcrReward()  # pip install "trl-guard[ocr]"
        reward(prompts=['a sign that says "HELLO"', "a cat"], images=[sign, cat])  # -> [1.0, None]
        ```
    """

    __name__ = "ocr"

    def __init__(
        self,
        *,
        det_limit_side_len: int = _DEFAULT_DET_LIMIT_SIDE_LEN,
        det_limit_type: str = _DEFAULT_DET_LIMIT_TYPE,
        ignore_case: bool = True,
        ignore_whitespace: bool = True,
        params: dict[str, Any] | None = None,
    ):
        # fail when the reward is named, not after the diffusion model has loaded and sampled its first batch
        require("rapidocr", "ocr", "The ocr reward")
        require("onnxruntime", "ocr", "The ocr reward")
        self.ignore_case = ignore_case
        self.ignore_whitespace = ignore_whitespace
        self.params = {
            "Det.limit_side_len": det_limit_side_len,
            "Det.limit_type": det_limit_type,
            # generated text is upright, so the 180-degree classifier only costs time (Flow-GRPO disables it too)
            "Global.use_cls": False,
            # an image without text would otherwise log a warning on every call
            "Global.log_level": "error",
            **(params or {}),
        }
        self._engine = None
        # the trainer may score from a worker thread (`overlap_reward_scoring`)
        self._lock = threading.Lock()

    def _get_engine(self):
        with self._lock:
            if self._engine is None:
                from rapidocr import RapidOCR

                self._engine = RapidOCR(params=self.params)
            return self._engine

    def read(self, image: Image.Image) -> str:
        """The text RapidOCR reads in `image`: its lines joined with spaces, top to bottom ("" if none)."""
        result = self._get_engine()(image.convert("RGB"))
        return " ".join(result.txts or ())

    def __call__(self, prompts: list[str], images: list[Image.Image], **kwargs) -> list[float | None]:
        if len(prompts) != len(images):
            raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images.")
        scores: list[float | None] = []
        for prompt, image in zip(prompts, images):
            target = extract_quoted_text(prompt)
            if target is None or not "".join(target.split()):
                scores.append(None)  # skip the OCR cost when there is nothing to compare against
                continue
            scores.append(
                text_match_score(
                    target,
                    self.read(image),
                    ignore_case=self.ignore_case,
                    ignore_whitespace=self.ignore_whitespace,
                )
            )
        return scores


@functools.cache
def _default_ocr_reward() -> OcrReward:
    return OcrReward()


def ocr_reward(prompts: list[str], images: list[Image.Image], **kwargs) -> list[float | None]:
    """:class:`OcrReward` with default settings, as a function; its engine is created on the first call and kept.

    Example:
        ```python
        ocr_reward(['a sign that says "HELLO"', "a cat"], [sign, cat])  # -> [1.0, None]
        ```
    """
    return _default_ocr_reward()(prompts, images, **kwargs)
