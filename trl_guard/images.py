"""Image grids: written next to the run and sent to the trackers that take images. A video (a list of frames, what
video families decode to) is shown as a strip of its frames side by side, one video per row, and also as an animated
GIF of all the videos in a grid, sent to the trackers that take video (TensorBoard only with moviepy < 2 installed).
Videos with sound (LTX-2) also have each one's audio written as a WAV file and sent to the trackers that take audio."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import wave
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
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


def moviepy_encodes_video() -> bool:
    """Whether `SummaryWriter.add_video` can encode: torch's (and tensorboardX's) encode with `moviepy.editor`, which
    only moviepy < 2 has. Without it they print a notice and write an empty image, so no video is sent then."""
    try:
        return importlib.util.find_spec("moviepy.editor") is not None
    except ModuleNotFoundError:  # no moviepy
        return False


def _log_to_tensorboard(writer: Any, key: str, grid: Image.Image, frames: list[Image.Image], step: int) -> None:
    writer.add_image(key, np.asarray(grid), step, dataformats="HWC")
    if frames and moviepy_encodes_video():
        # add_video takes (N, T, C, H, W) uint8: one video, the grid of every evaluation video, frame by frame
        video = torch.from_numpy(np.stack([np.asarray(frame) for frame in frames])).permute(0, 3, 1, 2)
        writer.add_video(f"{key}_video", video.unsqueeze(0), step, fps=VIDEO_FPS)


def _current_run(tracker: str) -> Any:
    """The run `tracker` ("wandb" or "trackio") logs to now, or None: none before the tracker's callback started one
    (an `evaluate()` before training), nor on processes other than the main one."""
    if tracker == "wandb":
        import wandb

        return wandb.run
    import trackio

    return trackio.context_vars.current_run.get()


def _media_trackers(trainer: Any) -> Iterator[tuple[str, Any, Any]]:
    """The trackers this run reports media to: `("tensorboard", writer, None)` for the TensorBoard callback's
    `SummaryWriter`, `(name, module, run)` for wandb and trackio (whose API mirrors wandb's) while a run is open."""
    for callback in trainer.callback_handler.callbacks:
        name = type(callback).__name__
        if name.endswith("TensorBoardCallback") and getattr(callback, "tb_writer", None) is not None:
            yield "tensorboard", callback.tb_writer, None
        elif name in ("WandbCallback", "TrackioCallback"):
            tracker = "wandb" if name == "WandbCallback" else "trackio"
            run = _current_run(tracker)
            if run is not None:
                yield tracker, importlib.import_module(tracker), run


def log_image_grid(trainer: Any, images: Sequence[Image.Image | Sequence[Image.Image]], key: str) -> str:
    """Save a grid of `images` (or of videos' frame strips) as `{output_dir}/{key}/step-{global_step}.png` and log it
    to tensorboard, wandb and trackio if the run reports there. Videos are also saved as `step-{global_step}.gif`
    and logged as video under `{key}_video` to wandb and trackio, and to TensorBoard when moviepy < 2 is installed
    (`SummaryWriter.add_video` needs it; without it TensorBoard gets the frame strips only). Returns the PNG's path.

    Only the trackers' public APIs are used: the TensorBoard callback's `SummaryWriter`, and the `wandb` and `trackio`
    modules' current run."""
    grid = make_grid(images)
    step = trainer.state.global_step
    folder = os.path.join(trainer.args.output_dir, key)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    grid.save(path)
    videos = [image for image in images if isinstance(image, (list, tuple))]
    frames: list[Image.Image] = []
    if videos:
        gif = os.path.join(folder, f"step-{step:06d}.gif")
        frames = save_video_grid(videos, gif)
    for tracker, handle, run in _media_trackers(trainer):
        if tracker == "tensorboard":
            _log_to_tensorboard(handle, key, grid, frames, step)
        else:
            # trackio mirrors wandb's API (`log`, `Image`, `Video`). No `step=`: the callbacks log without one, so
            # wandb's own step counter can run ahead of global_step (with logging_steps=1, from the second evaluation
            # on), and wandb drops a row logged behind it. The grid carries "train/global_step" instead, as the
            # callbacks' rows do
            row = {key: handle.Image(grid), "train/global_step": step}
            if videos:  # from a file, both take a GIF as it is
                row[f"{key}_video"] = handle.Video(gif, format="gif")
            run.log(row)
    return path


def save_wav(waveform: np.ndarray, sample_rate: int, path: str) -> None:
    """Write a float waveform `(channels, samples)` in [-1, 1] as 16-bit PCM WAV, with the standard library's `wave`
    (no audio package needed); values beyond [-1, 1] are clipped."""
    pcm = (np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0) * 32767).round().astype("<i2")
    with wave.open(path, "wb") as file:
        file.setnchannels(pcm.shape[0])
        file.setsampwidth(2)
        file.setframerate(int(sample_rate))
        file.writeframes(pcm.T.tobytes())  # interleaved: one frame holds every channel's sample


def log_audio(trainer: Any, audios: Sequence[tuple[np.ndarray, int]], key: str) -> list[str]:
    """Save each `(waveform, sample_rate)` of `audios` (the evaluation videos' sound, in the grid's order) as
    `{output_dir}/{key}/step-{global_step}-{i}.wav` and log it under `{key}/{i}` (`i` the video's row in the grid) to
    tensorboard (`SummaryWriter.add_audio`, which takes one channel: the channels' mean), wandb and trackio (`Audio`,
    from the WAV file) if the run reports there. Returns the WAV files' paths."""
    step = trainer.state.global_step
    folder = os.path.join(trainer.args.output_dir, key)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (waveform, rate) in enumerate(audios):
        paths.append(os.path.join(folder, f"step-{step:06d}-{i:02d}.wav"))
        save_wav(waveform, rate, paths[-1])
    for tracker, handle, run in _media_trackers(trainer):
        if tracker == "tensorboard":
            for i, (waveform, rate) in enumerate(audios):
                mono = torch.from_numpy(np.clip(np.asarray(waveform, dtype=np.float32), -1, 1)).reshape(
                    -1, waveform.shape[-1]
                )
                handle.add_audio(f"{key}/{i:02d}", mono.mean(dim=0, keepdim=True), step, sample_rate=rate)
        else:
            # as `log_image_grid`: no `step=`, the row carries "train/global_step"
            row = {f"{key}/{i:02d}": handle.Audio(path) for i, path in enumerate(paths)}
            run.log({**row, "train/global_step": step})
    return paths
