"""Every algorithm on the learned proxy: does the gold rise, peak and fall, and what does each method change?

    OMP_NUM_THREADS=1 python benchmarks/learned_proxy_study.py study --shard 0/2 &   # and --shard 1/2
    python benchmarks/learned_proxy_study.py analyse

The over-optimisation study's setting (`benchmarks/overoptimization.py`: the pretrained toy model, 64 training and 64
held-out captions, 8 prompts x 8 samples a round, LoRA r=16) with the learned proxy (`trl_guard.toy.learned_proxy`, or
`--proxy-dir`) as the trained reward and caption fidelity as the gold, evaluated every `--eval-steps`.

Pre-declared before any study run:
- the rate: every method at `RATE`, the rate at which the calibration (`benchmarks/learned_proxy_probe.py`, seed 0)
  saw Flow-GRPO's gold rise on this proxy and on the gold itself. There is no per-method sweep: on this machine it
  would have cost a third of the study's CPU budget. The colour-proxy sweeps found Flow-GRPO, GRPO-Guard and AWM best
  at one shared rate and NFT insensitive to it;
- the study: every method of `METHODS`, seeds 1..`--seeds` (seed 0 was the calibration's), `--steps` steps;
- the shape (`analysis/rise_and_fall.py`): the peak on the seed-averaged gold smoothed over 3 evaluations, the
  rise (gold there minus the base) and the fall (gold there minus the last 3 evaluations), Student-t intervals;
- claim 4 (`analysis.overoptimization.claim4_verdict`): GRPO-Guard's minus Flow-GRPO's gold averaged over the
  matched proxy levels past the base, its interval deciding;
- the alarm: `OverOptimizationCallback(tolerance=0.02, patience=2)` replayed on each run's evaluations.

Each finished run is appended to `docs/results/learned_proxy_study.json` at once and skipped when the script runs
again, so a stopped study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learned_proxy_probe import proxy_reward  # noqa: E402
from overoptimization import RESULTS, append, done, load, train_run  # noqa: E402

STUDY_FILE = os.path.join(RESULTS, "learned_proxy_study.json")
METHODS = ["flow_grpo", "grpo_guard", "ratio_norm", "temp_reweight", "flow_grpo_kl", "nft", "awm"]
RATE = 1e-3


def run_plan(path: str, plan: list[tuple[str, int, float]], steps: int, eval_steps: int, reward) -> None:
    for method, seed, rate in plan:
        if done(path, method, seed, rate):
            continue
        print(f"{method} seed {seed} lr {rate:g} ...", flush=True)
        run = train_run(method, seed, rate, steps, f"/tmp/learned_proxy/{method}-{seed}-{rate:g}", eval_steps, reward)
        run["proxy_name"] = getattr(reward, "__name__", "learned_proxy")
        append(path, run)
        print(" ".join(f"{e['step']}:{e['proxy']:.3f}/{e['gold']:.3f}" for e in run["evals"]), flush=True)


def analyse(study: dict, plot_dir: str | None = None) -> str:
    from analysis.overoptimization import by_method, claim4_over_base, fmt, matched_levels, t_interval
    from analysis.rise_and_fall import alarm_summary, plot_rise_and_fall, proxy_gain_per_second, rise_and_fall

    from trl_guard.report.verdict import gold_at_proxy

    runs = by_method(study)
    lines = [
        "| method | rate | seeds | peak step | gold at peak | base-to-peak rise | peak-to-end fall | proxy at peak | "
        "proxy gain after peak | proxy gain per 1,000 training s | training reward, last minus first log |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, group in runs.items():
        shape = rise_and_fall(group)
        per_second = t_interval([1000 * proxy_gain_per_second(r) for r in group])
        # the proxy on the policy's own SDE samples of the training captions, as logged every `logging_steps`
        train_gain = t_interval([r["train_rewards"][-1]["reward"] - r["train_rewards"][0]["reward"] for r in group])
        lines.append(
            f"| {method} | {group[0]['learning_rate']:g} | {len(group)} | {shape.peak_step} | {fmt(shape.peak_gold)} | "
            f"{fmt(shape.rise)} | {fmt(shape.fall)} | {fmt(shape.proxy_at_peak)} | {fmt(shape.final_proxy_gain)} | "
            f"{fmt(per_second)} | {fmt(train_gain)} |"
        )

    def gold_table(title: str, header: str, levels: list[float], key: str, to_key=float) -> list[str]:
        table = ["", title, "", f"| {header} | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
        for level in levels:
            cells = []
            for group in runs.values():
                golds = [g for r in group if (g := gold_at_proxy(r, to_key(level), key)) is not None]
                cells.append(f"{fmt(t_interval(golds))} ({len(golds)}/{len(group)})")
            table.append(f"| {level:.3f} | " + " | ".join(cells) + " |")
        return table

    levels = matched_levels(runs)
    kl_reach = min(np.median([max(e["kl"] for e in r["evals"]) for r in group]) for group in runs.values())
    kl_levels = [float(x) for x in np.linspace(0, np.sqrt(max(kl_reach, 0.0)), 6)[1:]]
    title = "Gold where each run's {} first reaches a level (runs that reached it):"
    lines += gold_table(title.format("proxy"), "proxy level", levels, "proxy")
    lines += gold_table(title.format("sqrt(KL)"), "sqrt(KL) level", kl_levels, "kl", lambda x: x * x)
    pair = {m: runs[m] for m in ("grpo_guard", "flow_grpo") if m in runs}
    lines += ["", claim4_over_base(pair), "", "| method | stopped | stop steps | false alarms | "
              "restored - best | restored - last |", "|---|---|---|---|---|---|"]  # fmt: skip
    for method, group in runs.items():
        alarm = alarm_summary(group)
        steps = ", ".join("-" if s is None else str(s) for s in alarm["stop_steps"])
        lines.append(
            f"| {method} | {alarm['stopped']}/{alarm['runs']} | {steps} | {alarm['false_alarms']} | "
            f"{fmt(alarm['restored_minus_best'])} | {fmt(alarm['restored_minus_last'])} |"
        )
    if plot_dir is not None:
        plot_rise_and_fall(runs, plot_dir)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["study", "analyse"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--proxy-dir", default=None, help="weights from train_learned_proxy.py (default: shipped)")
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th planned run starting at i")
    options = parser.parse_args(argv)
    shard, shards = (int(x) for x in options.shard.split("/"))
    if options.phase == "analyse":
        print(analyse(load(STUDY_FILE), plot_dir=RESULTS))
        return
    # seed-major order: every method gets its first seeds before any gets its last
    plan = [(m, seed, RATE) for seed in range(1, options.seeds + 1) for m in options.methods]
    run_plan(STUDY_FILE, plan[shard::shards], options.steps, options.eval_steps, proxy_reward(options.proxy_dir))


if __name__ == "__main__":
    main()
