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
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overoptimization import RESULTS, append, captions, load, train_run  # noqa: E402

CALIBRATION_FILE = os.path.join(RESULTS, "goodhart_calibration.json")
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


def done(path: str, candidate: str, rate: float, seed: int = 0) -> bool:
    return any(
        r.get("candidate") == candidate and r["seed"] == seed and np.isclose(r["learning_rate"], rate)
        for r in load(path)["runs"]
    )


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
        "| candidate | rate | base gold | peak step | rise | fall | proxy gain after peak | passes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        s = screen(run)
        lines.append(
            f"| {run['candidate']} | {run['learning_rate']:g} | {run['evals'][0]['gold']:.3f} | {s['peak_step']} | "
            f"{s['rise']:+.3f} | {s['fall']:+.3f} | {s['proxy_gain_after_peak']:+.3f} | {'yes' if s['passes'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["calibrate", "analyse"])
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=["stream"])
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th planned run starting at i")
    options = parser.parse_args(argv)
    if options.phase == "analyse":
        print(analyse(load(CALIBRATION_FILE)))
        return
    shard, shards = (int(x) for x in options.shard.split("/"))
    for candidate, rate in calibration_plan(tuple(options.candidates))[shard::shards]:
        if done(CALIBRATION_FILE, candidate, rate):
            continue
        print(f"{candidate} lr {rate:g} ...", flush=True)
        run = run_candidate(candidate, rate)
        append(CALIBRATION_FILE, run)
        print(
            " ".join(f"{e['step']}:{e['proxy']:.3f}/{e['gold']:.3f}" for e in run["evals"]), run["screen"], flush=True
        )


if __name__ == "__main__":
    main()
