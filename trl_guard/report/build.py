"""Draw the GRPO-Guard paper's diagnostics for one or more runs from what the trainer logged.

Each run directory holds `log_history.json` (written by `save_model`) or a `checkpoint-*/trainer_state.json`, and
usually `guard_config.json` (the run's settings: its loss type and clip range epsilon). The report compares runs side
by side:

- gold against proxy at every evaluation, and a short verdict in words (`gold_vs_proxy.png`);
- rewards, and evaluation proxy and gold scores, against optimizer step (`rewards.png`, the paper's Fig. 1 and 4);
- per sampling step, the log-ratio each run's loss clips and plain `log r` (`timesteps.png`, Fig. 2);
- per sampling step, the fractions of ratios above `1 + epsilon` and below `1 - epsilon` (`clip_fractions.png`,
  Fig. 12);
- per sampling step, gradient norms and the loss weight (`grad_norms.png`, Fig. 3);
- every evaluation's samples of each run (the same prompts and seeds at several steps, the paper's Fig. 8), captioned
  with their prompts when those are given.

It writes the PNGs, the numbers behind them (`metrics.json`, `timesteps.csv`), the verdict (`verdict.txt`) and a
self-contained `index.html` that leads with it.
"""

from __future__ import annotations

import base64
import csv
import glob
import html
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import metrics
from ..metrics import Stat, timestep_values

RUN_CONFIG = "guard_config.json"

