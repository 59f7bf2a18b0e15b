"""Resuming without losing work: which checkpoint to resume from, no fresh run over a run's checkpoints, and no
resume under settings that change what a checkpoint means.

Each checkpoint holds `run_settings.json`, the settings a checkpoint only makes sense under (the base model, the
loss, the group size, the LoRA rank and targets). A resume compares them with the current run before any step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from typing import Any, NoReturn

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

logger = logging.getLogger(__name__)

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
        inside = checkpoints_in(resume)
        if inside and not os.path.exists(os.path.join(resume, "trainer_state.json")):
            raise ValueError(
                f"resume_from_checkpoint={resume!r} is a run's output folder, not a checkpoint: it holds "
                f"{', '.join(inside)}. Pass one of them (`resume_from_checkpoint={os.path.join(resume, inside[-1])}`), "
                "or `true` for the last one in output_dir."
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


def model_fingerprint(model: Any) -> str | None:
    """A digest of a local pipeline folder's configs and weight-file sizes, so that the same model in another place
    is recognised as the same; None for anything but a local folder. Weights are not read: their sizes and every
    config file (which name the architecture, and the shard index with its sizes) identify a checkpoint in practice."""
    if not isinstance(model, str) or not os.path.isdir(os.path.expanduser(model)):
        return None
    root = os.path.expanduser(model)
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            if name.endswith((".json", ".txt", ".model")):
                with open(path, "rb") as f:
                    digest.update(f.read())
            else:
                digest.update(str(os.path.getsize(path)).encode())
    return digest.hexdigest()


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
    same_files = saved.get("model_fingerprint") is not None and saved["model_fingerprint"] == settings.get(
        "model_fingerprint"
    )
    differ = [
        f"{name}: {saved[name]!r} in the checkpoint, {value!r} now"
        for name, value in settings.items()
        if saved.get(name) is not None
        and value is not None
        and saved[name] != value
        # a local model folder that moved but holds the same files is the same model
        and not (name == "model" and same_files)
    ]
    if differ:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained under other settings ({'; '.join(differ)}). Resume with "
            "the checkpoint's settings, or start a fresh run in another output_dir."
        )


# ---- the files a checkpoint holds besides the Trainer's own ----------------------------------------------------

STAGING = ".staging"  # checkpoints are written here first, then moved into place
EMA_STATE_NAME = "ema_state.safetensors"  # live weights and their EMA, when ema_decay > 0
ALGORITHM_STATE_NAME = "algorithm_state.safetensors"  # what an algorithm keeps across rounds, when it keeps anything


def final_model_files() -> tuple[str, ...]:
    """What shows that `output_dir` holds a finished run's model: every family's LoRA files and the `config.json` of
    its full fine-tune's folders (`PipelineAdapter.lora_weight_names`, `denoiser_components`).

    Read from the adapter registry rather than from the run's own adapter: the earlier run in `output_dir` may have
    trained another family, and no module but the adapters names a family's files."""
    from .adapters import ADAPTERS

    names = [name for adapter in ADAPTERS for name in adapter.lora_weight_names.values()]
    names += [os.path.join(folder, "config.json") for adapter in ADAPTERS for folder in adapter.denoiser_components]
    return tuple(dict.fromkeys(names))


def alarm_weights_name(index: int) -> str:
    """The best-gold weights the `index`-th `OverOptimizationCallback` keeps, saved for a resume to restore."""
    return f"overoptimization_best_{index}.safetensors"


def check_no_finished_run(output_dir: str, overwrite_output_dir: bool) -> None:
    """Refuse a fresh run into an `output_dir` that holds a finished run's model files (no checkpoints left, for
    example with `save_strategy="no"`), which `save_model()` would overwrite."""
    found = [name for name in final_model_files() if os.path.exists(os.path.join(output_dir, name))]
    if found and not overwrite_output_dir:
        raise ValueError(
            f"output_dir={output_dir!r} already holds a trained model ({', '.join(found)}) that this run would "
            "overwrite. Choose another output_dir, or set overwrite_output_dir=True to replace it."
        )


PREVIOUS_RUN_PREFIX = "previous-run-"
#: What a run leaves in `output_dir` besides its checkpoints and its model files: the run's settings and history, the
#: model card, the evaluation grids.
RUN_RECORDS = ("guard_config.json", "log_history.json", "README.md", "eval_images")


