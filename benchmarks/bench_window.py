"""The SDE window on the toy world: cost per round, and proxy and gold reached after equal training time.

    python benchmarks/bench_window.py run [--seeds 3] [--steps 40] [--shard 0/2]
    python benchmarks/bench_window.py cost [--repeats 3]      # on an idle machine
    python benchmarks/bench_window.py analyse

Flow-GRPO and GRPO-Guard, each at its study learning rate (`docs/results/overoptimization_sweep.json`), with every
step trained (T=10, `timestep_fraction=0.99`, steps 0-8) against SDE windows of 2 and 3 steps in the noisier half
(`sde_window_range=[0, 5]`). Runs use the over-optimisation study's setting (`benchmarks/overoptimization.py`) and
record, at every evaluation (every 5 steps), the proxy, the gold scores, the KL from the base and the seconds spent
training so far. Each finished run is appended to `docs/results/window.json` at once, and runs already there are
skipped, so a stopped benchmark resumes.

`analyse` prints the seconds per optimizer step of each configuration and the proxy and gold at equal training
time: the longest run of the configuration that trains fastest, interpolated per run, as the mean over seeds with its 95%
bootstrap interval; the window's cost and speed-up against the full trajectory; and gold at matched proxy levels,
because a faster proxy gain is worth nothing if the gold score pays for it. It draws `docs/results/window.png`:
proxy against training time and gold against proxy, every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overoptimization import RESULTS, SWEEP_FILE, append, best_rates, load, toy_trainer, train_run  # noqa: E402

WINDOW_FILE = os.path.join(RESULTS, "window.json")
COST_FILE = os.path.join(RESULTS, "window_cost.json")
WINDOWS = {"full": {}, "window2": {"sde_window_size": 2}, "window3": {"sde_window_size": 3}}


def window_fields(window: str) -> dict:
    fields = dict(WINDOWS[window])
    if fields:
        fields["sde_window_range"] = [0, 5]  # the noisier half of T=10
    return fields


def done(method: str, window: str, seed: int) -> bool:
    return any(
        r["method"] == method and r["window"] == window and r["seed"] == seed for r in load(WINDOW_FILE)["runs"]
    )


def run(options) -> None:
    shard, shards = (int(x) for x in options.shard.split("/"))
    rates = best_rates(load(SWEEP_FILE))
    plan = [
        (method, window, seed)
        for seed in range(options.seeds)
        for method in ("flow_grpo", "grpo_guard")
        for window in WINDOWS
    ]
    for method, window, seed in plan[shard::shards]:
        if done(method, window, seed):
            continue
        print(f"{method} {window} seed {seed} ...", flush=True)
        overrides = window_fields(window)
        result = train_run(
            method,
            seed,
            rates[method],
            options.steps,
            f"/tmp/window/{method}-{window}-{seed}",
            eval_steps=5,
            **overrides,
        )
        result["window"] = window
        append(WINDOW_FILE, result)
        last = result["evals"][-1]
        print(f"  {last['train_seconds']:.0f} s of training; proxy {last['proxy']:.3f}, gold {last['gold']:.3f}")


def cost(options) -> None:
    """Seconds per optimizer step of each configuration in one process, one thread, alternating configurations,
    evaluation off: the cost ratio without the noise of two runs side by side on a shared machine. The first round
    (warm-up) is left out; the rest is timed from step end to step end. Written to `docs/results/window_cost.json`."""
    import tempfile

    import torch
    from bench_trainer import StepClock

    torch.set_num_threads(1)
    rate = best_rates(load(SWEEP_FILE))["grpo_guard"]  # the loss does not change the cost of a step
    seconds: dict[str, list[float]] = {window: [] for window in WINDOWS}
    for repeat in range(options.repeats):
        for window in WINDOWS:
            with tempfile.TemporaryDirectory() as output_dir:
                fields = dict(eval_strategy="no", eval_kl=False, **window_fields(window))
                trainer = toy_trainer("grpo_guard", repeat, rate, options.cost_steps, output_dir, **fields)
                stamps: list[float] = []
                trainer.add_callback(StepClock(stamps))
                trainer.train()
            per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)  # after the first round
            seconds[window].append(round(per_step, 3))
            print(f"{window} repeat {repeat}: {per_step:.2f} s per optimizer step", flush=True)
    with open(COST_FILE, "w") as f:
        json.dump({"seconds_per_step": seconds, "steps": options.cost_steps, "threads": 1}, f, indent=1)
    full = np.median(seconds["full"])
    for window in WINDOWS:
        print(
            f"{window}: median {np.median(seconds[window]):.2f} s per step, {np.median(seconds[window]) / full:.2f}x"
        )


def at_step(run: dict, step: float, key: str) -> float:
    return float(np.interp(step, [e["step"] for e in run["evals"]], [e[key] for e in run["evals"]]))


def at_time(run: dict, seconds: float, key: str) -> float:
    times = [e["train_seconds"] for e in run["evals"]]
    return float(np.interp(seconds, times, [e[key] for e in run["evals"]]))


def analyse(plot_dir: str | None = None) -> str:
    from analysis.overoptimization import bootstrap, fmt, matched_levels

    from trl_guard.report.verdict import gold_at_proxy

    runs = load(WINDOW_FILE)["runs"]
    if not runs:
        return "No window runs yet: run `python benchmarks/bench_window.py run` first."
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["window"]), []).append(r)
    budget = min(max(r["evals"][-1]["train_seconds"] for r in group) for group in groups.values())
    lines = [
        f"Equal training time: {budget:.0f} s (the shortest configuration's longest run).",
        "",
        "| method | window | seeds | s per optimizer step | proxy at equal time | gold at equal time | "
        "proxy gained per CPU-second |",
        "|---|---|---|---|---|---|---|",
    ]
    per_step, gain = {}, {}
    for (method, window), group in sorted(groups.items()):
        per_step[method, window] = [r["evals"][-1]["train_seconds"] / r["evals"][-1]["step"] for r in group]
        proxy = [at_time(r, budget, "proxy") for r in group]
        gold = [at_time(r, budget, "gold") for r in group]
        gain[method, window] = [(p - r["evals"][0]["proxy"]) / budget for p, r in zip(proxy, group)]
        lines.append(
            f"| {method} | {window} | {len(group)} | {fmt(bootstrap(per_step[method, window]), 2)} | "
            f"{fmt(bootstrap(proxy))} | {fmt(bootstrap(gold))} | {fmt(bootstrap(gain[method, window]), 5)} |"
        )
    lines += ["", "Against the full trajectory (ratios of the means over seeds; goals: cost <= 0.5x, gain >= 2x):", ""]
    lines += ["| method | window | cost of a step | proxy gained per CPU-second |", "|---|---|---|---|"]
    for method, window in sorted(groups):
        if window == "full" or (method, "full") not in groups:
            continue
        cost = np.mean(per_step[method, window]) / np.mean(per_step[method, "full"])
        speed = np.mean(gain[method, window]) / np.mean(gain[method, "full"])
        lines.append(f"| {method} | {window} | {cost:.2f}x | {speed:.2f}x |")
    if os.path.exists(COST_FILE):
        lines += clean_equal_time(groups)
    lines += ["", "Gold at matched proxy (mean over seeds that reach the level, 95% bootstrap interval):", ""]
    for method in sorted({m for m, _ in groups}):
        windows = {w: g for (m, w), g in groups.items() if m == method}
        levels = matched_levels(windows, count=4)
        if not levels:
            continue
        lines += [
            f"| {method}: window | " + " | ".join(f"proxy {level:.3f}" for level in levels) + " |",
            "|---" * (len(levels) + 1) + "|",
        ]
        for window, group in sorted(windows.items()):
            cells = []
            for level in levels:
                reached = [g for g in (gold_at_proxy(r, level) for r in group) if g is not None]
                cells.append(f"{fmt(bootstrap(reached))} ({len(reached)})")
            lines.append(f"| {window} | " + " | ".join(cells) + " |")
        lines.append("")
    if plot_dir:
        path = plot(groups, plot_dir)
        if path:
            lines.append(f"Plot: {path}")
    return "\n".join(lines)


def clean_equal_time(groups: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Equal time from the idle one-process cost (`cost`): a configuration's runs are read at the step it reaches
    within the time the fastest configuration needs for its last step."""
    from analysis.overoptimization import bootstrap, fmt

    with open(COST_FILE) as f:
        seconds = {w: float(np.median(v)) for w, v in json.load(f)["seconds_per_step"].items()}
    last = min(max(r["evals"][-1]["step"] for r in group) for group in groups.values())
    budget = last * min(seconds[w] for _, w in groups)
    lines = [
        "",
        f"With the idle cost ({', '.join(f'{w} {s:.2f} s' for w, s in seconds.items())} per optimizer step, "
        f"`python benchmarks/bench_window.py cost`): equal time {budget:.0f} s.",
        "",
        "| method | window | steps in that time | proxy | gold | proxy gained per CPU-second | against full |",
        "|---|---|---|---|---|---|---|",
    ]
    gains: dict[tuple[str, str], float] = {}
    for (method, window), group in sorted(groups.items()):
        step = budget / seconds[window]
        proxy = [at_step(r, step, "proxy") for r in group]
        gold = [at_step(r, step, "gold") for r in group]
        gain = [(p - r["evals"][0]["proxy"]) / budget for p, r in zip(proxy, group)]
        gains[method, window] = float(np.mean(gain))
        full = gains.get((method, "full"))
        ratio = f"{gains[method, window] / full:.2f}x" if full else ""
        lines.append(
            f"| {method} | {window} | {step:.0f} | {fmt(bootstrap(proxy))} | {fmt(bootstrap(gold))} | "
            f"{fmt(bootstrap(gain), 5)} | {ratio} |"
        )
    return lines


