"""Image grids: written next to the run and sent to the trackers that take images. A video (a list of frames, what
video families decode to) is shown as a strip of its frames side by side, one video per row, and also as an animated
GIF of all the videos in a grid, sent to the trackers that take video."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

#: Frame rate of the evaluation GIFs: Wan2.1's (diffusers' examples export its videos at 16 fps).
VIDEO_FPS = 16

#: Frames a strip shows at most, evenly spaced from the first to the last: 33 frames of 416 px side by side would
#: make a grid too wide for the trackers.
MAX_STRIP_FRAMES = 8


def frame_strip(frames: Sequence[Image.Image], max_frames: int = MAX_STRIP_FRAMES) -> Image.Image:
    """A video's frames left to right in time; at most `max_frames` of them, evenly spaced, first and last kept."""
    if len(frames) > max_frames:
        frames = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, max_frames).round()]
    width, height = frames[0].size
    strip = Image.new("RGB", (len(frames) * width, height), "white")
    for i, frame in enumerate(frames):
        strip.paste(frame.convert("RGB"), (i * width, 0))
    return strip


def make_grid(images: Sequence[Image.Image | Sequence[Image.Image]], columns: int | None = None) -> Image.Image:
    """Tile same-sized images row by row; videos (lists of frames) become frame strips, one per row."""
    if any(isinstance(image, (list, tuple)) for image in images):
        images = [frame_strip(image) if isinstance(image, (list, tuple)) else image for image in images]
        columns = columns or 1
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def save_video_grid(videos: Sequence[Sequence[Image.Image]], path: str, fps: int = VIDEO_FPS) -> list[Image.Image]:
    """Write `videos` as one looping animated GIF whose frame t is the grid of every video's frame t; returns the
    grid frames. PIL writes GIFs itself: no video encoder is needed."""
    frames = [make_grid([video[t] for video in videos]) for t in range(min(len(video) for video in videos))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return frames


def _tensorboard_gif(writer: Any, key: str, path: str, size: tuple[int, int], step: int) -> None:
    # what SummaryWriter.add_video writes (an image summary holding a GIF), without the moviepy<2 it needs to encode
    from tensorboard.compat.proto.summary_pb2 import Summary

    with open(path, "rb") as f:
        image = Summary.Image(height=size[1], width=size[0], colorspace=3, encoded_image_string=f.read())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=key, image=image)]), step)


def log_image_grid(trainer: Any, images: Sequence[Image.Image | Sequence[Image.Image]], key: str) -> str:
    """Save a grid of `images` (or of videos' frame strips) as `{output_dir}/{key}/step-{global_step}.png` and log it
    to tensorboard, wandb and trackio if the run reports there. Videos are also saved as `step-{global_step}.gif`
    and logged as video under `{key}_video`. Returns the PNG's path."""
    grid = make_grid(images)
    step = trainer.state.global_step
    folder = os.path.join(trainer.args.output_dir, key)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    grid.save(path)
    videos = [image for image in images if isinstance(image, (list, tuple))]
    if videos:
        gif = os.path.join(folder, f"step-{step:06d}.gif")
        gif_size = save_video_grid(videos, gif)[0].size
    for callback in trainer.callback_handler.callbacks:
        name = type(callback).__name__
        if name.endswith("TensorBoardCallback") and getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.add_image(key, np.asarray(grid), step, dataformats="HWC")
            if videos and hasattr(callback.tb_writer, "_get_file_writer"):  # torch's SummaryWriter (not tensorboardX)
                _tensorboard_gif(callback.tb_writer, f"{key}_video", gif, gif_size, step)
        elif name in ("WandbCallback", "TrackioCallback") and getattr(callback, "_initialized", False):
            # trackio mirrors wandb's API (`log`, `Image`, `Video`). No `step=`: the callbacks log without one, so
            # wandb's own step counter can run ahead of global_step (with logging_steps=1, from the second evaluation
            # on), and wandb drops a row logged behind it. The grid carries "train/global_step" instead, as the
            # callbacks' rows do
            tracker = getattr(callback, "_wandb", None) or callback._trackio
            row = {key: tracker.Image(grid), "train/global_step": step}
            if videos:  # from a file, both take a GIF as it is
                row[f"{key}_video"] = tracker.Video(gif, format="gif")
            tracker.log(row)
    return path
