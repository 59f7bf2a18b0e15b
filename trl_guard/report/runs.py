"""Reading run folders: the logged history, the run's settings, names for runs and metric keys, and the
evaluation scores. Everything the report draws or writes starts from what these return; nothing here draws.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

from .. import metrics
from ..metrics import timestep_values

RUN_CONFIG = "guard_config.json"


class ReportInputError(ValueError):
    """A run folder, its logs or the arguments cannot make a report; the message says which and what to do."""


# ---- reading runs -----------------------------------------------------------------------------------------------


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ReportInputError(f"{path} is not valid JSON ({error}): is it a file the trainer wrote?") from error


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list)) and not value:
        return f"an empty {'object {}' if isinstance(value, dict) else 'list []'}"
    name = {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


_HISTORY_SHAPE = (
    "a non-empty list of the entries the trainer logged, each an object with a 'step' "
    '(for example [{"step": 2, "reward": 0.41, ...}, ...])'
)


def _checked_history(history: Any, path: str, field: str | None = None) -> list[dict]:
    """`history` if it is what `Trainer.state.log_history` holds; else a `ReportInputError` naming the file."""
    where = f"{path} (its '{field}')" if field else path
    if not isinstance(history, list) or not history:
        raise ReportInputError(f"{where} holds {_describe(history)}; the report needs {_HISTORY_SHAPE}.")
    for index, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise ReportInputError(
                f"{where}: entry {index} is {_describe(entry)}, not an object; the report needs {_HISTORY_SHAPE}."
            )
    if not any("step" in entry for entry in history):
        raise ReportInputError(f"{where}: no entry has a 'step'; the report needs {_HISTORY_SHAPE}.")
    return history


def _newest_checkpoint_file(run_dir: str, name: str) -> str | None:
    def step(path: str) -> int:  # checkpoint-<step>; other names (checkpoint-best) sort first
        suffix = os.path.basename(os.path.dirname(path)).split("checkpoint-")[-1]
        return int(suffix) if suffix.isdigit() else -1

    paths = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*", name)), key=step)
    return paths[-1] if paths else None


def load_log_history(run_dir: str) -> list[dict]:
    """The run's logged entries: `log_history.json`, else the newest checkpoint's `trainer_state.json`.

    Raises:
        FileNotFoundError: `run_dir` is not a folder or holds neither file.
        ReportInputError: the file is not valid JSON or does not hold a non-empty list of logged entries.
    """
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} does not exist (or is not a folder): give a trl_guard output_dir.")
    path = os.path.join(run_dir, "log_history.json")
    if os.path.exists(path):
        return _checked_history(_read_json(path), path)
    state_path = _newest_checkpoint_file(run_dir, "trainer_state.json")
    if state_path is None:
        raise FileNotFoundError(
            f"{run_dir} has no log_history.json and no checkpoint-*/trainer_state.json: is it a trl_guard output_dir?"
        )
    state = _read_json(state_path)
    if not isinstance(state, dict) or "log_history" not in state:
        raise ReportInputError(
            f"{state_path} holds {_describe(state)} without a 'log_history'; the report needs the trainer's state, "
            f"an object whose 'log_history' is {_HISTORY_SHAPE}."
        )
    return _checked_history(state["log_history"], state_path, "log_history")


def load_run_config(run_dir: str) -> dict:
    """The run's `guard_config.json` (from the run folder, else its newest checkpoint), or `{}` if it has none."""
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.exists(path):
        path = _newest_checkpoint_file(run_dir, RUN_CONFIG)
        if path is None:
            return {}
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ReportInputError(f"{path} holds {_describe(config)}; it should be the run's GuardConfig as an object.")
    return config


