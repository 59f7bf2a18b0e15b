"""Image grids: written next to the run and sent to the trackers that take images."""

from __future__ import annotations

import math
import os
from typing import Any

from PIL import Image


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile same-sized images row by row."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid


def log_image_grid(trainer: Any, images: list[Image.Image], key: str) -> str:
    """Save a grid of `images` as `{output_dir}/{key}/step-{global_step}.png` and log it to tensorboard, wandb and
    trackio if the run reports there. Returns the PNG's path."""
    import numpy as np

    grid = make_grid(images)
    step = trainer.state.global_step
    folder = os.path.join(trainer.args.output_dir, key)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    grid.save(path)
    for callback in trainer.callback_handler.callbacks:
        name = type(callback).__name__
        if name.endswith("TensorBoardCallback") and getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.add_image(key, np.asarray(grid), step, dataformats="HWC")
        elif name in ("WandbCallback", "TrackioCallback") and getattr(callback, "_initialized", False):
            # trackio mirrors wandb's API (`log`, `Image`). No `step=`: the callbacks log without one, so wandb's own
            # step counter can run ahead of global_step (with logging_steps=1, from the second evaluation on), and
            # wandb drops a row logged behind it. The grid carries "train/global_step" instead, as the callbacks' rows do
            tracker = getattr(callback, "_wandb", None) or callback._trackio
            tracker.log({key: tracker.Image(grid), "train/global_step": step})
    return path
