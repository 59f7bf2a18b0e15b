"""Draw the GRPO-Guard paper's diagnostics for one or more runs from what the trainer logged.

Each run directory holds `log_history.json` (written by `save_model`) or a `checkpoint-*/trainer_state.json`. The
report compares runs side by side:

- rewards, and evaluation proxy and gold scores, against step (the paper's Fig. 1 and 4);
- per-timestep mean and spread of the clipped log-ratio, and of plain `log r` (Fig. 2);
- per-timestep fractions of ratios above `1 + epsilon` and below `1 - epsilon` (Fig. 12);
- per-timestep gradient norms (Fig. 3);
- every evaluation's image grid of each run (the same prompts and seeds at several steps, the paper's Fig. 8).

It writes PNGs, the numbers behind them (`metrics.json`, `timesteps.csv`), and a self-contained `index.html`.
"""

from __future__ import annotations

import base64
import csv
import glob
import html
import json
import os
from collections import defaultdict

TIMESTEP_STATS = {
    "log_ratio": ("log_ratio_mean", "log_ratio_std"),
    "raw_log_ratio": ("raw_log_ratio_mean", None),
    "clip_frac": ("clip_frac_high", "clip_frac_low"),
    "grad_norm": ("grad_norm", None),
}


def load_log_history(run_dir: str) -> list[dict]:
    """The run's logged entries: `log_history.json`, else the newest checkpoint's `trainer_state.json`."""
    path = os.path.join(run_dir, "log_history.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    states = sorted(
        glob.glob(os.path.join(run_dir, "checkpoint-*", "trainer_state.json")),
        key=lambda p: int(p.split("checkpoint-")[-1].split(os.sep)[0]),
    )
    if not states:
        raise FileNotFoundError(
            f"{run_dir} has no log_history.json and no checkpoint-*/trainer_state.json: is it a trl_guard output_dir?"
        )
    with open(states[-1]) as f:
        return json.load(f)["log_history"]


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def timestep_table(history: list[dict]) -> dict[str, dict[int, float]]:
    """`{stat: {timestep: mean over the run}}` for every per-timestep statistic that was logged."""
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in history:
        for key, value in entry.items():
            if key.startswith("timestep/"):
                _, step, stat = key.split("/")
                values[stat][int(step)].append(value)
    return {stat: {t: sum(v) / len(v) for t, v in sorted(by_step.items())} for stat, by_step in values.items()}


def _figure_to_file(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def build_report(run_dirs: list[str], output_dir: str, labels: list[str] | None = None) -> str:
    """Write the report for `run_dirs` into `output_dir`; returns the path of `index.html`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('The report needs matplotlib: pip install "trl-guard[report]"') from error

    labels = labels or [os.path.basename(os.path.abspath(d)) for d in run_dirs]
    histories = {label: load_log_history(d) for label, d in zip(labels, run_dirs)}
    tables = {label: timestep_table(h) for label, h in histories.items()}
    os.makedirs(output_dir, exist_ok=True)
    figures: list[tuple[str, str]] = []

    # Rewards and evaluation scores against step.
    reward_keys = sorted(
        {
            k
            for h in histories.values()
            for e in h
            for k in e
            if k == "reward"
            or k.startswith(("rewards/", "eval_reward", "eval_rewards/", "eval_gold/"))
            and not k.endswith("/std")
        }
    )
    if reward_keys:
        fig, axes = plt.subplots(1, len(reward_keys), figsize=(4 * len(reward_keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], reward_keys):
            for label, history in histories.items():
                steps, values = series(history, key)
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].legend(fontsize=8)
        figures.append(
            (
                "Rewards and evaluation scores (proxy rising while gold falls is over-optimisation)",
                _figure_to_file(fig, os.path.join(output_dir, "rewards.png")),
            )
        )

    # Per-timestep diagnostics.
    panels = [
        ("log_ratio_mean", "log_ratio_std", "clipped log-ratio: mean ± std"),
        ("raw_log_ratio_mean", None, "plain log r: mean"),
        ("clip_frac_high", None, "fraction r > 1 + ε"),
        ("clip_frac_low", None, "fraction r < 1 − ε"),
        ("grad_norm", None, "gradient norm"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (stat, spread, title) in zip(axes[0], panels):
        for label, table in tables.items():
            if stat not in table:
                continue
            steps = list(table[stat])
            means = [table[stat][t] for t in steps]
            errors = [table[spread][t] for t in steps] if spread and spread in table else None
            ax.errorbar(steps, means, yerr=errors, marker="o", ms=3, capsize=2, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sampling step (0 = noisiest)")
        if stat == "grad_norm":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    figures.append(
        (
            "Per-timestep diagnostics, averaged over the run (paper Fig. 2, 12 and 3)",
            _figure_to_file(fig, os.path.join(output_dir, "timesteps.png")),
        )
    )

    # The numbers behind the plots.
    summary = {}
    for label, table in tables.items():
        norms = list(table.get("grad_norm", {}).values())
        summary[label] = {
            "final": {k: series(histories[label], k)[1][-1] for k in reward_keys if series(histories[label], k)[1]},
            "grad_norm_max_over_min": max(norms) / min(norms) if norms and min(norms) > 0 else None,
            "timesteps": table,
        }
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "timesteps.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "timestep", *sorted({s for t in tables.values() for s in t})])
        stats = sorted({s for t in tables.values() for s in t})
        for label, table in tables.items():
            for step in sorted({t for s in table.values() for t in s}):
                writer.writerow([label, step, *[table.get(s, {}).get(step, "") for s in stats]])

    grids = []  # every evaluation's grid: the same prompts and seeds at several steps (the paper's Fig. 8)
    for label, run_dir in zip(labels, run_dirs):
        for image in sorted(glob.glob(os.path.join(run_dir, "eval_images", "*.png"))):
            grids.append((f"{label}: {os.path.basename(image)[:-4]}", image))
    return _write_html(output_dir, figures, grids, summary)


def _embed(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _write_html(output_dir: str, figures, grids, summary) -> str:
    rows = []
    for label, data in summary.items():
        finals = ", ".join(f"{k} = {v:.4g}" for k, v in data["final"].items())
        ratio = data["grad_norm_max_over_min"]
        rows.append(
            f"<tr><td>{html.escape(label)}</td><td>{html.escape(finals)}</td>"
            f"<td>{'' if ratio is None else f'{ratio:.1f}x'}</td></tr>"
        )
    parts = [
        "<!doctype html><meta charset='utf-8'><title>trl_guard report</title>",
        "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}img{max-width:100%}"
        "td,th{padding:4px 8px;border-bottom:1px solid #ddd}</style>",
        "<h1>trl_guard report</h1>",
        "<table><tr><th>run</th><th>last logged values</th><th>grad-norm spread over timesteps</th></tr>",
        *rows,
        "</table>",
    ]
    for title, path in figures:
        parts += [f"<h2>{html.escape(title)}</h2>", f"<img src='{_embed(path)}'>"]
    if grids:
        parts.append("<h2>Evaluation images (same prompts and seeds at every evaluation)</h2>")
        for title, path in grids:
            parts += [
                f"<h3>{html.escape(title)}</h3>",
                f"<img src='{_embed(path)}' style='image-rendering:pixelated'>",
            ]
    path = os.path.join(output_dir, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