def run_labels(run_dirs: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """One distinct name per run: `labels` if given (checked), else each folder's name, with as many parent folders
    as it takes to tell apart runs whose folders share a name (`A/run`, `B/run`)."""
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise ReportInputError(
                f"--labels gives {len(labels)} name{'s' if len(labels) != 1 else ''} for {len(run_dirs)} run "
                f"folder{'s' if len(run_dirs) != 1 else ''}: give exactly one label per run folder, in the same "
                "order, or leave --labels out to name each run after its folder."
            )
        for label in labels:
            if not label.strip():
                raise ReportInputError("--labels has an empty name: give every run a visible label.")
            if list(labels).count(label) > 1:
                raise ReportInputError(
                    f"--labels names two runs {label!r}: every run needs its own label, or one would hide the other."
                )
        return list(labels)

    parts = [[p for p in os.path.abspath(d).split(os.sep) if p] or [os.sep] for d in run_dirs]
    depth = [1] * len(run_dirs)
    while True:
        names = ["/".join(p[-n:]) for p, n in zip(parts, depth)]
        # a longer name only helps folders that differ: the same folder given twice is numbered below instead
        clashes = [
            i
            for i, name in enumerate(names)
            if depth[i] < len(parts[i]) and any(names[j] == name and parts[j] != parts[i] for j in range(len(names)))
        ]
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    # the same folder given twice still gets two names: a run is never dropped
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def timestep_table(history: list[dict]) -> dict[str, dict[int, float]]:
    """`{stat: {timestep: mean over the run}}` for every per-timestep statistic that was logged."""
    values = timestep_values(history)
    return {stat: {t: sum(v) / len(v) for t, v in sorted(by_step.items())} for stat, by_step in values.items()}


# ---- words for metric keys --------------------------------------------------------------------------------------


def _name(name: str) -> str:
    return name.replace("_", " ")


def metric_title(key: str) -> str:
    """What a logged key means, in words: `metric_title("eval_gold/cleanliness")` is
    `"Gold score: cleanliness (never trained on)"`."""
    if key == "reward":
        return "Training reward (mean of each sampling round)"
    if key.startswith(metrics.REWARDS) and key.endswith("/mean"):
        return f"Training reward: {_name(key[len(metrics.REWARDS) : -len('/mean')])}"
    if key == metrics.EVAL_REWARD:
        return "Evaluation proxy reward (what training maximises)"
    if key.startswith(metrics.EVAL_REWARDS):
        return f"Evaluation reward: {_name(key[len(metrics.EVAL_REWARDS) :])}"
    if key.startswith(metrics.EVAL_GOLD):
        return f"Gold score: {_name(key[len(metrics.EVAL_GOLD) :])} (never trained on)"
    if key == metrics.EVAL_KL:
        return "KL from the base policy at evaluation"
    return key


def _gold_words(key: str) -> str:
    return f"gold score {_name(key[len(metrics.EVAL_GOLD) :])}"


def _reward_order(key: str) -> tuple[int, str]:
    # training first, then evaluation: proxy, its parts, gold, KL
    prefixes = ("reward", metrics.REWARDS, metrics.EVAL_REWARD, metrics.EVAL_REWARDS, metrics.EVAL_GOLD)
    rank = next((i for i, p in enumerate(prefixes) if key == p or key.startswith(p) and p.endswith("/")), 5)
    return rank, key


# ---- evaluations ------------------------------------------------------------------------------------------------


def _grid_step(path: str) -> int:
    name = os.path.basename(path)[:-4]
    digits = "".join(c for c in name.split("-")[-1] if c.isdigit())
    return int(digits) if digits else 0


def _eval_scores(history: list[dict]) -> dict[int, dict[str, float]]:
    """`{step: {key: value}}` of the proxy and gold scores each evaluation logged."""
    found: dict[int, dict[str, float]] = {}
    for entry in history:
        if metrics.EVAL_REWARD in entry and "step" in entry:
            found[entry["step"]] = {
                k: v for k, v in entry.items() if k == metrics.EVAL_REWARD or k.startswith(metrics.EVAL_GOLD)
            }
    return found
