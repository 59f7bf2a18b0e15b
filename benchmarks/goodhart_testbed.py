"""A Goodhart testbed on the toy world: calibrate a setting where the gold rises, then falls while the proxy climbs.

    OMP_NUM_THREADS=1 nohup python benchmarks/goodhart_testbed.py calibrate --shard 0/2 &   # and --shard 1/2
    python benchmarks/goodhart_testbed.py analyse

Two earlier studies could not show over-optimisation as the GRPO-Guard paper's Fig. 1 draws it (the gold first rises,
then falls while the proxy keeps rising): on the colour proxy the gold falls from the first step; on the learned proxy,
60 steps at 1e-3 on 64 training captions did not move the proxy on held-out captions. This script tries the candidate
settings in a declared order and keeps every run.

Declared before the first calibration run (2026-12-06), and not changed after seeing results:

- Budget: at most 8 calibration runs, about 6 CPU-hours of single-threaded run time in all. Flow-GRPO only, at
  two rates (1e-3, 3e-3), seed 0, 100 optimizer steps, evaluated every 10 steps (and before training) on the 64
  held-out captions of `benchmarks/overoptimization.py`: the proxy on them, caption fidelity (the gold), cleanliness
  and the KL from the base.
- The candidates, in this order; the calibration stops at the first that passes:
  a. `stream`: the learned proxy (`trl_guard.toy.learned_proxy`) on a stream of every caption outside the evaluation
     set (176 captions) with 16 prompts a round (128 samples, two optimizer steps), so that what the policy learns
     from the proxy has more captions to generalise from.
  b. `refit`: the learned proxy refit on base and policy samples (the labelled samples of a candidate-a run's
     policies added to the base ones), then trained on as in a.
  c. `designed`: a proxy designed to be partly right (`designed_proxy` below): the gold's count, shape and layout
     terms, with colour ignored, plus a bonus for the caption's colours covering the image, which a policy can
     inflate by drawing larger objects and then flooding them, at the gold's expense. Its control: the same run on
     the right terms alone (`structure_only`), which must raise the gold, and on the bonus alone (the colour proxy
     study), where the gold falls from the start. The rise is then not built in: it appears only because the right
     terms are learnable.
- Screening (one seed): a candidate passes when the gold smoothed over 3 evaluations peaks at least 0.03 above the
  base, falls at least 0.03 from that peak by the end, and the proxy at the end is at least the proxy at the peak.
  The rise-then-fall itself is then shown with Student-t intervals over the study's Flow-GRPO seeds
  (`benchmarks/analysis/rise_and_fall.py`), not by this screen.

Each finished run is appended at once to `docs/results/goodhart_calibration.json` (with its candidate and rate) and
skipped when the script runs again, so a stopped calibration resumes where it stopped.

The calibration's second stage, declared on 2026-12-07 after reading Flow-GRPO's seeds 1-4 on candidate a at both
rates (the study's at 3e-3: rise -0.007 [-0.056, 0.042]; the same-rate supplement's at 1e-3: rise 0.009
[-0.047, 0.066], fall 0.040 [-0.046, 0.126]) and before any of its runs:

    OMP_NUM_THREADS=1 nohup python benchmarks/goodhart_testbed.py calibrate-seeds --shard 0/2 &   # and --shard 1/2
    python benchmarks/goodhart_testbed.py analyse-seeds

- Why: candidate a passed the one-seed screen, but its rise did not hold over four seeds at either rate, so the
  testbed does not show the rise-then-fall. A one-seed screen cannot tell a real rise from one seed's noise; this
  stage screens with seeds.
- The candidate: c (`designed`, `BONUS_WEIGHT` 0.5 as declared on 2026-12-06). Candidate b is passed over: it needs
  samples of trained candidate-a policies, and no candidate-a run kept its weights; and a proxy refit where the
  policy goes is more right there, which works against the fall the testbed needs, whereas c is built to have both
  phases. Said here rather than left unsaid.
- Runs: Flow-GRPO on candidate c, seeds 1-4 at both rates (1e-3 and 3e-3), seed-major, 100 steps, evaluated every
  10, the alarm watching, as the study runs them; then one control: the right terms alone (`structure_only`), seed 1
  at 3e-3, which must raise the gold (its mean over the last 3 evaluations above the base) for the rise to count as
  learnt rather than built in. At most 9 runs, into `docs/results/goodhart_calibration.json`.
- The test: at the rate the study's rule picks (the higher mean proxy over the last 3 evaluations, averaged over the
  seeds), `analysis.rise_and_fall` on the 4 seeds; c shows the rise-then-fall when both the rise and the fall have
  Student-t intervals above 0 and the control raised the gold. The other rate's reading is description.
- If c passes, the study on c, declared here before c's verdict and before any of its runs: the study's methods,
  rates, rule, seeds, claim-4 tests and alarm as on candidate a, with c's proxy, into
  `docs/results/goodhart_study_designed.json`. Flow-GRPO's seeds there are this stage's at its picked rate (the rule
  applied over four seeds instead of seed 0's sweep), and Flow-GRPO with KL takes that rate. The study on candidate
  a is paused meanwhile, not dropped (its runs stay in `goodhart_study.json` and it resumes where it stopped). If c
  fails, that is the result: no candidate built here shows the rise-then-fall with intervals.

The study, declared on 2026-12-06 after the calibration's first run (candidate a at 1e-3 passed the screen: gold
0.482, peak +0.044 at step 40, fall 0.113 by step 100) and before any study run:

    OMP_NUM_THREADS=1 nohup python benchmarks/goodhart_testbed.py study --shard 0/2 &   # and --shard 1/2
    python benchmarks/goodhart_testbed.py analyse-study

- The setting: candidate a (`stream`), 100 steps, evaluated every 10, as calibrated.
- The methods (`STUDY_METHODS`): Flow-GRPO, GRPO-Guard, RatioNorm, TempFlow-GRPO's reweighting, Flow-GRPO with its
  KL (beta 0.04), DiffusionNFT and AWM, with the settings of `benchmarks/overoptimization.py`; Flow-DPPO, DGPO and
  DPO join as they land in the library. They landed, and joined on 2026-12-07 before any of their study runs, with
  the settings of `benchmarks/bench_algorithms.py` (its `METHODS`), the other methods' rates (1e-3 and 3e-3) and
  their place at the end of `STUDY_METHODS` (their sweeps come after NFT's and AWM's, before the seeds). GARDO,
  the last of the algorithms to land, joined the same way on 2026-12-07 before any of its runs, after DPO (its gated
  KL at beta 0.04 and JPEG compressibility as its auxiliary reward, from the same table).
- The order: Flow-GRPO and GRPO-Guard first, then the others; within each, the sweeps and then the seeds.
- The rates: a 2-rate sweep on seed 0 (`SWEEP_RATES`: GRPO-Guard 3e-4 and 1e-3, the paper's 3x lower rate; every
  other method 1e-3 and 3e-3; Flow-GRPO's two runs are the calibration's), the best being the one with the highest
  mean proxy over the last 3 evaluations (what a practitioner tuning for the reward picks); Flow-GRPO with KL takes
  Flow-GRPO's. Then seeds 1-4 at each method's best rate. Results: `docs/results/goodhart_study.json`.
- The shape: `analysis.rise_and_fall` on Flow-GRPO's seeds 1-4 (peak on the seed-averaged gold smoothed over 3
  evaluations; rise and fall with Student-t intervals). The testbed shows over-optimisation when both intervals are
  above 0.
- Claim 4: `analysis.overoptimization.claim4_verdict`: GRPO-Guard's gold minus Flow-GRPO's at matched proxy levels
  past the base, paired by seed, Student-t interval deciding; and the same test on Flow-DPPO's minus Flow-GRPO's
  (`CLAIM4_AGAINST_FLOW_GRPO`).
- The alarm: `OverOptimizationCallback(tolerance=0.02, patience=2)` watches every Flow-GRPO and GRPO-Guard run live;
  it records the step it would stop at without stopping, so that every curve stays whole. It catches a run whose
  gold fell at least 0.03 below its smoothed peak by the end when it fires at or after that peak; it raises a false
  alarm when it fires in a run whose gold did not fall so.

A study or supplement run saves a checkpoint at each evaluation under the repository's ignored `runs/goodhart/`
(from 2026-12-07; earlier runs ran without): a stopped session's runs continue from there, to the evaluations an
unstopped run gives (tested), and each run's checkpoints are dropped once it is in its results file.

The same-rate supplement, declared on 2026-12-07 after reading the study's Flow-GRPO and GRPO-Guard seeds (Flow-GRPO
at 3e-3 fell with no rise before the fall; GRPO-Guard at 1e-3 neither fell nor moved the held-out proxy) and before
any of its runs. A second look chosen after seeing data, so reported as such, beside the study's verdicts and not in
their place:

    OMP_NUM_THREADS=1 nohup python benchmarks/goodhart_testbed.py same-rate &
    python benchmarks/goodhart_testbed.py analyse-same-rate

- Runs: Flow-GRPO, seeds 1-4, at 1e-3 (the rate of the calibration run that passed the screen, and GRPO-Guard's
  study rate), as the study runs it (alarm watching), into `docs/results/goodhart_same_rate.json`.
- Read: the same shape test (`analysis.rise_and_fall`, both intervals above 0) on these 4 seeds; and claim 4 at one
  rate, GRPO-Guard's study seeds (1e-3) against these, with the study's test (`claim4_verdict`, matched past each
  seed's own base, Student-t deciding).

AWM first, declared on 2026-12-07 (late evening) after the calibration's second stage failed and before any of AWM's
seed runs or its 3e-3 sweep run. Nothing about the runs changes (methods, rates, the rate rule, seeds, steps); only
when AWM's arrive, and one more reading:

    OMP_NUM_THREADS=1 nohup python benchmarks/goodhart_testbed.py study --methods awm &
    OMP_NUM_THREADS=1 nohup python benchmarks/goodhart_testbed.py study &   # the rest of the plan beside it

- Why: Flow-GRPO failed the shape test on candidates a and c, and its control (the right terms alone) lowered the
  gold without raising its proxy: at these settings Flow-GRPO drifts from the base without buying proxy. The one run
  whose held-out proxy climbed far is AWM's seed-0 sweep run at 1e-3 (0.416 to 0.651). Its gold, 0.482 at the base,
  touched 0.508 at step 40 (one evaluation; smoothed over 3 it stays near the base) and fell to 0.289 while the
  proxy climbed: on one seed, a clear fall with a climbing proxy and an unclear rise. Whether this testbed shows
  over-optimisation under any method is then AWM's seeds' question, and they should not wait behind 30 other runs.
- The order: AWM's study runs (its 3e-3 sweep run, then seeds 1-4 at its picked rate) run in a worker of their own,
  beside one worker on the whole plan; each run is locked while it trains (`claimed`), so two workers never train
  the same run.
- The reading: `analysis.rise_and_fall` on AWM's 4 seeds at its picked rate. The testbed shows over-optimisation
  under AWM when the rise and the fall both have Student-t intervals above 0 and the mean proxy gain after the peak
  is at least 0 (the proxy kept what it had while the gold fell). This does not replace the declared target, which
  is Flow-GRPO's shape and has failed; and a testbed where only AWM over-optimises still gives claim 4 (GRPO-Guard
  against Flow-GRPO) nothing to prevent. The other methods' shapes are read as description: with ten methods, one
  would pass by chance.

Flow-DPPO next, declared on 2026-12-08 after AWM's reading failed and before any of Flow-DPPO's seed runs. Nothing
about the runs changes; only when Flow-DPPO's arrive, and one more reading, corrected for being the fourth:

    OMP_NUM_THREADS=1 nohup sh -c 'python benchmarks/goodhart_testbed.py study --methods flow_dppo; \
        python benchmarks/goodhart_testbed.py study' &   # two of these side by side

- Why: of the 16 seed-0 sweep runs, Flow-DPPO's at 3e-3 (its pick: late proxy 0.457 against 0.438 at 1e-3) is the
  one whose curve has the paper's shape: gold 0.482 at the base, 0.544, 0.531 and 0.513 at steps 10-30, then down to
  0.339 at step 100 while the held-out proxy went from 0.42 (steps 10-30) to 0.464. Seed 0 is the screen; seeds 1-4, none of
  which has run, are the test. Its seeds are also claim 4's second comparison (Flow-DPPO minus Flow-GRPO), so they
  were due anyway.
- The order: Flow-DPPO's seeds 1-4 at 3e-3 go first in both workers (each run locked while it trains), then the rest
  of the plan.
- The reading: `analysis.rise_and_fall` on Flow-DPPO's 4 seeds at 3e-3. The testbed over-optimises under Flow-DPPO
  when the rise and the fall both have Student-t intervals above 0 at the 98.75% level, and the mean proxy gain after
  the peak is at least 0. The level is Holm's for the fourth of four declared shape readings (0.05 / 4): the first
  three (Flow-GRPO on candidates a and c, AWM) failed, and a fourth try at 95% would pass by chance more often than
  one in twenty. The 95% intervals are printed beside it as description. As with AWM's, a yes here does not make
  Flow-GRPO's declared target pass.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overoptimization import RESULTS, append, captions, done, load, train_run  # noqa: E402

CALIBRATION_FILE = os.path.join(RESULTS, "goodhart_calibration.json")
RUNS = os.path.normpath(os.path.join(RESULTS, os.pardir, os.pardir, "runs", "goodhart"))
RATES = (1e-3, 3e-3)
STEPS, EVAL_STEPS = 100, 10
PROMPTS_PER_ROUND = 16
RISE, FALL = 0.03, 0.03  # the screen's thresholds, in caption fidelity
BONUS_WEIGHT = 0.5  # the designed proxy's weight of the colour-coverage bonus


def stream_captions() -> list[str]:
    """Every caption of the toy world outside the 64 held-out evaluation captions (176 of 240)."""
    from trl_guard.toy.train import all_captions

    held_out = set(captions()[1])
    return [c for c in all_captions() if c not in held_out]


def structure(prompts: list[str], images: list, **kwargs) -> list[float | None]:
    """The right part of the designed proxy: caption fidelity's count, shape and layout terms with colour ignored,
    each in [0, 1], averaged. Count: 1 - |found - asked| / max(found, asked); shape: the share of asked shapes drawn
    (blobs larger than any drawn object match no shape); layout: for a pair, whether its two shapes are arranged as
    asked (1 for single-kind captions)."""
    from trl_guard.toy.scorers import detect_objects
    from trl_guard.toy.world import parse_caption

    scores: list[float | None] = []
    for prompt, image in zip(prompts, images):
        scene = parse_caption(prompt)
        if scene is None:
            scores.append(None)
            continue
        wanted = [t.shape for t in scene.things] if scene.relation else [scene.things[0].shape] * scene.count
        found = detect_objects(image)
        count = 1 - abs(len(found) - len(wanted)) / max(len(found), len(wanted), 1)
        unused, matches = list(found), []
        for shape in wanted:
            hit = next((o for o in unused if o[1] == shape), None)
            if hit is not None:
                unused.remove(hit)
            matches.append(hit)
        shape_term = sum(m is not None for m in matches) / len(wanted)
        layout = 1.0
        if scene.relation:
            first, second = matches
            if first is None or second is None:
                layout = 0.0
            else:
                layout = float(first[2] < second[2] if scene.relation == "above" else first[3] < second[3])
        scores.append((count + shape_term + layout) / 3)
    return scores


def designed_proxy(prompts: list[str], images: list, **kwargs) -> list[float | None]:
    """Candidate c, designed to be partly right: `(1 - w) structure + w colour coverage`, `w = BONUS_WEIGHT`. The
    coverage bonus (`trl_guard.toy.colour_proxy`) grows with the objects' size; past the largest size the world
    draws, an object becomes a blob that matches no caption, so inflating the bonus costs the gold."""
    from trl_guard.toy import colour_proxy

    right, bonus = structure(prompts, images), colour_proxy(prompts, images)
    return [None if r is None else (1 - BONUS_WEIGHT) * r + BONUS_WEIGHT * b for r, b in zip(right, bonus)]


def candidate_reward(candidate: str):
    if candidate == "stream":
        from trl_guard.toy.learned_proxy import learned_proxy

        return learned_proxy
    if candidate == "designed":
        return designed_proxy
    if candidate == "structure_only":
        return structure
    raise SystemExit(f"candidate {candidate!r} is declared but not built yet (see the docstring's order).")


CANDIDATES = ("stream", "refit", "designed", "structure_only")


def calibration_plan(candidates: tuple[str, ...]) -> list[tuple[str, float]]:
    return [(candidate, rate) for candidate in candidates for rate in RATES]


def screen(run: dict) -> dict:
    """The one-seed screen of the docstring: rise to the smoothed peak, fall from it to the end, proxy gain after it."""
    gold = np.array([e["gold"] for e in run["evals"]])
    proxy = np.array([e["proxy"] for e in run["evals"]])
    smoothed = np.convolve(np.pad(gold, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    peak = int(np.argmax(smoothed))
    end = float(np.mean(gold[-3:]))
    result = {
        "peak_step": run["evals"][peak]["step"],
        "rise": float(smoothed[peak] - gold[0]),
        "fall": float(smoothed[peak] - end),
        "proxy_gain_after_peak": float(np.mean(proxy[-3:]) - proxy[peak]),
    }
    result["passes"] = result["rise"] >= RISE and result["fall"] >= FALL and result["proxy_gain_after_peak"] >= 0
    return result


SEEDED_CANDIDATE, CONTROL = "designed", ("structure_only", 1, 3e-3)


def late_mean(run: dict, key: str) -> float:
    """A run's `key` (proxy or gold) averaged over its last 3 evaluations: where the declared rules read a run's end."""
    return float(np.mean([e[key] for e in run["evals"][-3:]]))


def seeded_plan() -> list[tuple[str, int, float]]:
    """The second stage's runs in order: candidate c's seeds 1-4 at both rates, seed-major, then the control."""
    return [(SEEDED_CANDIDATE, seed, rate) for seed in STUDY_SEEDS for rate in RATES] + [CONTROL]


def run_seeded(shard: int, shards: int) -> None:
    """This shard's runs of the second stage, each appended to the calibration file as it finishes."""
    for candidate, seed, rate in seeded_plan()[shard::shards]:
        if calibrated(candidate, rate, seed):
            continue
        print(f"{candidate} seed {seed} lr {rate:g} ...", flush=True)
        run = {**study_run("flow_grpo", seed, rate, candidate), "candidate": candidate}
        finish(CALIBRATION_FILE, run)


