"""The SDE window on the toy world: cost per round, and proxy and gold reached after equal training time.

    python benchmarks/bench_window.py run [--seeds 3] [--steps 40] [--shard 0/2]
    python benchmarks/bench_window.py analyse

Flow-GRPO and GRPO-Guard, each at its study learning rate (`docs/results/overoptimization_sweep.json`), with every
step trained (T=10, `timestep_fraction=0.99`, steps 0-8) against SDE windows of 2 and 3 steps in the noisier half
(`sde_window_range=[0, 5]`). Runs use the over-optimisation study's setting (`benchmarks/overoptimization.py`) and
record, at every evaluation (every 5 steps), the proxy, the gold scores, the KL from the base and the seconds spent
training so far. Each finished run is appended to `docs/results/window.json` at once, and runs already there are
skipped, so a stopped benchmark resumes.

`analyse` prints the seconds per optimizer step of each configuration and the proxy and gold at equal training
time: the time the slowest configuration's run took, interpolated per run, as the mean over seeds with its 95%
bootstrap interval. Gold against proxy is reported too, because a faster proxy gain is worth nothing if the gold
score pays for it.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overoptimization import RESULTS, SWEEP_FILE, append, best_rates, load, train_run  # noqa: E402

WINDOW_FILE = os.path.join(RESULTS, "window.json")
WINDOWS = {"full": {}, "window2": {"sde_window_size": 2}, "window3": {"sde_window_size": 3}}


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
        overrides = dict(WINDOWS[window])
        if overrides:
            overrides["sde_window_range"] = [0, 5]
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


def at_time(run: dict, seconds: float, key: str) -> float:
    times = [e["train_seconds"] for e in run["evals"]]
    return float(np.interp(seconds, times, [e[key] for e in run["evals"]]))


def analyse() -> str:
    from trl_guard.report.overoptimization import bootstrap, fmt

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
    for (method, window), group in sorted(groups.items()):
        per_step = [r["evals"][-1]["train_seconds"] / r["evals"][-1]["step"] for r in group]
        proxy = [at_time(r, budget, "proxy") for r in group]
        gold = [at_time(r, budget, "gold") for r in group]
        gain = [(p - r["evals"][0]["proxy"]) / budget for p, r in zip(proxy, group)]
        lines.append(
            f"| {method} | {window} | {len(group)} | {fmt(bootstrap(per_step), 2)} | {fmt(bootstrap(proxy))} | "
            f"{fmt(bootstrap(gold))} | {fmt(bootstrap(gain), 5)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["run", "analyse"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shard", default="0/1")
    options = parser.parse_args()
    if options.phase == "run":
        run(options)
    else:
        print(analyse())


if __name__ == "__main__":
    main()
