"""Draw the GRPO-Guard paper's diagnostics for one or more runs from what the trainer logged.

Each run directory holds `log_history.json` (written by `save_model`) or a `checkpoint-*/trainer_state.json`. The
report compares runs side by side:

- rewards, and evaluation proxy and gold scores, against step (the paper's Fig. 1 and 4);
- per-timestep mean and spread of the clipped log-ratio, and of plain `log r` (Fig. 2);
- per-timestep fractions of ratios above `1 + epsilon` and below `1 - epsilon` (Fig. 12);
- per-timestep gradient norms (Fig. 3);
- every evaluation's image grid of each run (the same prompts and seeds at several steps, the paper's Fig. 8).

It writes PNGs, the numbers behind them (`metrics.json`, `timesteps.csv`), the short verdict on gold against proxy
(`verdict.txt`) and a self-contained `index.html` that leads with it.
"""

from __future__ import annotations

import base64
import csv
import glob
import html
import json
import os

from .. import metrics
from ..metrics import timestep_values

TIMESTEP_STATS = {
    "log_ratio": ("log_ratio_mean", "log_ratio_std"),
    "raw_log_ratio": ("raw_log_ratio_mean", None),
    "clip_frac": ("clip_frac_high", "clip_frac_low"),
    "grad_norm": ("grad_norm", None),
}


def load_log_history(run_dir: str) -> list[dict]:
    """The run's logged entries: `log_history.json`, else the newest checkpoint's `trainer_state.json`."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} does not exist (or is not a folder): give a trl_guard output_dir.")
    path = os.path.join(run_dir, "log_history.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)

    def step(state_path: str) -> int:  # checkpoint-<step>; other names (checkpoint-best) sort first
        suffix = os.path.basename(os.path.dirname(state_path)).split("checkpoint-")[-1]
        return int(suffix) if suffix.isdigit() else -1

    states = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*", "trainer_state.json")), key=step)
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
    values = timestep_values(history)
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

    # The answer first: gold against proxy for every run that evaluated both.
    verdict, verdict_figure = _verdict(histories, output_dir, plt)
    with open(os.path.join(output_dir, "verdict.txt"), "w") as f:
        f.write(verdict)
    if verdict_figure:
        figures.append(("Gold against proxy at every evaluation (each point one evaluation)", verdict_figure))

    # Rewards and evaluation scores against step; series that never change (in any run) say nothing and are left out.
    reward_keys = sorted(
        {
            k
            for h in histories.values()
            for e in h
            for k in e
            if k == "reward"
            or k.startswith((metrics.REWARDS, metrics.EVAL_REWARD, metrics.EVAL_REWARDS, metrics.EVAL_GOLD))
            and not k.endswith("/std")
        }
    )
    varying, seen = [], set()
    for key in reward_keys:  # with one reward function, `rewards/<name>` repeats `reward`: draw it once
        curves = tuple(tuple(series(h, key)[1]) for h in histories.values())
        if len({v for curve in curves for v in curve}) > 1 and curves not in seen:
            varying.append(key)
            seen.add(curves)
    if varying:
        columns = min(3, len(varying))
        rows = -(-len(varying) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), squeeze=False)
        for ax, key in zip(axes.flat, varying):
            for label, history in histories.items():
                steps, values = series(history, key)
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("step")
        for ax in list(axes.flat)[len(varying) :]:
            ax.set_visible(False)
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
    fig, axes = plt.subplots(2, 3, figsize=(13.8, 6.6), squeeze=False)
    axes[1][2].set_visible(False)
    for ax, (stat, spread, title) in zip(axes.flat, panels):
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

    # Every evaluation's grid: the same prompts and seeds at several steps (the paper's Fig. 8), runs as rows.
    grids = {
        label: {_grid_step(image): image for image in glob.glob(os.path.join(run_dir, "eval_images", "*.png"))}
        for label, run_dir in zip(labels, run_dirs)
    }
    return _write_html(output_dir, verdict, figures, grids, summary)


def _grid_step(path: str) -> int:
    name = os.path.basename(path)[:-4]
    digits = "".join(c for c in name.split("-")[-1] if c.isdigit())
    return int(digits) if digits else 0


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


def _verdict(histories: dict[str, list[dict]], output_dir: str, plt) -> tuple[str, str | None]:
    """A short answer, in words, to "which run kept more gold at the same proxy?", and its plot."""
    from .overoptimization import gold_at_proxy

    runs = {label: evals for label, evals in _eval_runs(histories).items() if len(evals) >= 2}
    if not runs:
        return "", None
    gold_name = next(k for h in histories.values() for e in h for k in e if k.startswith(metrics.EVAL_GOLD))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, evals in runs.items():
        ax.plot([e["proxy"] for e in evals], [e["gold"] for e in evals], "o-", ms=4, label=label)
        ax.annotate(f"step {evals[-1]['step']}", (evals[-1]["proxy"], evals[-1]["gold"]), fontsize=7)
    ax.set(xlabel="proxy (eval_reward)", ylabel=gold_name, title="gold against proxy")
    ax.legend(fontsize=8)
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
                f"At proxy {level:.4g} (the highest every run reached), {gold_name} is "
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
    return "\n".join(lines), path


def _embed(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _write_html(output_dir: str, verdict: str, figures, grids: dict[str, dict[int, str]], summary) -> str:
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
        "<style>body{font-family:sans-serif;max-width:1400px;margin:auto;padding:0 16px}img{max-width:100%}"
        "td,th{padding:4px 8px;border-bottom:1px solid #ddd;vertical-align:top}"
        ".verdict{background:#f3f6fa;border-left:4px solid #3a6ea5;padding:8px 16px;font-size:1.05em}"
        ".grids img{width:224px;image-rendering:pixelated}.grids th{text-align:left}</style>",
        "<h1>trl_guard report</h1>",
    ]
    if verdict:
        parts.append("<div class='verdict'>" + "".join(f"<p>{html.escape(line)}</p>" for line in verdict.splitlines()))
        parts.append("</div>")
    for title, path in figures:
        parts += [f"<h2>{html.escape(title)}</h2>", f"<img src='{_embed(path)}'>"]
    if any(grids.values()):
        steps = sorted({step for by_step in grids.values() for step in by_step})
        parts.append("<h2>Evaluation images: the same prompts and seeds at every evaluation (runs as rows)</h2>")
        parts.append("<div class='grids' style='overflow-x:auto'><table><tr><th>run</th>")
        parts += [f"<th>step {step}</th>" for step in steps]
        parts.append("</tr>")
        for label, by_step in grids.items():
            cells = [f"<td><img src='{_embed(by_step[s])}'></td>" if s in by_step else "<td></td>" for s in steps]
            parts.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
        parts.append("</table></div>")
    parts += [
        "<h2>Last logged values</h2>",
        "<table><tr><th>run</th><th>last logged values</th><th>grad-norm spread over timesteps</th></tr>",
        *rows,
        "</table>",
    ]
    path = os.path.join(output_dir, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
