"""Over-optimisation as it happens with a learned proxy: the gold rises, peaks and falls. Measures of that shape over
seeds, and what `OverOptimizationCallback` would have done on each run, replayed from its evaluations.

A run is a dict with `method`, `seed` and `evals`, a list of `{"step", "proxy", "gold", "kl", "train_seconds"}` in
step order, the first at step 0 (the base model), as `benchmarks/overoptimization.py` writes them.

The peak is found on the seed-averaged gold curve, smoothed over `half_width` evaluations on each side, and then read
per seed in the same window. Choosing the step on the same runs that are then measured there biases the rise upwards
a little (the maximum of a noisy curve); averaging over seeds and a window before choosing keeps that small, and the
intervals are Student-t over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trl_guard.overoptimization import OverOptimizationCallback

from .overoptimization import means_by_step, pyplot_or_none, save_figure, t_interval, t_quantile


def window_mean(run: dict, index: int, key: str, half_width: int) -> float:
    """The mean of `key` over the evaluations `index - half_width .. index + half_width` of `run` (clipped)."""
    evals = run["evals"]
    low, high = max(0, index - half_width), min(len(evals), index + half_width + 1)
    return float(np.mean([e[key] for e in evals[low:high]]))


def peak_index(runs: list[dict], half_width: int = 1) -> int:
    """The evaluation index where the seed-averaged, window-smoothed gold is highest (runs share their steps)."""
    length = min(len(r["evals"]) for r in runs)
    smoothed = [np.mean([window_mean(r, i, "gold", half_width) for r in runs]) for i in range(length)]
    return int(np.argmax(smoothed))


@dataclass
class Shape:
    """The rise and fall of one method's runs: means with Student-t intervals over seeds (95% unless asked),
    as (mean, low, high)."""

    peak_step: int
    peak_gold: tuple[float, float, float]
    proxy_at_peak: tuple[float, float, float]
    rise: tuple[float, float, float]  # gold at the peak minus the base model's
    fall: tuple[float, float, float]  # gold at the peak minus gold at the end
    final_proxy_gain: tuple[float, float, float]  # proxy at the end minus at the peak

    @property
    def rises_then_falls(self) -> bool:
        """Both intervals above 0: the gold really rose above the base, and really fell after its peak."""
        return self.rise[1] > 0 and self.fall[1] > 0


def rise_and_fall(runs: list[dict], half_width: int = 1, level: float = 0.95) -> Shape:
    """The shape of one method's runs (at least two seeds for intervals), its intervals at `level`."""
    index = peak_index(runs, half_width)
    last = min(len(r["evals"]) for r in runs) - 1
    peak = [window_mean(r, index, "gold", half_width) for r in runs]
    end = [window_mean(r, last, "gold", half_width) for r in runs]
    proxy_peak = [window_mean(r, index, "proxy", half_width) for r in runs]
    proxy_end = [window_mean(r, last, "proxy", half_width) for r in runs]
    return Shape(
        peak_step=int(runs[0]["evals"][index]["step"]),
        peak_gold=t_interval(peak, level),
        proxy_at_peak=t_interval(proxy_peak, level),
        rise=t_interval(per_seed_rises(runs, index, half_width), level),
        fall=t_interval([p - e for p, e in zip(peak, end)], level),
        final_proxy_gain=t_interval([e - p for p, e in zip(proxy_peak, proxy_end)], level),
    )


def per_seed_rises(runs: list[dict], index: int, half_width: int = 1) -> list[float]:
    """Per run, the gold smoothed over the window at evaluation `index` minus the base model's (evaluation 0)."""
    return [window_mean(r, index, "gold", half_width) - window_mean(r, 0, "gold", 0) for r in runs]


def smallest_visible_rise(runs: list[dict], seeds: int, half_width: int = 1, level: float = 0.95) -> float:
    """The smallest mean rise whose Student-t interval over `seeds` seeds would clear 0, were the per-seed rises
    (at the seed-averaged peak, as `rise_and_fall` reads them) spread as in `runs`: t * sd / sqrt(seeds). A reading
    of what a number of seeds can show, not a test."""
    rises = per_seed_rises(runs, peak_index(runs, half_width), half_width)
    return t_quantile(seeds - 1, level) * float(np.std(rises, ddof=1)) / np.sqrt(seeds)


def early_change(runs: list[dict], half_width: int = 1) -> tuple[float, float, float]:
    """The gold over the evaluations 1 .. 1 + 2 * half_width (the first after the base) minus the base, with its
    Student-t interval over seeds: where a rise would begin, read at a fixed place instead of at a chosen peak."""
    return t_interval(per_seed_rises(runs, 1 + half_width, half_width))


