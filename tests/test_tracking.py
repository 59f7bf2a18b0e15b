"""Metrics and evaluation images reach real trackers through the Trainer's callbacks: TensorBoard event files, a
wandb offline run and trackio's local store, each read back from disk after training. Nothing goes over the network
and everything is written under tmp_path."""

import io
import json
import math
import sqlite3
import struct
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import blueness
from datasets import Dataset
from helpers import logged, make_trainer
from PIL import Image

from trl_guard.metrics import eval_reward_key, timestep_key

# what the trackers hold -> what the trainer logged: transformers' tracker callbacks prefix training logs with
# "train/" and turn the "eval_" prefix into "eval/"
EXPECTED_SCALARS = {
    "train/reward": "reward",
    f"train/{timestep_key(0, 'clip_frac_high')}": timestep_key(0, "clip_frac_high"),
    f"train/{timestep_key(3, 'grad_norm')}": timestep_key(3, "grad_norm"),
    "eval/reward": eval_reward_key(),
}
# two 32x32 evaluation images side by side
GRID_SIZE = (64, 32)


def train_with_eval(pipeline, prompts, tmp_path, tracker: str):
    trainer = make_trainer(
        pipeline,
        [blueness],
        prompts,
        tmp_path / "run",
        max_steps=2,
        report_to=[tracker],
        eval_strategy="steps",
        eval_steps=2,
        eval_num_inference_steps=3,
        eval_dataset=Dataset.from_dict({"prompt": ["a red square", "a blue circle"]}),
    )
    trainer.train()
    return trainer


def assert_logged(trainer, scalars: dict[str, float], images: dict[str, Image.Image]) -> None:
    """What a tracker holds is what the trainer logged. `scalars`: the last value of each scalar the tracker holds;
    `images`: the last image under each key."""
    assert EXPECTED_SCALARS.keys() <= scalars.keys(), sorted(scalars)
    for tracker_key, trainer_key in EXPECTED_SCALARS.items():
        assert math.isfinite(scalars[tracker_key])
        assert math.isclose(scalars[tracker_key], logged(trainer, trainer_key)[-1], rel_tol=1e-6), tracker_key
    assert 0 < scalars["train/reward"] < 1  # blueness is a mean in [0, 1]
    (saved,) = (Path(trainer.args.output_dir) / "eval_images").glob("*.png")
    grid = np.asarray(images["eval_images"].convert("RGB"))
    assert images["eval_images"].size == GRID_SIZE and np.array_equal(grid, np.asarray(Image.open(saved)))


def test_tensorboard_gets_rewards_diagnostics_and_images(tiny_pipeline, prompts, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = train_with_eval(tiny_pipeline, prompts, tmp_path, "tensorboard")
    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)  # flush the writer
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    images = {
        tag: Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)) for tag in events.Tags()["images"]
    }
    assert_logged(trainer, scalars, images)


def wandb_history(run_file: Path) -> dict[str, Any]:
    """The last value of every key in the history rows of a wandb run file (`run-<id>.wandb`), which wandb writes as
    a LevelDB-style log: after a 7-byte file header, 32 KiB blocks of chunks, each a 7-byte header (CRC, length,
    kind) and a slice of a serialized `Record`; kind 1 is a whole record, 2-3-4 its first, middle and last slices."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, pending, last = run_file.read_bytes(), 7, b"", {}
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    last[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return last


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb offline and quiet, with every directory it writes to (settings, cache, staging) under tmp_path; yields
    the folder that will hold the run. The Trainer leaves its run open: finish() ends it, but returns before wandb's
    service process has written the run file out, and teardown() waits for that process to exit."""
    wandb = pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_PROJECT": "trl-guard-test",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (tmp_path / name.lower()).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    try:
        yield tmp_path / "wandb_dir"
    finally:
        wandb.finish()
        wandb.teardown()


def wandb_run_file(wandb_dir: Path) -> Path:
    import wandb

    wandb.finish()
    wandb.teardown()
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    return run_file