def analyse_seeded(results: dict, plot_dir: str | None = None) -> str:
    """The second stage's reading: the shape per rate over the seeds (the test at the rate the study's rule picks),
    and the control's gold."""
    from analysis.overoptimization import fmt
    from analysis.rise_and_fall import plot_rise_and_fall, rise_and_fall

    runs = results["runs"]
    groups = {rate: group for rate in RATES if (group := runs_of(runs, SEEDED_CANDIDATE, rate, STUDY_SEEDS))}
    if not groups:
        return "No run of the second stage yet."
    late = {rate: float(np.mean([late_mean(r, "proxy") for r in group])) for rate, group in groups.items()}
    picked = max(late, key=late.get) if len(groups) == len(RATES) else None
    lines = [
        "| rate | seeds | late proxy | peak step | rise | fall | proxy gain after peak |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes = {}
    for rate, group in groups.items():
        shapes[rate] = shape = rise_and_fall(group) if len(group) > 1 else None
        cells = (
            [str(shape.peak_step), fmt(shape.rise), fmt(shape.fall), fmt(shape.final_proxy_gain)]
            if shape
            else ["-"] * 4
        )
        lines.append(
            f"| {rate:g}{' (picked)' if rate == picked else ''} | {len(group)} | {late[rate]:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    candidate, seed, rate = CONTROL
    control = next(iter(runs_of(runs, candidate, rate, (seed,))), None)
    gain = None
    if control is not None:
        gain = late_mean(control, "gold") - control["evals"][0]["gold"]
        lines += [
            "",
            f"Control ({CONTROL[0]}, seed {CONTROL[1]}, {CONTROL[2]:g}): gold over the last 3 evaluations "
            f"minus the base {gain:+.3f} ({'raised' if gain > 0 else 'not raised'}).",
        ]
    complete = picked is not None and all(len(g) == len(STUDY_SEEDS) for g in groups.values()) and gain is not None
    if not complete:
        lines += ["", "The second stage is not complete: no verdict yet."]
    else:
        shape = shapes[picked]
        shown = shape.rise[1] > 0 and shape.fall[1] > 0 and gain > 0
        lines += [
            "",
            f"Verdict: candidate c {'shows' if shown else 'does not show'} the rise-then-fall at {picked:g} "
            f"(rise {fmt(shape.rise)}, fall {fmt(shape.fall)}, control {'raised' if gain > 0 else 'did not raise'} the gold).",
        ]
    if plot_dir:
        named = {f"flow_grpo {rate:g}": g for rate, g in groups.items()}
        path = plot_rise_and_fall(named, plot_dir, "goodhart_designed.png", "designed proxy")
        if path:
            lines += ["", f"Plot: {path}"]
    return "\n".join(lines)


def runs_of(runs: list[dict], candidate: str, rate: float, seeds: tuple[int, ...]) -> list[dict]:
    """The calibration runs of `candidate` at `rate` with one of `seeds` (a calibration run is keyed by candidate)."""
    return [
        r
        for r in runs
        if r.get("candidate") == candidate and r["seed"] in seeds and np.isclose(r["learning_rate"], rate)
    ]


def calibrated(candidate: str, rate: float, seed: int = 0) -> bool:
    """Whether the calibration file holds `candidate`'s run at `rate` with `seed`."""
    return bool(runs_of(load(CALIBRATION_FILE)["runs"], candidate, rate, (seed,)))


def run_candidate(candidate: str, rate: float, seed: int = 0) -> dict:
    round_images = PROMPTS_PER_ROUND * 8
    run = train_run(
        "flow_grpo",
        seed,
        rate,
        STEPS,
        f"/tmp/goodhart/{candidate}-{seed}-{rate:g}",
        EVAL_STEPS,
        candidate_reward(candidate),
        train_captions=stream_captions(),
        per_device_train_batch_size=round_images // 2,  # two optimizer steps a round, as in the earlier studies
    )
    run["candidate"] = candidate
    run["screen"] = screen(run)
    return run


def analyse(results: dict) -> str:
    lines = [
        "| candidate | seed | rate | base gold | peak step | rise | fall | proxy gain after peak | passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        s = screen(run)
        lines.append(
            f"| {run['candidate']} | {run['seed']} | {run['learning_rate']:g} | {run['evals'][0]['gold']:.3f} | {s['peak_step']} | "
            f"{s['rise']:+.3f} | {s['fall']:+.3f} | {s['proxy_gain_after_peak']:+.3f} | {'yes' if s['passes'] else 'no'} |"
        )
    return "\n".join(lines)


STUDY_FILE = os.path.join(RESULTS, "goodhart_study.json")
SAME_RATE_FILE = os.path.join(RESULTS, "goodhart_same_rate.json")
SAME_RATE = 1e-3
STUDY_METHODS = (
    *("flow_grpo", "grpo_guard", "ratio_norm", "temp_reweight", "flow_grpo_kl", "nft", "awm"),
    *("flow_dppo", "dgpo", "dpo", "gardo"),
)
SWEEP_RATES = {method: (1e-3, 3e-3) for method in STUDY_METHODS} | {"grpo_guard": (3e-4, 1e-3)}
SHARES_RATE = {"flow_grpo_kl": "flow_grpo"}
STUDY_SEEDS = (1, 2, 3, 4)
WATCHED = ("flow_grpo", "grpo_guard")
CLAIM4_AGAINST_FLOW_GRPO = ("grpo_guard", "flow_dppo")  # the declared comparisons, each minus Flow-GRPO


def _watching_alarm():
    """`OverOptimizationCallback` deciding live at each evaluation, but recording its stop instead of stopping."""
    from trl_guard import OverOptimizationCallback

    class WatchingAlarm(OverOptimizationCallback):
        first_stop: int | None = None
        _STATE_ATTRIBUTES = (*OverOptimizationCallback._STATE_ATTRIBUTES, "first_stop")  # kept across a resume

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            if self.update(state.global_step, float(metrics[self.gold_metric]), float(metrics[self.proxy_metric])):
                self.first_stop = self.first_stop if self.first_stop is not None else state.global_step
            return control

    return WatchingAlarm("eval_gold/caption_fidelity", tolerance=0.02, patience=2, restore_best=False)


def sweep_runs(method: str) -> list[dict]:
    """Seed 0 at each swept rate: Flow-GRPO's are the calibration's candidate-a runs."""
    runs = load(CALIBRATION_FILE)["runs"] if method == "flow_grpo" else load(STUDY_FILE)["runs"]
    return [
        r
        for r in runs
        if r["method"] == method and r["seed"] == 0 and r.get("candidate", "stream") == "stream"
        and any(np.isclose(r["learning_rate"], rate) for rate in SWEEP_RATES[method])
    ]  # fmt: skip


def best_rate(method: str) -> float | None:
    """The swept rate with the highest mean proxy over the last 3 evaluations; None until the sweep is complete."""
    method = SHARES_RATE.get(method, method)
    runs = sweep_runs(method)
    if len(runs) < len(SWEEP_RATES[method]):
        return None
    return max(runs, key=lambda r: late_mean(r, "proxy"))["learning_rate"]


def study_plan(methods: tuple[str, ...]) -> list[tuple[str, int, float | None]]:
    """Flow-GRPO and GRPO-Guard first (the testbed's shape and claim 4), then the others: in each part the sweeps,
    then seeds 1-4 seed-major. A seed run's rate (None here) is known once its method's sweep is complete."""

    def part(group: list[str]) -> list[tuple[str, int, float | None]]:
        sweeps = [(m, 0, rate) for m in group if m not in SHARES_RATE and m != "flow_grpo" for rate in SWEEP_RATES[m]]
        return sweeps + [(m, seed, None) for seed in STUDY_SEEDS for m in group]

    first = [m for m in methods if m in WATCHED]
    return part(first) + part([m for m in methods if m not in WATCHED])


def study_run(method: str, seed: int, rate: float, candidate: str = "stream") -> dict:
    import bench_algorithms  # its import registers the newer methods in the study's table

    alarm = _watching_alarm() if method in WATCHED else None
    fields = bench_algorithms.overrides(method) if method in bench_algorithms.METHODS else {}
    run = train_run(
        method,
        seed,
        rate,
        STEPS,
        run_dir(method, seed, rate, candidate),
        EVAL_STEPS,
        candidate_reward(candidate),
        train_captions=stream_captions(),
        callbacks=[alarm] if alarm else None,
        resume=True,
        per_device_train_batch_size=PROMPTS_PER_ROUND * 8 // 2,
        **fields,
    )
    if alarm is not None:
        run["alarm"] = {"first_stop": alarm.first_stop, "best_step": alarm.best_step}
    return run


def run_dir(method: str, seed: int, rate: float, candidate: str = "stream") -> str:
    """Where a run keeps its checkpoints until it is in its results file: under the repository's ignored `runs/`,
    which outlives a stopped session (a run started again continues from its newest checkpoint)."""
    return os.path.join(RUNS, f"study-{method}-{seed}-{rate:g}" + ("" if candidate == "stream" else f"-{candidate}"))


def finish(path: str, run: dict) -> None:
    """Append a finished run to its results file, then drop its checkpoints."""
    append(path, run, key=("method", "seed", "learning_rate", "candidate"))
    folder = run_dir(run["method"], run["seed"], run["learning_rate"], run.get("candidate", "stream"))
    shutil.rmtree(folder, ignore_errors=True)
    print(" ".join(f"{e['step']}:{e['proxy']:.3f}/{e['gold']:.3f}" for e in run["evals"]), flush=True)


@contextlib.contextmanager
def claimed(folder: str) -> Iterator[bool]:
    """Whether this process holds the run's lock, kept while the block runs: two workers whose plans overlap (a
    `--methods` worker beside the shards) never train the same run at once. The lock dies with its process, so a
    killed worker leaves nothing to clean up."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def run_study(methods: tuple[str, ...], shard: int, shards: int) -> None:
    """Every planned run of this shard, each appended to the study file as it finishes; a seed run whose method's
    sweep is not complete yet, or a run another worker holds, waits for a later pass while the other runs go on."""
    mine = study_plan(methods)[shard::shards]
    while True:
        progressed = waiting = False
        for method, seed, rate in mine:
            rate = rate if rate is not None else best_rate(method)
            if rate is None:
                waiting = True
                continue
            with claimed(run_dir(method, seed, rate)) as held:
                if done(STUDY_FILE, method, seed, rate):
                    continue
                if not held:
                    waiting = True
                    continue
                print(f"{method} seed {seed} lr {rate:g} ...", flush=True)
                finish(STUDY_FILE, study_run(method, seed, rate))
                progressed = True
        if not waiting:
            return
        if not progressed:
            time.sleep(300)  # another shard is running the sweep this shard waits for


def study_status(methods: tuple[str, ...]) -> str:
    """Where the study stands: per method, the runs in the results file, those under way (the step of their newest
    checkpoint, and whether a worker is training them or they wait for a restart) and those still to run (a seed
    run's rate is unknown until its method's sweep is complete)."""
    from transformers.trainer_utils import get_last_checkpoint

    rows: dict[str, dict[str, list[str]]] = {}
    for method, seed, rate in study_plan(methods):
        rate = rate if rate is not None else best_rate(method)
        row = rows.setdefault(method, {"done": [], "under way": [], "to run": []})
        name = f"seed {seed}" + ("" if rate is None else f" at {rate:g}")
        folder = run_dir(method, seed, rate) if rate is not None else None
        checkpoint = get_last_checkpoint(folder) if folder and os.path.isdir(folder) else None
        if folder and done(STUDY_FILE, method, seed, rate):
            row["done"].append(name)
        elif checkpoint is not None:
            with claimed(folder) as free:
                pass  # a worker holds the lock of the run it trains
            state = "stopped" if free else "training"
            row["under way"].append(f"{name} (step {checkpoint.rsplit('-', 1)[-1]}, {state})")
        else:
            row["to run"].append(name)
    count = {state: sum(len(row[state]) for row in rows.values()) for state in ("done", "under way", "to run")}
    lines = [
        f"{sum(count.values())} planned runs: {count['done']} done, {count['under way']} under way, "
        f"{count['to run']} to run.",
        "",
        "| method | done | under way | to run |",
        "|---|---|---|---|",
    ]
    for method, row in rows.items():
        lines.append(f"| {method} | {len(row['done'])} | {', '.join(row['under way']) or '-'} | "
                     f"{', '.join(row['to run']) or '-'} |")  # fmt: skip
    return "\n".join(lines)


def alarm_record(runs: list[dict], drop: float = 0.03) -> tuple[int, int, int]:
    """The declared reading of the live alarm on one method's runs: (runs caught, runs whose gold fell, false alarms).

    A run's gold fell when its end (the mean of its last 2 evaluations, the smoothing window cut at the end) is at
    least `drop` below its own peak (smoothed over 3 evaluations); the alarm caught it when it fired at or after that peak; it raised a false alarm when it fired in a run whose
    gold did not fall so."""
    from analysis.rise_and_fall import peak_index, window_mean

    caught = fell = false = 0
    for run in runs:
        if "alarm" not in run:
            continue
        peak = peak_index([run])
        falls = window_mean(run, peak, "gold", 1) - window_mean(run, len(run["evals"]) - 1, "gold", 1) >= drop
        fired = run["alarm"]["first_stop"]
        fell += falls
        caught += falls and fired is not None and fired >= run["evals"][peak]["step"]
        false += not falls and fired is not None
    return caught, fell, false


def study_seeds(study: dict) -> dict[str, list[dict]]:
    """Each method's runs of seeds 1-4 (the sweeps' seed 0 left out)."""
    from analysis.overoptimization import by_method

    seeded = {m: [r for r in group if r["seed"] in STUDY_SEEDS] for m, group in by_method(study).items()}
    return {m: group for m, group in seeded.items() if group}


def declared_shapes(seeded: dict[str, list[dict]]) -> str:
    """The declared readings of the testbed's shape, each once its method has all its seeds: Flow-GRPO's (the target:
    the rise and the fall with Student-t intervals above 0); AWM's (declared 2026-12-07: the same, and a mean proxy
    gain after the peak of at least 0); Flow-DPPO's (declared 2026-12-08: as AWM's, at Holm's 98.75% level for a
    fourth reading, its 95% intervals printed beside)."""
    from analysis.overoptimization import fmt
    from analysis.rise_and_fall import rise_and_fall

    def keeps_proxy(shape) -> bool:
        return shape.rises_then_falls and shape.final_proxy_gain[0] >= 0

    readings = {  # method: (claim, test, the level deciding)
        "flow_grpo": ("Flow-GRPO rises then falls (the declared target)", lambda shape: shape.rises_then_falls, 0.95),
        "awm": ("The testbed over-optimises under AWM (declared 2026-12-07)", keeps_proxy, 0.95),
        "flow_dppo": ("The testbed over-optimises under Flow-DPPO (declared 2026-12-08)", keeps_proxy, 0.9875),
    }
    lines = []
    for method, (claim, holds, level) in readings.items():
        runs = seeded.get(method, [])
        if len(runs) < len(STUDY_SEEDS):
            lines.append(f"- {claim}: waits for its seeds ({len(runs)} of {len(STUDY_SEEDS)}).")
            continue
        shape = rise_and_fall(runs, level=level)
        verdict = "yes" if holds(shape) else "no"
        line = (
            f"- {claim}: {verdict} (rise {fmt(shape.rise, sign=True)}, fall {fmt(shape.fall, sign=True)}, proxy gain after the "
            f"peak {shape.final_proxy_gain[0]:+.3f}"
        )
        if level != 0.95:
            described = rise_and_fall(runs)
            line += (
                f"; intervals at {level:.2%}; at 95%, as description: rise {fmt(described.rise, sign=True)}, "
                f"fall {fmt(described.fall, sign=True)}"
            )
        lines.append(line + ").")
    return "\n".join(lines)


def what_seeds_can_show(seeded: dict[str, list[dict]]) -> str:
    """Per method with all its seeds, a power reading (description, computed after the verdicts): the smallest mean
    rise 4 and 8 seeds could show with an interval above 0, given how the rises spread over these seeds, beside the
    gold at the first three evaluations after the base (steps 10-30) minus the base. A rise that is there but small
    would show as a positive early change below the first number; a negative one says there is no rise to see."""
    from analysis.overoptimization import fmt
    from analysis.rise_and_fall import early_change, smallest_visible_rise

    lines = [
        "| method | smallest visible rise: 4 seeds, 8 seeds | gold at steps 10-30 minus the base |",
        "|---|---|---|",
    ]
    for method, runs in seeded.items():
        if len(runs) >= len(STUDY_SEEDS):
            four, eight = (smallest_visible_rise(runs, n) for n in (4, 8))
            lines.append(f"| {method} | {four:.3f}, {eight:.3f} | {fmt(early_change(runs), sign=True)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def analyse_study(study: dict, plot_dir: str | None = None) -> str:
    """The study's reading; with `plot_dir`, every seed run in `goodhart_study.png` (gold over steps, against the
    proxy and against sqrt(KL); each method's mean thick) and every sweep run in `goodhart_sweeps.png`."""
    seeded = study_seeds(study)
    text = declared_shapes(seeded) + "\n\n" + shape_and_claim4(seeded, plot_dir, "goodhart_study.png")
    if power := what_seeds_can_show(seeded):
        text += "\n\nWhat the seeds can show (description):\n\n" + power
    text += "\n\nThe sweeps (seed 0):\n\n" + sweep_table(study)
    if plot_dir and (path := plot_sweeps(study, plot_dir)):
        text += f"\nPlot: {path}"
    return text


