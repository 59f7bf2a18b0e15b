"""The report's answer in words to "which run kept more gold at the same proxy?", with its gold-against-proxy figure.

`gold_at_proxy` is the measure it compares runs by; the multi-seed studies in benchmarks/ use the same one.
"""

from __future__ import annotations

import os

from .. import metrics
from .figures import FIGURE_WIDTH, _alt_text, _figure_to_file
from .runs import _gold_words, _name


def gold_at_proxy(run: dict, level: float, key: str = "proxy") -> float | None:
    """The gold score where the run's proxy (or another evaluation `key`, such as "kl") first reaches `level`,
    interpolated; None if it never does."""
    evals = run["evals"]
    for before, after in zip(evals, evals[1:]):
        if before[key] >= level:
            return before["gold"]
        if after[key] >= level:
            t = (level - before[key]) / (after[key] - before[key])
            return before["gold"] + t * (after["gold"] - before["gold"])
    return None


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
