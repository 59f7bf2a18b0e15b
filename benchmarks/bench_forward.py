"""DiffusionNFT and AWM against Flow-GRPO and GRPO-Guard on the toy world: proxy gained per CPU-second, and gold at
matched proxy.

    python benchmarks/bench_forward.py sweep [--shard 0/2]   # nft and awm, seed 0, three rates, 20 steps
    python benchmarks/bench_forward.py run [--shard 0/2]     # nft and awm at their best rate, seeds 1-3, 20 steps
    python benchmarks/bench_forward.py extra nft 0.001       # a method at another rate, seeds 1-3 (sensitivity)
    python benchmarks/bench_forward.py cost                  # seconds per optimizer step, one process
    python benchmarks/bench_forward.py analyse

The setting is the SDE-window benchmark's (`benchmarks/bench_window.py`), so that its full-trajectory Flow-GRPO and
GRPO-Guard runs (`docs/results/window.json`, window "full": seeds 0-2, 40 steps, evaluated every 5, each at its study
rate), read at step 20, are the comparison: the over-optimisation study's toy world, colour proxy, 8 prompts x 8 samples per round, two
optimizer steps per round, 10 sampling steps, LoRA r=16. DiffusionNFT and AWM use their official loss settings
(`nft_beta=1`, the official decay schedules of the lagged copy, AWM's "ghuber" weighting, clip range 1 and lagged
penalty 1) with no reference penalty (`beta=0`, as the SDE methods here), 9 training noise levels per sample
(`timestep_fraction=0.99`) and ODE rollouts on the same 10-step grid. The pre-declared sweep: rates 1e-3, 3e-3 and
1e-2, one seed, 20 steps; the best is the highest mean proxy over the last three evaluations (the study's rule).

Each finished run is appended to its results file at once (`docs/results/forward_sweep.json`,
`docs/results/forward.json`) and runs already there are skipped, so a stopped benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_window import WINDOW_FILE, at_step  # noqa: E402
from overoptimization import RESULTS, append, best_rates, done, load, toy_trainer, train_run  # noqa: E402

SWEEP_FILE = os.path.join(RESULTS, "forward_sweep.json")
RUN_FILE = os.path.join(RESULTS, "forward.json")
EXTRA_FILE = os.path.join(RESULTS, "forward_extra.json")  # runs at other rates than the sweep's pick, reported apart
COST_FILE = os.path.join(RESULTS, "forward_cost.json")
METHODS = ("nft", "awm")
SWEEP_RATES = (1e-3, 3e-3, 1e-2)
# 20 steps (the window benchmark's runs are read at step 20); seeds 1-3, not the sweep's seed 0, so that the chosen
# rate's own sweep run does not enter the comparison (it was picked for doing well on that seed).
SWEEP_STEPS, STEPS, SEEDS, EVAL_STEPS = 20, 20, 3, 5
# The loss settings are fields of GuardConfig; timestep_fraction is the study's 0.99 (9 noise levels per sample).


def _run(path: str, plan: list[tuple[str, int, float]], steps: int, folder: str) -> None:
    for method, seed, rate in plan:
        if done(path, method, seed, rate):
            continue
        print(f"{method} seed {seed} lr {rate:g} ...", flush=True)
        result = train_run(method, seed, rate, steps, f"/tmp/forward/{folder}-{method}-{seed}-{rate:g}", EVAL_STEPS)
        append(path, result)
        last = result["evals"][-1]
        print(f"  {last['train_seconds']:.0f} s of training; proxy {last['proxy']:.3f}, gold {last['gold']:.3f}")


def sweep(options) -> None:
    shard, shards = (int(x) for x in options.shard.split("/"))
    plan = [(m, 0, rate) for m in METHODS for rate in SWEEP_RATES]
    _run(SWEEP_FILE, plan[shard::shards], SWEEP_STEPS, "sweep")


def run(options) -> None:
    shard, shards = (int(x) for x in options.shard.split("/"))
    rates = best_rates(load(SWEEP_FILE))
    missing = [m for m in METHODS if m not in rates]
    if missing:
        raise SystemExit(f"No swept rate for {missing}: run `python benchmarks/bench_forward.py sweep` first.")
    plan = [(m, seed, rates[m]) for seed in range(1, SEEDS + 1) for m in METHODS]
    _run(RUN_FILE, plan[shard::shards], STEPS, "run")


def extra(options) -> None:
    """`method` at `rate` on the comparison's seeds: how much the comparison hangs on the swept rate."""
    shard, shards = (int(x) for x in options.shard.split("/"))
    plan = [(options.method, seed, options.rate) for seed in range(1, SEEDS + 1)]
    _run(EXTRA_FILE, plan[shard::shards], STEPS, "extra")