# Figures are drawn 1,400 px wide, the page's widest, and the page scales them to its width: text stays sharp on a
# wide screen and, with 12-14 pt fonts, still readable at 1,000 px.
FIGURE_WIDTH = 14.0
DPI = 100
STYLE = {
    "font.size": 13,
    "axes.titlesize": 14,
    "axes.labelsize": 13,
    "legend.fontsize": 12,
    "xtick.labelsize": 12,
    "ytick.labelsize": 12,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
STEP_AXIS = "optimizer step"
SAMPLING_STEP_AXIS = "sampling step (0 = noisiest)"
# A symmetric-log axis shows at most this many decades on each side of its linear part.
SYMLOG_DECADES = 6

# An evaluation grid holds at most this many samples (the trainer's `_evaluate_dataset`), tiled as `make_grid` does.
GRID_SAMPLES = 16
# Samples on the page are at least this many CSS pixels wide: a 32 px toy sample is drawn 3x, pixel for pixel.
SAMPLE_MIN_WIDTH = 96
SAMPLE_MAX_WIDTH = 192


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


# ---- figures ----------------------------------------------------------------------------------------------------


def _figure_to_file(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _alt_text(fig) -> str:
    """The panels' titles and axis names: what the image shows, for readers and tests that cannot see it."""
    parts = []
    for ax in fig.axes:
        if not ax.get_visible() or not ax.get_title():
            continue
        text = ax.get_title().replace("\n", " ")
        axes_names = " against ".join(n for n in (ax.get_ylabel(), ax.get_xlabel()) if n)
        text += f" ({axes_names})" if axes_names else ""
        if ax.get_legend() is not None:
            text += ", lines: " + ", ".join(t.get_text() for t in ax.get_legend().get_texts())
        parts.append(text)
    return "; ".join(parts)


def _epsilon_text(epsilon: float | None) -> str:
    return "ε not recorded (no guard_config.json)" if epsilon is None else f"ε = {epsilon:g}"


def _symlog_threshold(values: Sequence[float]) -> float | None:
    """The decade just below the smallest non-zero magnitude, so every point sits on the logarithmic part; but at most
    `SYMLOG_DECADES` decades below the largest, so one value that is nearly 0 cannot squeeze the rest together."""
    magnitudes = [abs(v) for v in values if v and math.isfinite(v)]
    if not magnitudes:
        return None
    smallest = math.floor(math.log10(min(magnitudes)))
    largest = math.floor(math.log10(max(magnitudes)))
    return 10.0 ** max(smallest, largest - SYMLOG_DECADES)


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _rewards_figure(plt, histories: dict, colours: dict, keys: list[str], path: str) -> tuple[str, str]:
    """Each of `keys` against optimizer step, three panels a row; returns (alt text, PNG path)."""
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(FIGURE_WIDTH, 3.6 * rows), squeeze=False, layout="constrained")
    for ax, key in zip(axes.flat, keys):
        for label, history in histories.items():
            steps, values = series(history, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=4, label=label, color=colours[label])
        ax.set_title(metric_title(key).replace(" (", "\n(", 1))  # three panels a row: the aside on its own line
        ax.set_xlabel(STEP_AXIS)
        ax.set_ylabel("KL" if key == metrics.EVAL_KL else "score" if key.startswith("eval") else "reward")
        _integer_steps(ax)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    axes[0][0].legend()
    return _alt_text(fig), _figure_to_file(fig, path)


def _log_ratio_figure(plt, tables: dict, configs: dict, colours: dict, path: str) -> tuple[str, str]:
    """One panel per run for the log-ratio its loss clips, and one panel of plain `log r` for all runs.

    The clipped log-ratios differ by orders of magnitude: GRPO-Guard's normalised one is ~100x smaller than Flow-GRPO's
    `log r`, and within a run the noisy early steps are far smaller than the late ones. A shared linear axis flattens
    all but the largest, so each run gets its own panel on a symmetric-log scale. It is linear only near 0, up to the
    run's clip range (±epsilon, where clipping does nothing) or the smallest step's mean if that is smaller, and
    logarithmic beyond: both the early steps and how far outside the clip range the late ones land are visible, and
    the sign (the shift below 0 the paper shows) is kept. A log scale alone would drop the sign.
    """
    runs = [label for label, table in tables.items() if Stat.LOG_RATIO_MEAN in table]
    plain = [label for label, table in tables.items() if Stat.RAW_LOG_RATIO_MEAN in table]
    columns = min(3, max(1, len(runs)))
    run_rows = -(-len(runs) // columns) if runs else 0
    rows = run_rows + (1 if plain else 0)
    # per-run panels span up to ten decades: taller rows keep their tick labels apart
    heights = [4.4] * run_rows + ([3.8] if plain else [])
    fig = plt.figure(figsize=(FIGURE_WIDTH, sum(heights)), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.25)  # room between a panel's axis name and the title below it
    grid = fig.add_gridspec(rows, columns, height_ratios=heights)
    for index, label in enumerate(runs):
        ax = fig.add_subplot(grid[index // columns, index % columns])
        table = tables[label]
        steps = list(table[Stat.LOG_RATIO_MEAN])
        means = [table[Stat.LOG_RATIO_MEAN][t] for t in steps]
        stds = [table.get(Stat.LOG_RATIO_STD, {}).get(t, 0.0) for t in steps]
        lows, highs = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
        colour = colours[label]
        ax.fill_between(steps, lows, highs, color=colour, alpha=0.2)
        ax.plot(steps, means, "o-", ms=5, color=colour)
        ax.axhline(0.0, color="black", lw=0.8)
        epsilon = configs[label].get("epsilon")
        bounds = [math.log1p(epsilon), math.log1p(-epsilon)] if epsilon else []
        for bound in bounds:
            ax.axhline(bound, color="grey", ls="--", lw=1.2)
        # linear up to the clip range, or further down when early steps are smaller: their size must show too
        threshold = min(filter(None, (epsilon, _symlog_threshold(means))), default=None)
        symlog = _symlog_axis(ax, lows + highs + bounds + [0.0], threshold)
        loss = f"{configs[label]['loss_type']} loss" if configs[label].get("loss_type") else "loss type not recorded"
        dashed = "; dashed: ±ε" if epsilon else ""
        ax.set_title(f"{label}: mean log-ratio its loss clips\n({loss}, {_epsilon_text(epsilon)}{dashed})")
        ax.set_xlabel(SAMPLING_STEP_AXIS)
        ax.set_ylabel("log-ratio (symmetric log scale)" if symlog else "log-ratio")
        _integer_steps(ax)
    if plain:
        ax = fig.add_subplot(grid[run_rows, :])
        values = []
        for label in plain:
            by_step = tables[label][Stat.RAW_LOG_RATIO_MEAN]
            values += list(by_step.values())
            ax.plot(list(by_step), list(by_step.values()), "o-", ms=5, color=colours[label], label=label)
        ax.axhline(0.0, color="black", lw=0.8)
        symlog = _symlog_axis(ax, values + [0.0], _symlog_threshold(values))
        ax.set_title("Mean plain log-ratio log r per sampling step, every run on one scale (what Flow-GRPO clips)")
        ax.set_xlabel(SAMPLING_STEP_AXIS)
        ax.set_ylabel("log r (symmetric log scale)" if symlog else "log r")
        _integer_steps(ax)
        ax.legend()
    return _alt_text(fig), _figure_to_file(fig, path)


def _symlog_axis(ax, values: list[float], threshold: float | None) -> bool:
    """A symmetric-log y axis, linear within ±`threshold`, fitted to `values` with a margin on the drawn scale
    (matplotlib's own margins on a symlog axis can add empty decades). False, and a linear axis, when every value
    is 0 or `threshold` is unknown."""
    finite = [v for v in values if math.isfinite(v)]
    if not threshold or not any(finite):
        return False
    # the linear part spans two decades' height: the ticks at 0 and ±threshold need room for their labels
    ax.set_yscale("symlog", linthresh=threshold, linscale=2.0)
    ax.yaxis.get_major_locator().set_params(numticks=9)  # every other decade once there are many
    scale = ax.yaxis.get_transform()
    low, high = scale.transform(np.array([[min(finite)], [max(finite)]])).ravel()
    margin = 0.06 * (high - low) if high > low else 1.0
    ax.set_ylim(*scale.inverted().transform(np.array([[low - margin], [high + margin]])).ravel())
    return True


def _clip_figure(plt, tables: dict, configs: dict, colours: dict, path: str) -> tuple[str, str]:
    """Shares of ratios above 1 + epsilon and below 1 - epsilon per sampling step, each run's epsilon named."""
    epsilons = {configs[label].get("epsilon") for label in tables}
    shared = f" ({_epsilon_text(next(iter(epsilons)))})" if len(epsilons) == 1 else " (ε per run: see legend)"
    fig, axes = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 4.4), layout="constrained")
    # one scale for both panels, from 0, so the shares above and below compare at a glance
    highest = max(
        (v for t in tables.values() for s in (Stat.CLIP_FRAC_HIGH, Stat.CLIP_FRAC_LOW) for v in t.get(s, {}).values()),
        default=0,
    )
    panels = (
        (Stat.CLIP_FRAC_HIGH, f"Share of samples with ratio r above 1 + ε{shared}"),
        (Stat.CLIP_FRAC_LOW, f"Share of samples with ratio r below 1 − ε{shared}"),
    )
    for ax, (stat, title) in zip(axes, panels):
        for label, table in tables.items():
            if stat in table:
                by_step = table[stat]
                name = f"{label} ({_epsilon_text(configs[label].get('epsilon'))})"
                ax.plot(list(by_step), list(by_step.values()), "o-", ms=5, color=colours[label], label=name)
        ax.set_title(title)
        ax.set_xlabel(SAMPLING_STEP_AXIS)
        ax.set_ylim(0, max(highest, 0.01) * 1.08)
        ax.set_ylabel("fraction of samples")
        _integer_steps(ax)
    axes[0].legend()
    return _alt_text(fig), _figure_to_file(fig, path)


def _grad_norm_figure(plt, tables: dict, summary: dict, colours: dict, path: str) -> tuple[str, str]:
    """Gradient norm per sampling step (log scale) and, when logged, the loss weight that evens it out."""
    weighted = any("weight" in table for table in tables.values())
    fig, axes = plt.subplots(1, 2 if weighted else 1, figsize=(FIGURE_WIDTH, 4.4), layout="constrained", squeeze=False)
    ax = axes[0][0]
    for label, table in tables.items():
        if Stat.GRAD_NORM in table:
            by_step = table[Stat.GRAD_NORM]
            spread = summary[label]["grad_norm_max_over_min"]
            name = label + ("" if spread is None else f" (largest / smallest: {spread:.1f}x)")
            ax.plot(list(by_step), list(by_step.values()), "o-", ms=5, color=colours[label], label=name)
    ax.set_yscale("log")
    ax.set_title("Gradient norm per sampling step")
    ax.set_xlabel(SAMPLING_STEP_AXIS)
    ax.set_ylabel("gradient norm (log scale)")
    _integer_steps(ax)
    ax.legend()
    if weighted:
        ax = axes[0][1]
        for label, table in tables.items():
            if "weight" in table:
                by_step = table["weight"]
                ax.plot(list(by_step), list(by_step.values()), "o-", ms=5, color=colours[label], label=label)
        ax.set_yscale("log")
        ax.set_title("Loss weight per sampling step (GRPO-Guard evens out the gradients)")
        ax.set_xlabel(SAMPLING_STEP_AXIS)
        ax.set_ylabel("weight (log scale)")
        _integer_steps(ax)
        ax.legend()
    return _alt_text(fig), _figure_to_file(fig, path)


# ---- the report -------------------------------------------------------------------------------------------------


def build_report(
    run_dirs: Sequence[str],
    output_dir: str,
    labels: Sequence[str] | None = None,
    eval_prompts: Sequence[str] | None = None,
) -> str:
    """Write the report for `run_dirs` into `output_dir`; returns the path of `index.html`.

    Args:
        run_dirs: Each run's `output_dir`.
        output_dir: Where the page, its PNGs and the numbers go.
        labels: One distinct name per run, in order; by default each folder's name (with its parents when two
            folders share a name).
        eval_prompts: The evaluation prompts in the eval dataset's order, to caption each sample of the
            evaluation grids (a grid holds the first 16, tiled row by row, in a one-process run).

    Raises:
        FileNotFoundError: a run folder, or its logs, is missing.
        ReportInputError: the labels do not match the runs, or a run's logs are not what the trainer writes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import to_hex
    except ImportError as error:
        raise ImportError('The report needs matplotlib: pip install "trl-guard[report]"') from error

    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ReportInputError("No run folder given: pass at least one trl_guard output_dir.")
    labels = run_labels(run_dirs, labels)
    if eval_prompts is not None and not list(eval_prompts):
        raise ReportInputError("eval_prompts is empty: give the evaluation prompts in order, or leave it out.")
    histories = {label: load_log_history(d) for label, d in zip(labels, run_dirs)}
    configs = {label: load_run_config(d) for label, d in zip(labels, run_dirs)}
    tables = {label: timestep_table(h) for label, h in histories.items()}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # hex, as the page's CSS needs them too (a cycle may hold RGB tuples)
    colours = {label: to_hex(palette[i % len(palette)]) for i, label in enumerate(labels)}
    os.makedirs(output_dir, exist_ok=True)
    sections: list[dict] = []

    summary = {}
    for label, table in tables.items():
        norms = list(table.get(Stat.GRAD_NORM, {}).values())
        summary[label] = {
            "run_dir": os.path.abspath(run_dirs[labels.index(label)]),
            "given_as": run_dirs[labels.index(label)],
            "loss_type": configs[label].get("loss_type"),
            "epsilon": configs[label].get("epsilon"),
            "final": {},
            "grad_norm_max_over_min": max(norms) / min(norms) if norms and min(norms) > 0 else None,
            "timesteps": table,
        }

    with plt.rc_context(STYLE):
        # The answer first: gold against proxy for every run that evaluated both.
        verdict, verdict_figure = _verdict(histories, colours, output_dir, plt)
        with open(os.path.join(output_dir, "verdict.txt"), "w") as f:
            f.write(verdict)
        if verdict_figure:
            sections.append(
                {
                    "title": "Gold against proxy",
                    "text": "Each point is one evaluation, on the same prompts and seeds; lines join them in step "
                    "order. Moving right means training raised the proxy it optimises; a run whose line drops is "
                    "buying proxy with gold. At the same proxy, higher is better.",
                    "figure": verdict_figure,
                }
            )

        # Series that never change (in any run) say nothing and are left out.
        reward_keys = sorted(
            {
                k
                for h in histories.values()
                for e in h
                for k in e
                if k in ("reward", metrics.EVAL_KL)
                or k.startswith((metrics.REWARDS, metrics.EVAL_REWARD, metrics.EVAL_REWARDS, metrics.EVAL_GOLD))
                and not k.endswith("/std")
            },
            key=_reward_order,
        )
        for label in labels:
            summary[label]["final"] = {
                k: series(histories[label], k)[1][-1] for k in reward_keys if series(histories[label], k)[1]
            }
        varying, seen = [], set()
        for key in reward_keys:  # with one reward function, `rewards/<name>` repeats `reward`: draw it once
            curves = tuple(tuple(series(h, key)[1]) for h in histories.values())
            if len({v for curve in curves for v in curve}) > 1 and curves not in seen:
                varying.append(key)
                seen.add(curves)
        if varying:
            sections.append(
                {
                    "title": "Rewards and evaluation scores over training",
                    "text": "Training rewards are means over each sampling round; evaluation scores come from fixed "
                    "prompts and seeds. A proxy that keeps rising while a gold score falls is over-optimisation. "
                    "Series that never changed are left out.",
                    "figure": _rewards_figure(
                        plt, histories, colours, varying, os.path.join(output_dir, "rewards.png")
                    ),
                }
            )

        if any(Stat.LOG_RATIO_MEAN in t or Stat.RAW_LOG_RATIO_MEAN in t for t in tables.values()):
            sections.append(
                {
                    "title": "Log-ratio per sampling step (paper Fig. 2)",
                    "text": "log r = log p_new − log p_old of each sample's step, averaged over the run; sampling "
                    "step 0 is the noisiest. Each loss clips its own form of it: Flow-GRPO clips log r, GRPO-Guard "
                    "a normalised form about 100x smaller, hence their different ε. One panel per run shows the "
                    "form its loss clips (line: mean; band: ± one standard deviation over samples) on a "
                    "symmetric-log scale, logarithmic but for a linear stretch around 0 no wider than the clip range "
                    "±ε (dashed): steps orders of magnitude apart are all visible, and so is where each lands "
                    "against ε. A mean beyond −ε is a shifted ratio: clipping then acts on one side only. The wide "
                    "panel puts plain log r of every run on one scale.",
                    "figure": _log_ratio_figure(
                        plt, tables, configs, colours, os.path.join(output_dir, "timesteps.png")
                    ),
                }
            )
        if any(Stat.CLIP_FRAC_HIGH in t or Stat.CLIP_FRAC_LOW in t for t in tables.values()):
            sections.append(
                {
                    "title": "Clipping per sampling step (paper Fig. 12)",
                    "text": "The share of samples whose ratio r fell outside the clip range [1 − ε, 1 + ε], with each "
                    "run's ε from its guard_config.json. Similar shares above and below mean clipping restrains the "
                    "policy both ways; a large share on one side only means it is one-sided.",
                    "figure": _clip_figure(
                        plt, tables, configs, colours, os.path.join(output_dir, "clip_fractions.png")
                    ),
                }
            )
        if any(Stat.GRAD_NORM in t for t in tables.values()):
            sections.append(
                {
                    "title": "Gradient norm per sampling step (paper Fig. 3)",
                    "text": "The norm of the gradient each sampling step contributes, averaged over the logged "
                    "steps. Norms far apart mean some steps dominate training; GRPO-Guard's per-step loss weight "
                    "(right, 1 for Flow-GRPO) is there to even them out.",
                    "figure": _grad_norm_figure(
                        plt, tables, summary, colours, os.path.join(output_dir, "grad_norms.png")
                    ),
                }
            )

    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "timesteps.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        stats = sorted({s for t in tables.values() for s in t})
        writer.writerow(["run", "timestep", *stats])
        for label, table in tables.items():
            for step in sorted({t for s in table.values() for t in s}):
                writer.writerow([label, step, *[table.get(s, {}).get(step, "") for s in stats]])

    grids = {
        label: {_grid_step(image): image for image in glob.glob(os.path.join(run_dir, "eval_images", "*.png"))}
        for label, run_dir in zip(labels, run_dirs)
    }
    scores = {label: _eval_scores(history) for label, history in histories.items()}
    return _write_html(output_dir, verdict, sections, grids, scores, summary, colours, eval_prompts)


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


def _eval_runs(histories: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Per run, its evaluations that logged the proxy and exactly one chosen gold score, in step order."""
    golds = sorted({k for h in histories.values() for e in h for k in e if k.startswith(metrics.EVAL_GOLD)})
    if not golds:
        return {}
    gold = golds[0]
    return {
        label: [
            {"step": e.get("step", 0), "proxy": e[metrics.EVAL_REWARD], "gold": e[gold]}
            for e in history
            if metrics.EVAL_REWARD in e and gold in e
        ]
        for label, history in histories.items()
    }


def _verdict(histories: dict[str, list[dict]], colours, output_dir: str, plt) -> tuple[str, tuple | None]:
    """A short answer, in words, to "which run kept more gold at the same proxy?", and its plot."""
    from .overoptimization import gold_at_proxy

    runs = {label: evals for label, evals in _eval_runs(histories).items() if len(evals) >= 2}
    if not runs:
        return "", None
    golds = sorted({k for h in histories.values() for e in h for k in e if k.startswith(metrics.EVAL_GOLD)})
    gold_name = _gold_words(golds[0])

    # one panel per gold score (at most three): the verdict reads the first, the others show whether they agree
    shown = golds[:3]
    fig, axes = plt.subplots(1, len(shown), figsize=(FIGURE_WIDTH, 4.6), layout="constrained", squeeze=False)
    for ax, gold in zip(axes[0], shown):
        annotated = set()
        for label, history in histories.items():
            points = [
                (e[metrics.EVAL_REWARD], e[gold], e.get("step", 0))
                for e in history
                if metrics.EVAL_REWARD in e and gold in e
            ]
            if len(points) < 2:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=5, label=label, color=colours[label])
            for (x, y, step), offset in ((points[0], (4, -14)), (points[-1], (4, 4))):
                if (x, y, step) not in annotated:  # runs from the same base start at the same point: name it once
                    ax.annotate(f"step {step}", (x, y), textcoords="offset points", xytext=offset, fontsize=11)
                    annotated.add((x, y, step))
        ax.set_title(f"Gold score {_name(gold[len(metrics.EVAL_GOLD) :])} against proxy, per evaluation")
        ax.set_xlabel("evaluation proxy reward")
        ax.set_ylabel(f"gold score: {_name(gold[len(metrics.EVAL_GOLD) :])}")
        ax.legend()
    alt = _alt_text(fig)
    path = _figure_to_file(fig, os.path.join(output_dir, "gold_vs_proxy.png"))
    lines = []
    if len(runs) >= 2:
        # the highest proxy every run reached: compare gold there, where all runs have been
        level = min(max(e["proxy"] for e in evals) for evals in runs.values())
        start = max(evals[0]["proxy"] for evals in runs.values())
        if level <= start:
            stuck = [label for label, evals in runs.items() if max(e["proxy"] for e in evals) <= start]
            lines.append(
                f"{', '.join(stuck)} never raised the proxy above {start:.4g}, where the runs started: there is no "
                "proxy level all runs passed, so gold cannot be compared at matched proxy."
            )
        else:
            at_level = {label: gold_at_proxy({"evals": evals}, level) for label, evals in runs.items()}
            ranked = sorted(at_level.items(), key=lambda item: -item[1])
            gap = ranked[0][1] - ranked[1][1]
            lines.append(
                f"At proxy {level:.4g} (the highest every run reached), the {gold_name} is "
                + ", ".join(f"{value:.3f} for {label}" for label, value in ranked)
                + (f": {ranked[0][0]} kept {gap:.3f} more gold at the same proxy." if gap > 0 else ": level.")
            )
            lines.append(
                "These are single runs, without intervals: differences this size need several seeds before they "
                "mean anything (benchmarks/overoptimization.py runs the multi-seed study)."
            )
    for label, evals in runs.items():
        lines.append(
            f"{label}: proxy {evals[0]['proxy']:.3f} to {evals[-1]['proxy']:.3f}, {gold_name} {evals[0]['gold']:.3f} "
            f"to {evals[-1]['gold']:.3f} (steps {evals[0]['step']} to {evals[-1]['step']})."
        )
    return "\n".join(lines), (alt, path)


# ---- the page ---------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1400px;margin:auto;padding:0 16px 48px;
  color:#1d2330;line-height:1.45}
h1{margin-bottom:.2em}
h2{margin-top:1.8em;border-bottom:1px solid #dde2ea;padding-bottom:.2em}
p.lead{color:#4a5568;max-width:75em}
figure{margin:0}
figure.plot img{display:block;width:100%;height:auto}
figure.plot figcaption{color:#4a5568;font-size:.9em;margin-top:.3em}
table{border-collapse:collapse}
td,th{padding:4px 10px;border-bottom:1px solid #dde2ea;vertical-align:top;text-align:left}
th{font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{background:#f3f6fa;border-left:4px solid #3a6ea5;padding:8px 16px;font-size:1.05em}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.4em;vertical-align:baseline}
.evaluation h3{margin:1.2em 0 .2em}
.evaluation .scores{color:#4a5568;margin:0 0 .6em;padding:0;list-style:none}
.grids{display:flex;flex-wrap:wrap;gap:16px}
.grids figure img{display:block;max-width:100%;height:auto}
.samples{display:grid;gap:14px 12px}
.sample{background:#f7f8fa;border:1px solid #e2e6ed;border-radius:6px;padding:6px}
.sample .pair{display:flex;gap:4px;justify-content:center}
.sample .pair figure{text-align:center;font-size:.75em;color:#4a5568}
.sample .pair img{display:block}
.sample figcaption.prompt{font-size:.85em;margin-top:4px;overflow-wrap:anywhere}
img.pixels{image-rendering:pixelated}
details{margin-top:1em}
summary{cursor:pointer;font-weight:600}
"""


def _embed(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _embed_image(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _display_width(natural: int, smallest: int, largest: int) -> tuple[int, bool]:
    """CSS width for an image `natural` px wide: small images scaled up by a whole factor (sharp pixels) to at least
    `smallest`, large ones down to at most `largest`. Also whether it was scaled up."""
    if natural < smallest:
        return natural * math.ceil(smallest / natural), True
    return min(natural, largest), False


def _tiles(path: str, count: int) -> list | None:
    """The `count` samples of an evaluation grid, cut apart as `make_grid` tiled them (ceil(sqrt(n)) per row), or
    None when the grid's size does not fit that layout (videos are one strip per row)."""
    from PIL import Image

    if os.path.exists(path[: -len(".png")] + ".gif"):  # a video grid: one frame strip per row, not square tiles
        return None
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    if grid.width % columns or grid.height % rows:
        return None
    width, height = grid.width // columns, grid.height // rows
    return [
        grid.crop(
            ((i % columns) * width, (i // columns) * height, (i % columns + 1) * width, (i // columns + 1) * height)
        )
        for i in range(count)
    ]


def _scores_text(label: str, values: dict[str, float] | None) -> str:
    if not values:
        return f"{label}: no scores logged"
    words = [f"proxy {values[metrics.EVAL_REWARD]:.3f}"] if metrics.EVAL_REWARD in values else []
    words += [f"{_gold_words(k)} {v:.3f}" for k, v in values.items() if k.startswith(metrics.EVAL_GOLD)]
    return f"{label}: " + ", ".join(words)


def _evaluation_html(step, grids, scores, colours, prompts) -> list[str]:
    labels = [label for label in grids if step in grids[label]]
    parts = [
        "<section class='evaluation'>",
        f"<h3>Evaluation at optimizer step {step}{' (before training)' if step == 0 else ''}</h3>",
        "<ul class='scores'>",
        *[
            f"<li><span class='swatch' style='background:{colours[lb]}'></span>"
            f"{html.escape(_scores_text(lb, scores[lb].get(step)))}</li>"
            for lb in labels
        ],
        "</ul>",
    ]
    tiles = None
    if prompts:
        count = min(GRID_SAMPLES, len(prompts))
        tiles = {label: _tiles(grids[label][step], count) for label in labels}
        if any(t is None for t in tiles.values()):
            tiles = None
    if tiles:
        # one card per prompt: the runs' samples side by side (same prompt, same seed) above the prompt
        sample = next(iter(tiles.values()))[0]
        width, upscaled = _display_width(sample.width, SAMPLE_MIN_WIDTH, SAMPLE_MAX_WIDTH)
        # as many cards a row as fit, stretched to share the row: no ragged gap at the right edge
        card = len(labels) * (width + 4) + 14
        parts.append(f"<div class='samples' style='grid-template-columns:repeat(auto-fill,minmax({card}px,1fr))'>")
        for index in range(len(next(iter(tiles.values())))):
            parts.append("<figure class='sample'><div class='pair'>")
            for label in labels:
                parts.append(
                    f"<figure><img class='{'pixels' if upscaled else ''}' width='{width}' "
                    f"src='{_embed_image(tiles[label][index])}' "
                    f"alt='{html.escape(label)}: {html.escape(prompts[index])}'>"
                    + (  # with one run, its name under every sample says nothing
                        f"<span class='swatch' style='background:{colours[label]}'></span>{html.escape(label)}"
                        if len(labels) > 1
                        else ""
                    )
                    + "</figure>"
                )
            parts.append(
                f"</div><figcaption class='prompt' style='max-width:{len(labels) * (width + 4)}px'>"
                f"{html.escape(prompts[index])}</figcaption></figure>"
            )
        parts.append("</div>")
    else:
        from PIL import Image

        parts.append("<div class='grids'>")
        for label in labels:
            with Image.open(grids[label][step]) as image:
                natural = image.width
            # two grids side by side fill a 1,400 px page; small grids are scaled up by whole factors to get there
            width, upscaled = _display_width(natural, 384, 660)
            parts.append(
                f"<figure><img class='{'pixels' if upscaled else ''}' width='{width}' "
                f"src='{_embed(grids[label][step])}' alt='evaluation samples of {html.escape(label)} at step {step}'>"
                f"<figcaption><span class='swatch' style='background:{colours[label]}'></span>"
                f"{html.escape(label)}, step {step}</figcaption></figure>"
            )
        parts.append("</div>")
        if prompts:  # the grid could not be cut into samples: name them in the grid's order instead
            parts.append("<p class='scores'>The samples, row by row:</p><ol class='prompts'>")
            parts += [f"<li>{html.escape(prompt)}</li>" for prompt in prompts[:GRID_SAMPLES]]
            parts.append("</ol>")
    parts.append("</section>")
    return parts


def _table_row(name: str, cells: list[str]) -> str:
    return (
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td class='num'>{html.escape(c)}</td>" for c in cells)
        + "</tr>"
    )


def _write_html(output_dir, verdict, sections, grids, scores, summary, colours, prompts) -> str:
    labels = list(summary)
    title = "trl_guard report: " + " vs ".join(labels)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='lead'>What each run logged, drawn as in the GRPO-Guard paper: whether training bought its proxy "
        "reward with gold score, then the per-sampling-step diagnostics that explain why (the log-ratio, how often "
        "it was clipped, and each step's gradient), then the evaluation samples themselves.</p>",
        "<h2>Runs</h2>",
        "<table><tr><th>run</th><th>loss type</th><th>clip range ε</th><th>folder</th></tr>",
    ]
    for label, data in summary.items():
        epsilon = "not recorded" if data["epsilon"] is None else f"{data['epsilon']:g}"
        parts.append(
            f"<tr><td><span class='swatch' style='background:{colours[label]}'></span>{html.escape(label)}</td>"
            f"<td>{html.escape(str(data['loss_type'] or 'not recorded'))}</td><td>{epsilon}</td>"
            f"<td><code>{html.escape(data['given_as'])}</code></td></tr>"
        )
    parts.append("</table>")
    if verdict:
        parts.append("<h2>Verdict</h2><div class='verdict'>")
        parts += [f"<p>{html.escape(line)}</p>" for line in verdict.splitlines()]
        parts.append("</div>")
    for section in sections:
        alt, path = section["figure"]
        parts += [
            f"<h2>{html.escape(section['title'])}</h2>",
            f"<figure class='plot'><img src='{_embed(path)}' alt='{html.escape(alt)}'>",
            f"<figcaption>{html.escape(section['text'])}</figcaption></figure>",
        ]
    if any(grids.values()):
        steps = sorted({step for by_step in grids.values() for step in by_step})
        parts.append("<h2>Evaluation samples</h2>")
        parts.append(
            "<p class='lead'>The same prompts and seeds at every evaluation, so each run's samples can be compared "
            "with each other and with the base model's at the first evaluation."
            + (
                ""
                if prompts
                else " Each grid holds the first samples of the evaluation set, row by row; pass the evaluation "
                "prompts (--eval-prompts) to see each sample with its prompt."
            )
            + "</p>"
        )
        shown = steps if len(steps) <= 2 else [steps[0], steps[-1]]
        for step in shown:
            parts += _evaluation_html(step, grids, scores, colours, prompts)
        hidden = [step for step in steps if step not in shown]
        if hidden:
            parts.append(f"<details><summary>The {len(hidden)} evaluations in between</summary>")
            for step in hidden:
                parts += _evaluation_html(step, grids, scores, colours, prompts)
            parts.append("</details>")
    keys = sorted({k for data in summary.values() for k in data["final"]}, key=_reward_order)
    parts.append("<h2>Last logged values</h2><table><tr><th>quantity</th>")
    parts += [f"<th>{html.escape(label)}</th>" for label in labels]
    parts.append("</tr>")
    for key in keys:
        values = [summary[label]["final"].get(key) for label in labels]
        parts.append(_table_row(metric_title(key), ["" if v is None else f"{v:.4g}" for v in values]))
    spreads = [summary[label]["grad_norm_max_over_min"] for label in labels]
    parts.append(
        _table_row(
            "Gradient norm, largest over smallest sampling step", ["" if v is None else f"{v:.1f}x" for v in spreads]
        )
    )
    parts.append("</table>")
    parts.append(
        "<p class='lead'>The numbers behind the figures are in metrics.json and timesteps.csv next to this page.</p>"
    )
    parts.append("</body></html>")
    path = os.path.join(output_dir, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