def test_wandb_offline_gets_rewards_diagnostics_and_images(tiny_pipeline, prompts, tmp_path, wandb_offline):
    trainer = train_with_eval(tiny_pipeline, prompts, tmp_path, "wandb")
    run_file = wandb_run_file(wandb_offline)
    history = wandb_history(run_file)
    scalars = {key: value for key, value in history.items() if isinstance(value, int | float)}
    # wandb flattens an image into "<key>/_type", "<key>/path", ...: the path is of the PNG copied into the run
    images = {
        key.removesuffix("/_type"): Image.open(run_file.parent / "files" / history[key.replace("/_type", "/path")])
        for key, value in history.items()
        if key.endswith("/_type") and value == "image-file"
    }
    assert_logged(trainer, scalars, images)


@pytest.fixture
def trackio_dir(tmp_path, monkeypatch):
    """trackio keeps its SQLite store under TRACKIO_DIR, which it reads once, at import: point it at tmp_path and
    import trackio afresh for this test, then put back whatever trackio modules were loaded before."""

    def loaded() -> list[str]:
        return [name for name in sys.modules if name == "trackio" or name.startswith("trackio.")]

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for name in loaded():
        monkeypatch.delitem(sys.modules, name)
    pytest.importorskip("trackio")
    yield tmp_path / "trackio"
    for name in loaded():
        del sys.modules[name]


def test_trackio_gets_rewards_diagnostics_and_images(tiny_pipeline, prompts, tmp_path, trackio_dir):
    # the callback finishes the run, which writes out what is pending, at the end of training
    trainer = train_with_eval(tiny_pipeline, prompts, tmp_path, "trackio")
    (database,) = trackio_dir.glob("*.db")
    with sqlite3.connect(database) as connection:
        rows = [json.loads(metrics) for (metrics,) in connection.execute("SELECT metrics FROM metrics ORDER BY id")]
    scalars, images = {}, {}
    for row in rows:
        scalars.update({key: value for key, value in row.items() if isinstance(value, int | float)})
        # an image in a trackio row is a reference to the PNG trackio saved under its media folder
        images.update(
            {
                key: Image.open(trackio_dir / "media" / value["file_path"])
                for key, value in row.items()
                if isinstance(value, dict) and value.get("_type") == "trackio.image"
            }
        )
    assert_logged(trainer, scalars, images)


def test_progress_bar_shows_phases_and_reward(tiny_pipeline, prompts, tmp_path):
    from trl_guard.callbacks import GuardProgressCallback

    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=2, disable_tqdm=False)
    bar = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GuardProgressCallback))
    phases, postfixes = [], []
    original_on_log = bar.on_log

    def record_phase(phase):
        phases.append(phase)

    def record_log(args, state, control, logs=None, **kwargs):
        original_on_log(args, state, control, logs=logs, **kwargs)
        if bar.training_bar is not None:
            postfixes.append(str(bar.training_bar.postfix))

    bar.set_phase, bar.on_log = record_phase, record_log
    trainer.train()
    assert phases[:3] == ["sampling", "scoring", "training"] and phases.count("training") == 2
    assert any("reward=" in p and "clip>" in p for p in postfixes)


# ---- videos: an animated GIF of the evaluation videos, as video in each tracker ----------------------------------


def train_wan_with_eval(tmp_path, tracker: str):
    from cli_rewards import video_blueness
    from helpers import lora_config

    from trl_guard.testing import build_tiny_wan_pipeline

    trainer = make_trainer(
        build_tiny_wan_pipeline(seed=0),
        [video_blueness],
        Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(4)]}),
        tmp_path / "run",
        peft_config=lora_config(target_modules=None),
        num_frames=5,
        max_steps=1,
        steps_per_generation=1,
        num_inference_steps=2,
        report_to=[tracker],
        eval_strategy="steps",
        eval_steps=1,
        eval_num_inference_steps=2,
        eval_dataset=Dataset.from_dict({"prompt": ["a red square", "a blue circle"]}),
    )
    trainer.train()
    (gif,) = (Path(trainer.args.output_dir) / "eval_images").glob("*.gif")
    with Image.open(gif) as animation:
        assert animation.n_frames == 5 and animation.size == GRID_SIZE  # two 32 px videos side by side, 5 frames
    return gif.read_bytes()


