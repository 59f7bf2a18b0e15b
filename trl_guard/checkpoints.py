"""Resuming without losing work: which checkpoint to resume from, no fresh run over a run's checkpoints, and no
resume under settings that change what a checkpoint means.

Each checkpoint holds `run_settings.json`, the settings a checkpoint only makes sense under (the base model, the
loss, the group size, the LoRA rank and targets). A resume compares them with the current run before any step.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

RUN_SETTINGS_NAME = "run_settings.json"

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0", "")


def parse_resume(value: str | bool | None) -> str | bool | None:
    """`resume_from_checkpoint` as the Trainer takes it: `True` (the last checkpoint in `output_dir`), a path, or
    `None`. The command line and YAML give strings, so `"true"` / `"false"` are read as booleans."""
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if value is False or (isinstance(value, str) and value.strip().lower() in _FALSE):
        return None
    return value


def checkpoints_in(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders directly in `output_dir`, sorted by step."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        name
        for name in os.listdir(output_dir)
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        and name.split("-")[-1].isdigit()
        and os.path.isdir(os.path.join(output_dir, name))
    ]
    return sorted(names, key=lambda name: int(name.split("-")[-1]))


def resolve_resume(
    output_dir: str, resume_from_checkpoint: str | bool | None, overwrite_output_dir: bool
) -> str | None:
    """The checkpoint folder to resume from, or `None` for a fresh run. Raises, naming the fix, when `True` finds no
    checkpoint, when a given path does not exist, or when a fresh run would write over `output_dir`'s checkpoints."""
    resume = parse_resume(resume_from_checkpoint)
    if resume is True:
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but output_dir={output_dir!r} holds no checkpoint-N folder. Give the "
                "checkpoint's path, or leave resume_from_checkpoint unset to start a fresh run."
            )
        return last
    if resume is not None:
        if not os.path.isdir(resume):
            raise FileNotFoundError(
                f"resume_from_checkpoint={resume!r} does not exist. Give a checkpoint-N folder, or `true` for the "
                f"last one in output_dir={output_dir!r}."
            )
        return resume
    existing = checkpoints_in(output_dir)
    if existing and not overwrite_output_dir:
        raise ValueError(
            f"output_dir={output_dir!r} already holds checkpoints ({', '.join(existing)}) and a fresh run would "
            "write over them. Resume with resume_from_checkpoint=True (`--resume_from_checkpoint true`), choose "
            "another output_dir, or set overwrite_output_dir=True to start afresh there anyway."
        )
    return None


def write_run_settings(folder: str, settings: dict[str, Any]) -> None:
    with open(os.path.join(folder, RUN_SETTINGS_NAME), "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)


def check_run_settings(checkpoint: str, settings: dict[str, Any]) -> None:
    """Refuse to resume from `checkpoint` when a setting it was written under differs from `settings`. Settings
    unknown on either side (`None`, or a checkpoint older than this file) are not compared."""
    path = os.path.join(checkpoint, RUN_SETTINGS_NAME)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    differ = [
        f"{name}: {saved[name]!r} in the checkpoint, {value!r} now"
        for name, value in settings.items()
        if saved.get(name) is not None and value is not None and saved[name] != value
    ]
    if differ:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained under other settings ({'; '.join(differ)}). Resume with "
            "the checkpoint's settings, or start a fresh run in another output_dir."
        )
