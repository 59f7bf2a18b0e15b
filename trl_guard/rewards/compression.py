"""JPEG (in)compressibility rewards (DDPO's first tasks): file size of the image saved as JPEG."""

from __future__ import annotations

import io

from PIL import Image


def _jpeg_kilobytes(image: Image.Image, quality: int = 95) -> float:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def jpeg_compressibility(prompts: list[str], images: list[Image.Image], **kwargs) -> list[float]:
    """Negative JPEG size in kB (quality 95): smoother, simpler images score higher.

    Example:
        >>> from PIL import Image
        >>> flat, noisy = Image.new("RGB", (64, 64), "gray"), Image.effect_noise((64, 64), 80).convert("RGB")
        >>> flat_score, noisy_score = jpeg_compressibility(["a", "b"], [flat, noisy])
        >>> flat_score > noisy_score
        True
    """
    return [-_jpeg_kilobytes(image) for image in images]


def jpeg_incompressibility(prompts: list[str], images: list[Image.Image], **kwargs) -> list[float]:
    """JPEG size in kB (quality 95): detailed, high-frequency images score higher.

    Example:
        >>> from PIL import Image
        >>> flat, noisy = Image.new("RGB", (64, 64), "gray"), Image.effect_noise((64, 64), 80).convert("RGB")
        >>> flat_score, noisy_score = jpeg_incompressibility(["a", "b"], [flat, noisy])
        >>> noisy_score > flat_score
        True
    """
    return [_jpeg_kilobytes(image) for image in images]