@pytest.fixture
def moviepy_editor(monkeypatch):
    """A stand-in for moviepy < 2's `moviepy.editor`, the GIF encoder `SummaryWriter.add_video` imports (moviepy is
    not a dependency): it writes the frames it is given as a GIF with PIL. Yields the frame rates it was asked for."""
    frame_rates = []

    class ImageSequenceClip:
        def __init__(self, frames, fps):
            self.frames, self.fps = frames, fps

        def write_gif(self, filename, **kwargs):
            frame_rates.append(self.fps)
            images = [Image.fromarray(frame) for frame in self.frames]
            images[0].save(filename, save_all=True, append_images=images[1:], duration=round(1000 / self.fps), loop=0)

    editor = types.ModuleType("moviepy.editor")
    editor.ImageSequenceClip = ImageSequenceClip
    moviepy = types.ModuleType("moviepy")
    moviepy.editor = editor
    monkeypatch.setitem(sys.modules, "moviepy", moviepy)
    monkeypatch.setitem(sys.modules, "moviepy.editor", editor)
    monkeypatch.setattr("trl_guard.images.moviepy_encodes_video", lambda: True)
    return frame_rates


def test_tensorboard_gets_evaluation_videos(tmp_path, monkeypatch, moviepy_editor):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trl_guard.images import VIDEO_FPS

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    gif = train_wan_with_eval(tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    # add_video got the grid's frames at the GIF's frame rate: encoded alike, they give the GIF saved next to the run
    assert moviepy_editor == [VIDEO_FPS]
    assert events.Images("eval_images_video")[-1].encoded_image_string == gif  # TensorBoard plays image GIFs


def test_tensorboard_without_moviepy_gets_the_frame_strips_only(tmp_path, monkeypatch, capsys):
    """`SummaryWriter.add_video` cannot encode without moviepy < 2 (it would log an empty image): the videos reach
    TensorBoard as the grid of their frame strips, and nothing else is written under the video's key."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from trl_guard.images import log_image_grid, make_grid

    monkeypatch.setattr("trl_guard.images.moviepy_encodes_video", lambda: False)
    writer = SummaryWriter(str(tmp_path / "tb"))
    trainer = types.SimpleNamespace(
        state=types.SimpleNamespace(global_step=3),
        args=types.SimpleNamespace(output_dir=str(tmp_path / "run")),
        callback_handler=types.SimpleNamespace(callbacks=[TensorBoardCallback(tb_writer=writer)]),
    )
    videos = [[Image.new("RGB", (8, 8), (40 * t, 0, 255 - 40 * t)) for t in range(5)] for _ in range(2)]
    log_image_grid(trainer, videos, "eval_images")
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["eval_images"]
    (logged_grid,) = events.Images("eval_images")
    assert logged_grid.step == 3
    strip = Image.open(io.BytesIO(logged_grid.encoded_image_string)).convert("RGB")
    assert np.array_equal(np.asarray(strip), np.asarray(make_grid(videos)))
    assert (tmp_path / "run" / "eval_images" / "step-000003.gif").exists()  # the GIF is still saved with the run
    assert "moviepy" not in capsys.readouterr().out


def test_wandb_offline_gets_evaluation_videos(tmp_path, wandb_offline):
    gif = train_wan_with_eval(tmp_path, "wandb")
    run_file = wandb_run_file(wandb_offline)
    history = wandb_history(run_file)
    assert history["eval_images_video/_type"] == "video-file"
    assert (run_file.parent / "files" / history["eval_images_video/path"]).read_bytes() == gif


def test_trackio_gets_evaluation_videos(tmp_path, trackio_dir):
    gif = train_wan_with_eval(tmp_path, "trackio")
    (database,) = trackio_dir.glob("*.db")
    with sqlite3.connect(database) as connection:
        rows = [json.loads(metrics) for (metrics,) in connection.execute("SELECT metrics FROM metrics ORDER BY id")]
    videos = [row["eval_images_video"] for row in rows if "eval_images_video" in row]
    assert videos and videos[-1]["_type"] == "trackio.video"
    assert (trackio_dir / "media" / videos[-1]["file_path"]).read_bytes() == gif