def cost(options) -> None:
    """Idle seconds per optimizer step of each method in one process and one thread, alternating methods, evaluation
    off, the first round left out (as `bench_window.py cost`)."""
    import tempfile

    import torch
    from bench_trainer import StepClock

    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = {m: [] for m in ("flow_grpo", *METHODS)}
    for repeat in range(options.repeats):
        for method in seconds:
            with tempfile.TemporaryDirectory() as output_dir:
                trainer = toy_trainer(method, repeat, 3e-3, 6, output_dir, eval_strategy="no", eval_kl=False)
                stamps: list[float] = []
                trainer.add_callback(StepClock(stamps))
                trainer.train()
            per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
            seconds[method].append(round(per_step, 3))
            print(f"{method} repeat {repeat}: {per_step:.2f} s per optimizer step", flush=True)
    with open(COST_FILE, "w") as f:
        json.dump({"seconds_per_step": seconds, "steps": 6, "threads": 1}, f, indent=1)


def groups() -> dict[str, list[dict]]:
    """Every finished run of the comparison, by method: ours and the window benchmark's full-trajectory runs."""
    found: dict[str, list[dict]] = {}
    for r in load(WINDOW_FILE)["runs"]:
        if r.get("window") == "full":
            found.setdefault(r["method"], []).append(r)
    for r in load(RUN_FILE)["runs"]:
        found.setdefault(r["method"], []).append(r)
    for r in load(EXTRA_FILE)["runs"]:
        found.setdefault(f"{r['method']} at {r['learning_rate']:g}", []).append(r)
    return found