def run_outputs() -> tuple[str, ...]:
    """What a run leaves in `output_dir` besides its checkpoints: `save_model`'s files, those of every registered
    family (`PipelineAdapter.saved_model_files`), and `RUN_RECORDS`. Moved aside with the checkpoints, so that neither
    a resume nor `trl-guard report` takes them for the new run's.

    The union over the adapter registry, not the run's adapter: `move_previous_run` clears what an earlier run of any
    family left, and needs no pipeline (it runs before the first sampling, and may run before one is loaded)."""
    from .adapters import ADAPTERS

    return tuple(dict.fromkeys([*(name for a in ADAPTERS for name in a.saved_model_files()), *RUN_RECORDS]))


def move_previous_run(output_dir: str) -> str | None:
    """Move an earlier run's `checkpoint-N` folders and finished model (`run_outputs()`) into the first free
    `output_dir/previous-run-K/`, and return that folder (None when there is nothing to move).

    A fresh run with `overwrite_output_dir` would otherwise replace only the checkpoints it reaches: the earlier run's
    later ones would stay beside its own, and a `resume_from_checkpoint=True` would take the newest of them. Nothing is
    deleted, and a resume never looks inside the subfolder (only `checkpoint-N` folders directly in `output_dir`)."""
    outputs = [name for name in run_outputs() if os.path.exists(os.path.join(output_dir, name))]
    names = checkpoints_in(output_dir) + outputs
    if not names:
        return None
    index = 1
    while os.path.exists(os.path.join(output_dir, f"{PREVIOUS_RUN_PREFIX}{index}")):
        index += 1
    aside = os.path.join(output_dir, f"{PREVIOUS_RUN_PREFIX}{index}")
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    logger.warning(
        f"overwrite_output_dir=True: moved the earlier run's {', '.join(names)} from {output_dir} to {aside}, so "
        "that no resume takes them for this run's. Delete that folder if you do not need it."
    )
    return aside


def read_safetensors(path: str, device: str = "cpu") -> dict[str, Any]:
    """`safetensors.torch.load_file`, with an error that names the file when it is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing.")
    if torch.device(device).type == "cpu":
        device = "cpu"  # safetensors refuses an indexed CPU device such as "cpu:0"
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is damaged or truncated ({error}).") from None


def verify_checkpoint(folder: str) -> dict[str, Any]:
    """Open every file of a checkpoint that resuming reads, and refuse naming the first missing or damaged one,
    before any step (the Trainer would otherwise fail deep inside `torch.load` or `json.load`, or not at all).
    Returns the parsed `trainer_state.json`."""
    from safetensors import SafetensorError, safe_open

    def refuse(name: str, what: str) -> NoReturn:
        raise ValueError(
            f"Cannot resume from {folder}: {name} {what}. The run was probably stopped while this checkpoint was "
            "copied or written elsewhere. Resume from an earlier checkpoint-N (`resume_from_checkpoint=<path>`), or "
            "delete this one."
        )

    state = os.path.join(folder, "trainer_state.json")
    if not os.path.exists(state):
        refuse("trainer_state.json", "is missing")
    try:
        with open(state) as f:
            trainer_state = json.load(f)
    except json.JSONDecodeError as error:
        refuse("trainer_state.json", f"is not valid JSON ({error.msg}): truncated or damaged")
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if name.endswith(".safetensors"):
                try:
                    with safe_open(path, framework="pt") as f:
                        for key in f.keys():
                            f.get_slice(key)  # the header's offsets must lie inside the file
                except (SafetensorError, OSError) as error:
                    refuse(relative, f"is damaged or truncated ({error})")
                if os.path.getsize(path) < _safetensors_end(path):
                    refuse(relative, "is truncated (shorter than its header says)")
            elif name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):
                refuse(relative, "is damaged or truncated (not a complete torch archive)")
    return trainer_state


def _safetensors_end(path: str) -> int:
    """Where the last tensor of a safetensors file ends, from its header."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return 8 + header_size + max(ends, default=0)


def publish_checkpoint(run_dir: str, name: str, save_total_limit: int | None) -> None:
    """Move a complete checkpoint from the staging folder into place and rotate old ones; a checkpoint saved again at
    the same step replaces the old one."""
    final = os.path.join(run_dir, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(os.path.join(run_dir, STAGING, name), final)
    shutil.rmtree(os.path.join(run_dir, STAGING), ignore_errors=True)
    rotate_checkpoints(output_dir=run_dir, save_total_limit=save_total_limit, use_mtime=True)


def load_full_weights(folder: str) -> dict[str, Any]:
    """The state dict of a fully fine-tuned denoiser saved with `save_pretrained` (one or more safetensors shards)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights to resume the fully trained denoiser from.")
    state = {}
    for name in files:
        state.update(read_safetensors(os.path.join(folder, name)))
    return state