@dataclass
class AlarmOutcome:
    """What `OverOptimizationCallback` (with `restore_best`) would have done on one run."""

    stop_step: int | None  # None: it let the run finish
    restored_gold: float  # the gold of the weights the run ends with (the best evaluation's when it stopped)
    best_gold: float  # the run's best evaluated gold, over the whole run
    last_gold: float  # the run's gold at its last evaluation, had it not stopped
    false_alarm: bool  # it stopped, yet the gold after the stop stayed within tolerance of the best so far, on average


def replay_alarm(run: dict, tolerance: float = 0.02, patience: int = 2) -> AlarmOutcome:
    """Feed the run's evaluations, in order, to the callback's own bookkeeping (`OverOptimizationCallback.update`)."""
    alarm = OverOptimizationCallback("gold", tolerance=tolerance, patience=patience, restore_best=True)
    evals = run["evals"]
    stop_at = next((i for i, e in enumerate(evals) if alarm.update(e["step"], e["gold"], e["proxy"])), None)
    best, last = max(e["gold"] for e in evals), evals[-1]["gold"]
    if stop_at is None:
        return AlarmOutcome(None, last, best, last, False)
    after = [e["gold"] for e in evals[stop_at + 1 :]]
    false_alarm = bool(after) and float(np.mean(after)) >= alarm.best_gold - tolerance
    return AlarmOutcome(int(evals[stop_at]["step"]), alarm.best_gold, best, last, false_alarm)


def alarm_summary(runs: list[dict], tolerance: float = 0.02, patience: int = 2) -> dict[str, object]:
    """Per method: how often the alarm stops, the gold it keeps against the run's best and last, and its false
    alarms (stops where the gold had not fallen)."""
    outcomes = [replay_alarm(r, tolerance, patience) for r in runs]
    return {
        "runs": len(outcomes),
        "stopped": sum(o.stop_step is not None for o in outcomes),
        "false_alarms": sum(o.false_alarm for o in outcomes),
        "restored_minus_best": t_interval([o.restored_gold - o.best_gold for o in outcomes]),
        "restored_minus_last": t_interval([o.restored_gold - o.last_gold for o in outcomes]),
        "stop_steps": [o.stop_step for o in outcomes],
    }


def proxy_gain_per_second(run: dict) -> float:
    """Proxy gained from the base to the last evaluation per second of training (evaluations excluded), as
    `train_seconds` records it."""
    first, last = run["evals"][0], run["evals"][-1]
    return (last["proxy"] - first["proxy"]) / last["train_seconds"] if last["train_seconds"] > 0 else float("nan")


def plot_rise_and_fall(
    runs: dict[str, list[dict]], plot_dir: str, name: str = "learned_proxy.png", proxy: str = "learned proxy"
) -> str | None:
    """Gold against step, against proxy (named `proxy`) and against sqrt(KL) per method: every run a thin line, each
    method's mean over seeds thick."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    colours = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method, group in runs.items():
        for run in group:
            evals = run["evals"]
            gold = [e["gold"] for e in evals]
            axes[0].plot([e["step"] for e in evals], gold, color=colours[method], alpha=0.3, lw=0.8)
            axes[1].plot([e["proxy"] for e in evals], gold, color=colours[method], alpha=0.3, lw=0.8)
            axes[2].plot([np.sqrt(max(e["kl"], 0.0)) for e in evals], gold, color=colours[method], alpha=0.3, lw=0.8)
        mean = means_by_step(group, ("step", "proxy", "gold", "kl"))
        label = f"{method} (mean of {len(group)})"
        axes[0].plot(mean["step"], mean["gold"], "o-", color=colours[method], lw=2, ms=3, label=label)
        axes[1].plot(mean["proxy"], mean["gold"], "o-", color=colours[method], lw=2, ms=3)
        axes[2].plot(np.sqrt(np.maximum(mean["kl"], 0.0)), mean["gold"], "o-", color=colours[method], lw=2, ms=3)
    axes[0].set(xlabel="optimizer step", ylabel="gold (caption fidelity, held out)", title="gold over training")
    axes[1].set(xlabel=f"{proxy} (held out)", ylabel="gold", title="gold against proxy")
    axes[2].set(xlabel="sqrt(KL to the base policy)", ylabel="gold", title="gold against sqrt(KL)")
    axes[0].legend(fontsize=8)
    return save_figure(fig, plot_dir, name)