def analyse(plot_dir: str | None = None) -> str:
    from analysis.overoptimization import bootstrap, fmt

    by_method = groups()
    if not any(m in by_method for m in METHODS):
        return "No DiffusionNFT or AWM runs yet: run the sweep, then `run`."
    lines = ["Sweep (seed 0, 20 steps; mean proxy over the last three evaluations):", ""]
    for r in load(SWEEP_FILE)["runs"]:
        lines.append(
            f"- {r['method']} lr {r['learning_rate']:g}: {np.mean([e['proxy'] for e in r['evals'][-3:]]):.3f}"
        )
    seconds = None
    if os.path.exists(COST_FILE):
        with open(COST_FILE) as f:
            seconds = {m: float(np.median(v)) for m, v in json.load(f)["seconds_per_step"].items()}
        seconds["grpo_guard"] = seconds["flow_grpo"]  # the loss does not change the cost of a step
    steps = min(max(r["evals"][-1]["step"] for r in group) for group in by_method.values())
    lines += [
        "",
        f"After {steps} optimizer steps (mean over seeds, 95% bootstrap interval); proxy gained per CPU-second uses "
        + ("the idle one-process cost per step (`cost`)." if seconds else "the runs' own training seconds."),
        "",
        "| method | seeds | rate | s per step | proxy | gold (caption fidelity) | proxy gained per CPU-second |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, group in sorted(by_method.items()):
        proxy = [at_step(r, steps, "proxy") for r in group]
        gold = [at_step(r, steps, "gold") for r in group]
        base = group[0]["method"]  # an extra rate costs what its method costs
        per_step = (
            [seconds[base]] * len(group)
            if seconds and base in seconds
            else [r["evals"][-1]["train_seconds"] / r["evals"][-1]["step"] for r in group]
        )
        gain = [(p - r["evals"][0]["proxy"]) / (s * steps) for p, r, s in zip(proxy, group, per_step)]
        lines.append(
            f"| {method} | {len(group)} | {group[0]['learning_rate']:g} | {np.mean(per_step):.2f} | "
            f"{fmt(bootstrap(proxy))} | {fmt(bootstrap(gold))} | {fmt(bootstrap(gain), 5)} |"
        )
    lines += matched_table(by_method, "Gold at matched proxy, every method (runs that reach the level):")
    # A method that gains little caps the levels above; the others are compared again further out.
    far = {m: g for m, g in by_method.items() if np.median([max(e["proxy"] for e in r["evals"]) for r in g]) >= 0.2}
    if 2 <= len(far) < len(by_method):
        lines += matched_table(
            far, f"Gold at matched proxy among the methods whose median run reaches 0.2 ({', '.join(sorted(far))}):"
        )
    if plot_dir:
        path = plot(by_method, plot_dir)
        if path:
            lines += ["", f"Plot: {path}"]
    return "\n".join(lines)


def matched_table(by_method: dict[str, list[dict]], title: str) -> list[str]:
    from analysis.overoptimization import bootstrap, fmt, matched_levels

    from trl_guard.report.verdict import gold_at_proxy

    levels = matched_levels(by_method, count=4)
    if not levels:
        return []
    lines = ["", title, "", "| method | " + " | ".join(f"proxy {level:.3f}" for level in levels) + " |"]
    lines.append("|---" * (len(levels) + 1) + "|")
    for method, group in sorted(by_method.items()):
        cells = []
        for level in levels:
            reached = [g for g in (gold_at_proxy(r, level) for r in group) if g is not None]
            cells.append(f"{fmt(bootstrap(reached))} ({len(reached)})" if reached else "not reached")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def plot(
    by_method: dict[str, list[dict]], plot_dir: str, name: str = "forward.png", sweep: list[dict] | None = None
) -> str | None:
    """Proxy against step, and gold against proxy: every run thin, the mean over seeds thick, and the sweep's runs
    (`sweep`, by default this benchmark's) dotted; `benchmarks/bench_algorithms.py` draws its figure with it too."""
    from analysis.overoptimization import means_by_step, pyplot_or_none, save_figure

    plt = pyplot_or_none()
    if plt is None:
        return None
    colours = dict(zip(sorted(by_method), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for method, group in sorted(by_method.items()):
        for r in group:
            evals = r["evals"]
            axes[0].plot(
                [e["step"] for e in evals], [e["proxy"] for e in evals], color=colours[method], alpha=0.3, lw=0.8
            )
            axes[1].plot(
                [e["proxy"] for e in evals], [e["gold"] for e in evals], color=colours[method], alpha=0.3, lw=0.8
            )
        mean = means_by_step(group, ("step", "proxy", "gold"))
        label = f"{method} (mean of {len(group)})"
        axes[0].plot(mean["step"], mean["proxy"], "o-", color=colours[method], lw=2, ms=3, label=label)
        axes[1].plot(mean["proxy"], mean["gold"], "o-", color=colours[method], lw=2, ms=3, label=label)
    for r in load(SWEEP_FILE)["runs"] if sweep is None else sweep:  # dotted, so that every run is on the page
        colour = colours.get(r["method"], "grey")
        evals = r["evals"]
        axes[0].plot([e["step"] for e in evals], [e["proxy"] for e in evals], ":", color=colour, alpha=0.5, lw=0.8)
        axes[1].plot([e["proxy"] for e in evals], [e["gold"] for e in evals], ":", color=colour, alpha=0.5, lw=0.8)
    axes[0].plot([], [], ":", color="grey", label="sweep runs, seed 0 (dotted, the method's colour)")
    axes[0].set(xlabel="optimizer step", ylabel="proxy reward (colour)", title="Proxy reward during training")
    axes[1].set(xlabel="proxy reward (colour)", ylabel="gold score (caption fidelity)", title="Gold against proxy")
    axes[0].legend(fontsize=8)
    return save_figure(fig, plot_dir, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["sweep", "run", "extra", "cost", "analyse"])
    parser.add_argument("method", nargs="?", help="`extra`: the method")
    parser.add_argument("rate", nargs="?", type=float, help="`extra`: its learning rate")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--repeats", type=int, default=2, help="`cost`: timings per method")
    parser.add_argument("--plot-dir", default=RESULTS, help="where `analyse` writes forward.png")
    options = parser.parse_args()
    {"sweep": sweep, "run": run, "extra": extra, "cost": cost}.get(
        options.phase, lambda o: print(analyse(o.plot_dir))
    )(options)


if __name__ == "__main__":
    main()
