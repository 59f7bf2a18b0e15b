"""The report's matplotlib figures: rewards against optimizer step, and per sampling step the log-ratio, the clip
fractions and the gradient norms. Each takes pyplot from the caller (which picks the backend and style) and returns
the figure's alt text and the path of its PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .. import metrics
from ..metrics import Stat
from .runs import metric_title, series

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
        # with epsilon >= 1 (AWM's default is 1) the lower clip bound 1 - epsilon <= 0 has no log: draw the upper one
        has_lower = bool(epsilon) and epsilon < 1
        bounds = [math.log1p(epsilon)] if epsilon else []
        bounds += [math.log1p(-epsilon)] if has_lower else []
        for bound in bounds:
            ax.axhline(bound, color="grey", ls="--", lw=1.2)
        # linear up to the clip range, or further down when early steps are smaller: their size must show too
        threshold = min(filter(None, (epsilon, _symlog_threshold(means))), default=None)
        symlog = _symlog_axis(ax, lows + highs + bounds + [0.0], threshold)
        loss = f"{configs[label]['loss_type']} loss" if configs[label].get("loss_type") else "loss type not recorded"
        dashed = "" if not epsilon else "; dashed: ±ε" if has_lower else "; dashed: +ε only, 1 − ε ≤ 0 has no log"
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