def all_sweep_runs(study: dict) -> list[dict]:
    """Every seed-0 sweep run, method by method in the study's order (Flow-GRPO's are the calibration's)."""
    from analysis.overoptimization import by_method

    methods = [m for m in STUDY_METHODS if m not in SHARES_RATE]
    return [*sweep_runs("flow_grpo"), *(r for m in methods for r in by_method(study).get(m, []) if r["seed"] == 0)]


def sweep_table(study: dict) -> str:
    """Every seed-0 sweep run in one table: where its held-out proxy and gold went (base, then the mean of the last 3
    evaluations) and how far it moved from the base (the KL at its last evaluation)."""

    runs = all_sweep_runs(study)
    lines = [
        "| method | rate | held-out proxy: base, last 3 | gold: base, last 3 | KL at the end |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        base, end = run["evals"][0], run["evals"][-1]
        lines.append(
            f"| {run['method']} | {run['learning_rate']:g} | {base['proxy']:.3f}, {late_mean(run, 'proxy'):.3f} "
            f"| {base['gold']:.3f}, {late_mean(run, 'gold'):.3f} | {end['kl']:.2f} |"
        )
    return "\n".join(lines)


def plot_sweeps(study: dict, plot_dir: str, name: str = "goodhart_sweeps.png") -> str | None:
    """Every seed-0 sweep run (Flow-GRPO's are the calibration's candidate-a runs): gold and held-out proxy over
    training, one line per method and rate, so that the runs the seeds' plot leaves out are drawn too."""
    from analysis.overoptimization import pyplot_or_none, save_figure

    plt = pyplot_or_none()
    runs = all_sweep_runs(study)
    if plt is None or not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for run in runs:
        steps = [e["step"] for e in run["evals"]]
        label = f"{run['method']} {run['learning_rate']:g}"
        line = axes[0].plot(steps, [e["gold"] for e in run["evals"]], lw=1, label=label)[0]
        axes[1].plot(steps, [e["proxy"] for e in run["evals"]], lw=1, color=line.get_color())
    axes[0].set(xlabel="optimizer step", ylabel="gold (caption fidelity, held out)", title="sweeps, seed 0: gold")
    axes[1].set(xlabel="optimizer step", ylabel="learned proxy (held out)", title="sweeps, seed 0: proxy")
    axes[0].legend(fontsize=7, ncol=2)
    return save_figure(fig, plot_dir, name)


def analyse_same_rate(study: dict, same_rate: dict, plot_dir: str | None = None) -> str:
    """The supplement's reading: Flow-GRPO's seeds at 1e-3 with GRPO-Guard's study seeds (1e-3)."""
    guard = [r for r in study_seeds(study).get("grpo_guard", []) if np.isclose(r["learning_rate"], SAME_RATE)]
    runs = {"grpo_guard": guard, "flow_grpo": same_rate["runs"]}
    return shape_and_claim4(runs, plot_dir, "goodhart_same_rate.png")


def run_same_rate() -> None:
    """The supplement's runs, each appended as it finishes; seeds already in the file are skipped."""
    for seed in STUDY_SEEDS:
        if any(r["seed"] == seed for r in load(SAME_RATE_FILE)["runs"]):
            continue
        print(f"flow_grpo seed {seed} lr {SAME_RATE:g} (same-rate) ...", flush=True)
        finish(SAME_RATE_FILE, study_run("flow_grpo", seed, SAME_RATE))


def shape_and_claim4(seeded: dict[str, list[dict]], plot_dir: str | None = None, name: str = "") -> str:
    """Per method the rise and fall with the alarm's record; claim 4 for each declared method against Flow-GRPO when
    both have 2+ seeds; with `plot_dir`, every run drawn into `name` there."""
    from analysis.overoptimization import claim4_over_base, fmt
    from analysis.rise_and_fall import plot_rise_and_fall, rise_and_fall

    seeded = {m: group for m, group in seeded.items() if group}
    lines = [
        "| method | rate | seeds | peak step | rise | fall | proxy gain after peak | alarm fired | alarm: caught, false |",
        "|---" * 9 + "|",
    ]
    for method, group in seeded.items():
        shape = rise_and_fall(group) if len(group) > 1 else None
        fired = [r["alarm"]["first_stop"] for r in group if "alarm" in r]
        caught, fell, false = alarm_record(group)
        record = f"{caught} of {fell} that fell, {false} false" if fired else "-"
        cells = (
            [str(shape.peak_step), fmt(shape.rise), fmt(shape.fall), fmt(shape.final_proxy_gain)]
            if shape
            else ["-"] * 4
        )
        lines.append(
            f"| {method} | {group[0]['learning_rate']:g} | {len(group)} | " + " | ".join(cells)
            + f" | {', '.join('-' if f is None else str(f) for f in fired) or 'not watched'} | {record} |"
        )  # fmt: skip
    for method in CLAIM4_AGAINST_FLOW_GRPO:
        pair = {m: seeded[m] for m in (method, "flow_grpo") if len(seeded.get(m, [])) > 1}
        if len(pair) == 2:
            lines += ["", claim4_over_base(pair, method, "flow_grpo")]
    if plot_dir and seeded:
        path = plot_rise_and_fall(seeded, plot_dir, name)
        if path:
            lines += ["", f"Plot: {path}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "phase",
        choices=[
            *("calibrate", "analyse", "calibrate-seeds", "analyse-seeds"),
            *("study", "status", "analyse-study", "same-rate", "analyse-same-rate"),
        ],
    )
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=["stream"])
    parser.add_argument("--methods", nargs="+", choices=STUDY_METHODS, default=list(STUDY_METHODS))
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th planned run starting at i")
    options = parser.parse_args(argv)
    shard, shards = (int(x) for x in options.shard.split("/"))
    if options.phase == "analyse":
        print(analyse(load(CALIBRATION_FILE)))
        return
    if options.phase == "analyse-study":
        print(analyse_study(load(STUDY_FILE), RESULTS))
        return
    if options.phase == "calibrate-seeds":
        run_seeded(shard, shards)
        return
    if options.phase == "analyse-seeds":
        print(analyse_seeded(load(CALIBRATION_FILE), RESULTS))
        return
    if options.phase == "study":
        run_study(tuple(options.methods), shard, shards)
        return
    if options.phase == "status":
        print(study_status(tuple(options.methods)))
        return
    if options.phase == "same-rate":
        run_same_rate()
        return
    if options.phase == "analyse-same-rate":
        print(analyse_same_rate(load(STUDY_FILE), load(SAME_RATE_FILE), RESULTS))
        return
    for candidate, rate in calibration_plan(tuple(options.candidates))[shard::shards]:
        if calibrated(candidate, rate):
            continue
        print(f"{candidate} lr {rate:g} ...", flush=True)
        run = run_candidate(candidate, rate)
        append(CALIBRATION_FILE, run)
        print(
            " ".join(f"{e['step']}:{e['proxy']:.3f}/{e['gold']:.3f}" for e in run["evals"]), run["screen"], flush=True
        )


if __name__ == "__main__":
    main()
