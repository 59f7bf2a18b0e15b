"""Every algorithm on the learned proxy: does the gold rise, peak and fall, and what does each method change?

    OMP_NUM_THREADS=1 python benchmarks/learned_proxy_study.py sweep --shard 0/2 &   # and --shard 1/2
    OMP_NUM_THREADS=1 python benchmarks/learned_proxy_study.py study --shard 0/2 &   # and --shard 1/2
    python benchmarks/learned_proxy_study.py analyse

The over-optimisation study's setting (`benchmarks/overoptimization.py`: the pretrained toy model, 64 training and 64
held-out captions, 8 prompts x 8 samples a round, LoRA r=16) with the learned proxy (`trl_guard.toy.learned_proxy`, or
`--proxy-dir`) as the trained reward and caption fidelity as the gold, evaluated every `--eval-steps`.

Pre-declared before any study run:
- the sweep: each method at the rates of `SWEEP_RATES`, seed 0, `--steps` steps; a method's rate is the one with the
  highest mean proxy over its last three evaluations (`overoptimization.best_rates`);
- the study: every method of `METHODS` at its rate, seeds 1..`--seeds`;
- the shape (`trl_guard.report.rise_and_fall`): the peak on the seed-averaged gold smoothed over 3 evaluations, the
  rise (gold there minus the base) and the fall (gold there minus the last 3 evaluations), Student-t intervals;
- claim 4 (`trl_guard.report.overoptimization.claim4_verdict`): GRPO-Guard's minus Flow-GRPO's gold averaged over the
  matched proxy levels past the base, its interval deciding;
- the alarm: `OverOptimizationCallback(tolerance=0.02, patience=2)` replayed on each run's evaluations.

Each finished run is appended to its results file at once (`docs/results/learned_proxy_{sweep,study}.json`) and
skipped when the script runs again, so a stopped study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learned_proxy_probe import proxy_reward  # noqa: E402
from overoptimization import RESULTS, append, best_rates, done, load, train_run  # noqa: E402

SWEEP_FILE = os.path.join(RESULTS, "learned_proxy_sweep.json")
STUDY_FILE = os.path.join(RESULTS, "learned_proxy_study.json")
METHODS = ["flow_grpo", "grpo_guard", "ratio_norm", "temp_reweight", "flow_grpo_kl", "nft", "awm"]
# Two rates a method, around what worked on the colour proxy (GRPO-Guard's 3x lower, as in the paper; NFT's 10x lower,
# as bench_forward.py found NFT unstable at 1e-2). Flow-GRPO's KL variant takes Flow-GRPO's rate.
SWEEP_RATES = {
    "flow_grpo": [3e-3, 1e-2],
    "grpo_guard": [1e-3, 3e-3],
    "ratio_norm": [3e-3, 1e-2],
    "temp_reweight": [3e-3, 1e-2],
    "nft": [3e-4, 1e-3],
    "awm": [3e-3, 1e-2],
}


def run_plan(path: str, plan: list[tuple[str, int, float]], steps: int, eval_steps: int, reward) -> None:
    for method, seed, rate in plan:
        if done(path, method, seed, rate):
            continue
        print(f"{method} seed {seed} lr {rate:g} ...", flush=True)
        run = train_run(method, seed, rate, steps, f"/tmp/learned_proxy/{method}-{seed}-{rate:g}", eval_steps, reward)
        run["proxy_name"] = getattr(reward, "__name__", "learned_proxy")
        append(path, run)
        print(" ".join(f"{e['step']}:{e['proxy']:.3f}/{e['gold']:.3f}" for e in run["evals"]), flush=True)


def analyse(study: dict) -> str:
    from trl_guard.report.overoptimization import by_method, claim4_verdict, fmt, gold_at_proxy, matched_levels
    from trl_guard.report.rise_and_fall import alarm_summary, rise_and_fall

    runs = by_method(study)
    lines = [
        "| method | seeds | peak step | base-to-peak rise | peak-to-end fall | proxy at peak | proxy gain after |"
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for method, group in runs.items():
        shape = rise_and_fall(group)
        lines.append(
            f"| {method} | {len(group)} | {shape.peak_step} | {fmt(shape.rise)} | {fmt(shape.fall)} | "
            f"{fmt(shape.proxy_at_peak)} | {fmt(shape.final_proxy_gain)} |"
        )
    levels = matched_levels(runs)
    at_level = {
        level: {
            m: {r["seed"]: g for r in group if (g := gold_at_proxy(r, level)) is not None} for m, group in runs.items()
        }
        for level in levels
    }
    lines += ["", claim4_verdict(runs, levels, at_level), "", "| method | stopped | false alarms | restored - best | "
              "restored - last |", "|---|---|---|---|---|"]  # fmt: skip
    for method, group in runs.items():
        alarm = alarm_summary(group)
        lines.append(
            f"| {method} | {alarm['stopped']}/{alarm['runs']} | {alarm['false_alarms']} | "
            f"{fmt(alarm['restored_minus_best'])} | {fmt(alarm['restored_minus_last'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["sweep", "study", "analyse"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-steps", type=int, default=5)
    parser.add_argument("--proxy-dir", default=None, help="weights from train_learned_proxy.py (default: shipped)")
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th planned run starting at i")
    options = parser.parse_args(argv)
    shard, shards = (int(x) for x in options.shard.split("/"))
    if options.phase == "analyse":
        print(analyse(load(STUDY_FILE)))
        return
    reward = proxy_reward(options.proxy_dir)
    if options.phase == "sweep":
        plan = [(m, 0, rate) for m in options.methods if m in SWEEP_RATES for rate in SWEEP_RATES[m]]
        run_plan(SWEEP_FILE, plan[shard::shards], options.steps, options.eval_steps, reward)
        return
    rates = best_rates(load(SWEEP_FILE))
    missing = [m for m in options.methods if m not in rates]
    if missing:
        raise SystemExit(f"No swept rate for {missing}: run the sweep phase for them first.")
    # seed-major order: every method gets its first seeds before any gets its last
    plan = [(m, seed, rates[m]) for seed in range(1, options.seeds + 1) for m in options.methods]
    run_plan(STUDY_FILE, plan[shard::shards], options.steps, options.eval_steps, reward)


if __name__ == "__main__":
    main()