def plot(groups: dict[tuple[str, str], list[dict]], plot_dir: str) -> str | None:
    """Per method: proxy against training seconds, and gold against proxy; every run thin, the mean over seeds at
    each evaluation thick."""
    from analysis.overoptimization import means_by_step, pyplot_or_none, save_figure

    plt = pyplot_or_none()
    if plt is None:
        return None
    methods = sorted({m for m, _ in groups})
    windows = sorted({w for _, w in groups})
    colours = dict(zip(windows, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(len(methods), 2, figsize=(12, 4.5 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        for window in windows:
            group = groups.get((method, window), [])
            for run in group:
                evals = run["evals"]
                axes[row, 0].plot([e["train_seconds"] for e in evals], [e["proxy"] for e in evals],
                                  color=colours[window], alpha=0.3, lw=0.8)  # fmt: skip
                axes[row, 1].plot([e["proxy"] for e in evals], [e["gold"] for e in evals],
                                  color=colours[window], alpha=0.3, lw=0.8)  # fmt: skip
            if not group:
                continue
            mean = means_by_step(group, ("train_seconds", "proxy", "gold"))
            label = f"{window} (mean of {len(group)})"
            axes[row, 0].plot(
                mean["train_seconds"], mean["proxy"], "o-", color=colours[window], lw=2, ms=3, label=label
            )
            axes[row, 1].plot(mean["proxy"], mean["gold"], "o-", color=colours[window], lw=2, ms=3, label=label)
        axes[row, 0].set(xlabel="seconds of training", ylabel="proxy (colour)", title=f"{method}: proxy against time")
        axes[row, 1].set(
            xlabel="proxy (colour)", ylabel="gold (caption fidelity)", title=f"{method}: gold against proxy"
        )
        axes[row, 0].legend(fontsize=8)
    return save_figure(fig, plot_dir, "window.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["run", "cost", "analyse"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--plot-dir", default=RESULTS, help="where `analyse` writes window.png")
    parser.add_argument("--repeats", type=int, default=3, help="`cost`: timings per configuration")
    parser.add_argument("--cost-steps", type=int, default=6, help="`cost`: optimizer steps per timing (3 rounds)")
    options = parser.parse_args()
    if options.phase == "run":
        run(options)
    elif options.phase == "cost":
        cost(options)
    else:
        print(analyse(options.plot_dir))


if __name__ == "__main__":
    main()
