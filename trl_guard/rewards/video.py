"""Video rewards: any image reward, applied to a video's frames and reduced to one score per video.

For a video family (Wan), `images` holds one `list[PIL.Image]` per sample, its frames in time order, instead of one
image (docs/rewards.md). `video_reward` turns an image reward into a reward of that kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

REDUCTIONS = ("mean", "min")


def video_reward(
    image_reward: Callable[..., Any] | str,
    reduce: str = "mean",
    frame_stride: int = 1,
    name: str | None = None,
) -> Callable[..., list[float | None]]:
    """Lift an image reward to videos: score frames with `image_reward`, reduce them to one value per video.

    The image reward is called once per batch, on every scored frame of every video: frame `i` of video `j` goes
    with prompt `j`, and each dataset column (a list with one entry per video) is repeated per frame. Other
    keywords (`trainer_state`) pass through unchanged.

    Args:
        image_reward: A reward function `f(prompts, images, **kwargs)` on images, or anything `reward_funcs` takes
            (a built-in name, a URL, a dotted import path).
        reduce: `"mean"` averages a video's frame scores; `"min"` takes the worst frame (a video is only as good as
            its worst frame: a text that flickers out for a moment scores low).
        frame_stride: Score every `frame_stride`-th frame from the first (Flow-GRPO's video OCR reads every 4th).
        name: The name the reward is logged under; defaults to `video_{reduce}_{image reward's name}`.

    Returns:
        A reward function on videos. A frame the image reward returns `None` for is left out; a video with no scored
        frame gets `None`. A plain PIL image in `images` counts as a one-frame video.

    Example:
        >>> from PIL import Image
        >>> def brightness(prompts, images, **kwargs):
        ...     return [image.convert("L").getpixel((0, 0)) / 255 for image in images]
        >>> fade = [Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 255, 255)]
        >>> white = [Image.new("RGB", (8, 8), (255, 255, 255))] * 3
        >>> mean_brightness = video_reward(brightness)
        >>> mean_brightness(["a fade in", "a white wall"], [fade, white]), mean_brightness.__name__
        ([0.6666666666666666, 1.0], 'video_mean_brightness')
        >>> video_reward(brightness, reduce="min")(["a fade in", "a white wall"], [fade, white])
        [0.0, 1.0]
        >>> video_reward(brightness, frame_stride=2)(["a fade in"], [fade])  # frames 0 and 2
        [0.5]
    """
    from . import resolve_reward_func, reward_func_name  # the package imports this module

    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not one of {REDUCTIONS}.")
    if frame_stride < 1:
        raise ValueError(f"frame_stride={frame_stride} must be >= 1 (1 scores every frame).")
    func = resolve_reward_func(image_reward)
    image_name = reward_func_name(func)

    def reward(prompts: list[str], images: Sequence[Sequence[Image.Image] | Image.Image], **kwargs: Any):
        videos = [list(v)[::frame_stride] if isinstance(v, (list, tuple)) else [v] for v in images]
        owner = [j for j, frames in enumerate(videos) for _ in frames]  # the video of each scored frame
        per_frame = {
            key: [value[j] for j in owner] if isinstance(value, list) and len(value) == len(videos) else value
            for key, value in kwargs.items()
        }
        values = func(
            prompts=[prompts[j] for j in owner], images=[f for frames in videos for f in frames], **per_frame
        )
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        values = list(values)
        if len(values) != len(owner):
            raise ValueError(
                f"Reward function {image_name!r} returned {len(values)} values for {len(owner)} frames; it must "
                "return one value (or None) per image."
            )
        scores: list[list[float]] = [[] for _ in videos]
        for j, value in zip(owner, values):
            if value is not None:
                scores[j].append(float(value))
        if reduce == "mean":
            return [sum(s) / len(s) if s else None for s in scores]
        return [min(s) if s else None for s in scores]

    reward.__name__ = name or f"video_{reduce}_{image_name}"
    reward.__qualname__ = reward.__name__
    reward.image_reward = func
    if hasattr(func, "place"):  # model rewards load on the trainer's device (RewardSet.place)
        reward.place = func.place
    return reward
