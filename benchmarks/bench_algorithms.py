"""Flow-DPPO, DGPO, online Diffusion-DPO and GARDO against Flow-GRPO, GRPO-Guard, DiffusionNFT and AWM on the toy world:
proxy gained per CPU-second, and gold at matched proxy (issue 29 item 6).

    python benchmarks/bench_algorithms.py smoke [methods]   # 2 steps of each method into /tmp: it runs; s per step
    python benchmarks/bench_algorithms.py sweep             # each new method, seed 0, three rates, 20 steps
    python benchmarks/bench_algorithms.py run               # each at its best rate, seeds 1-3, 20 steps
    python benchmarks/bench_algorithms.py cost              # seconds per optimizer step of every method, one process
    python benchmarks/bench_algorithms.py analyse
    bash benchmarks/bench_algorithms.sh                     # sweep, run and cost in one niced single-threaded process

Everything below was declared before any run.

**Setting**: `benchmarks/bench_forward.py`'s, so that its comparison is ours: the over-optimisation study's toy world
(`benchmarks/overoptimization.py`), colour proxy, 8 prompts x 8 samples per round, two optimizer steps per round (32
samples, four whole groups, per micro-batch), 10 sampling steps, LoRA r=16, no reference penalty (`beta=0`; GARDO
aside), evaluated every 5 steps on 64 held-out captions. The comparison: Flow-GRPO and GRPO-Guard are the SDE-window benchmark's
full-trajectory runs (`docs/results/window.json`, seeds 0-2, 3e-3 each), DiffusionNFT and AWM `bench_forward.py`'s
(`docs/results/forward.json`, seeds 1-3, 1e-2 and 3e-3); all of them are read over their first 20 steps.

**Per-method settings**: each method's official loss settings (`examples/recipes/*_flow_dppo.yaml`, `*_dgpo.yaml`,
`*_dpo.yaml` give the sources) where the toy setting allows; the choices the toy setting forces:

- **Flow-DPPO** (`flow_dppo`): UniRL's mask, `dppo_kl_threshold=1e-5` with the KL normalised by the SDE noise
  (`dppo_kl_normalize=True`), no ratio clip. Rollouts, advantages and trained steps are the comparison Flow-GRPO
  runs' (SDE at `noise_level=0.7`, all 9 noisy steps, group-normalised advantages), so that the loss is the only
  difference from Flow-GRPO. Not the official 3-step SDE window in steps 0-4, nor its one-std-per-round advantages.
- **DGPO** (`dgpo`): `dgpo_beta=100`, clip range `epsilon=1e-2` on the ratio to the lagged copy (`dgpo_clip_dsm`),
  group-shared noise, the frozen base as the group score's reference (`dgpo_lagged_reference=False`), ODE rollouts.
  Noise levels: the official 4 levels per round among grid indices 0-6 (`dgpo_num_train_timesteps=4`,
  `dgpo_max_train_step=6`, its `trunc_steps` for a 10-step grid, which the toy's is), not NFT's and AWM's 9: the cost
  per step measures what that saves. Whole groups per micro-batch: 32 samples = 4 groups of 8, as the loss needs. The
  official velocity penalty `beta=0.02` is dropped (no method here has a reference penalty); the lagged-copy sampler
  (after 200 steps) is never reached in 20. A round serves two optimizer steps here, one officially: the lagged copy
  follows at round starts (its decay is at most 0.02 within 20 steps, so it is the round's starting weights).
- **online Diffusion-DPO** (`dpo`): `dpo_beta=100`, one best-against-worst pair per group, 9 noise levels per pair
  (`timestep_fraction=0.99`, as the official), rollouts with Flow-GRPO's SDE at `noise_level=0.7` from the reference.
  The reference is the official "OnlineDPO" mode refreshed at every round (`dpo_ref_update_steps=2`: two optimizer
  steps per round), not the official default, the frozen base. Why: the frozen base also samples every round, so the
  pairs would never come from the trained policy: offline DPO on base samples, while every other method here learns
  from its own rollouts; the official OnlineDPO interval ("e.g. 40") would never refresh within 20 steps, so it would
  be the frozen base too. A refresh every round is the most online the mode gets: the rollouts are the policy's as of
  the round's start, as Flow-GRPO's are.

**Rates**: each official rate is Flow-GRPO's official 3e-4 (UniRL, DGPO's `config/base.py`, flow_grpo's DPO config),
so each new method sweeps Flow-GRPO's toy grid, 1e-3, 3e-3 and 1e-2, on seed 0 for 20 steps; the best is the highest
mean proxy over the last three evaluations (the study's rule, `overoptimization.best_rates`). The comparison runs use
seeds 1-3 at that rate, so no sweep run enters them.

**Cost**: seconds per optimizer step in one process and one thread, every method of the table alternated in the same
process (`cost`: Flow-GRPO, NFT, AWM and the new ones, 2 repeats, 6 steps each, the first round left out, evaluation
off; GRPO-Guard costs what Flow-GRPO costs), so that the ratios are measured under the same load. Proxy gained per
CPU-second is (proxy at step 20 - proxy at step 0) / (20 x seconds per step).

**GARDO** (`gardo`, on Flow-GRPO's loss), declared in session 11 before its runs, after the others had finished (it
was not committed when the rest was declared). Rollouts, clip range and trained steps are the comparison Flow-GRPO
runs'; what GARDO changes is what differs: its advantages (`R - mean_group(R)`, no division by a standard deviation),
its uncertainty-gated KL with the official weight `beta=0.04` to its adaptive reference (refreshed at a round's start
when a step's KL exceeded the official 3e-4, or after 15 rounds), the gate starting at the official fraction 0.1.
Choices the toy world forces: the gate needs an auxiliary reward that training may see and the gold must stay unseen,
so the auxiliary reward is the built-in `jpeg_compressibility` (weight 0 in the reward total, so the logged proxy is
the colour proxy alone; GARDO leaves auxiliary rewards out of the trained reward anyway), where the official runs use
aesthetic and ImageReward scores; the diversity-aware advantage is off (`gardo_diversity=False`): it needs an image
feature model (DINOv3 ViT-L/16 officially), and the toy world has none. `gardo_nft` is not compared: NFT's own runs
here are the baseline it would change, and its KL needs the same auxiliary-reward choice. Its rates are the same
sweep (1e-3, 3e-3, 1e-2 on seed 0), then seeds 1-3 at the best.

Each finished run is appended to its results file at once (`docs/results/algorithms_sweep.json`,
`docs/results/algorithms.json`) and runs already there are skipped; `cost` writes each timing as it is taken
(`docs/results/algorithms_cost.json`). So a stopped benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overoptimization as study  # noqa: E402
from bench_forward import RUN_FILE as FORWARD_FILE  # noqa: E402
from bench_forward import matched_table, plot  # noqa: E402
from bench_window import WINDOW_FILE, at_step  # noqa: E402
from overoptimization import RESULTS, append, best_rates, done, load, toy_trainer, train_run  # noqa: E402

SWEEP_FILE = os.path.join(RESULTS, "algorithms_sweep.json")
RUN_FILE = os.path.join(RESULTS, "algorithms.json")
COST_FILE = os.path.join(RESULTS, "algorithms_cost.json")

#: The methods compared, each with its `GuardConfig` fields beyond the toy setting's (`overoptimization.toy_trainer`);
#: `beta` is 0 for every one but GARDO, whose gated KL is the point of it.
METHODS: dict[str, dict] = {
    "flow_dppo": dict(loss_type="flow_dppo", dppo_kl_threshold=1e-5, dppo_kl_normalize=True),
    "dgpo": dict(
        loss_type="dgpo",
        timestep_fraction=1.0,  # unread by dgpo, which refuses it away from its default
        epsilon=1e-2,
        dgpo_beta=100.0,
        dgpo_num_train_timesteps=4,
        dgpo_max_train_step=6,
        dgpo_shared_noise=True,
        dgpo_clip_dsm=True,
        dgpo_clip_kl=False,
        dgpo_lagged_reference=False,
        dgpo_lagged_sampling_after=200,
    ),
    "dpo": dict(loss_type="dpo", dpo_beta=100.0, dpo_ref_update_steps=2),
    "gardo": dict(
        loss_type="gardo",
        beta=0.04,
        gardo_aux_rewards=["jpeg_compressibility"],
        reward_weights=[1.0, 0.0],
        gardo_diversity=False,
    ),
}
#: The comparison's methods, read from the other benchmarks' results files.
BASELINES = ("flow_grpo", "grpo_guard", "nft", "awm")
SWEEP_RATES = (1e-3, 3e-3, 1e-2)
SWEEP_STEPS, STEPS, SEEDS, EVAL_STEPS = 20, 20, 3, 5

# The study's trainer names a method's loss type and penalty in its own table; ours go there too.
for _name, _fields in METHODS.items():
    study.METHODS.setdefault(_name, dict(loss_type=_fields["loss_type"], beta=_fields.get("beta", 0.0)))


def overrides(method: str) -> dict:
    """`method`'s `GuardConfig` fields beyond the toy setting (the loss type comes from the study's table)."""
    return {k: v for k, v in METHODS[method].items() if k != "loss_type"}


def _run(path: str, plan: list[tuple[str, int, float]], steps: int, folder: str) -> None:
    for method, seed, rate in plan:
        if done(path, method, seed, rate):
            continue
        print(f"{method} seed {seed} lr {rate:g} ...", flush=True)
        fields = overrides(method)
        result = train_run(
            method, seed, rate, steps, f"/tmp/algos/{folder}-{method}-{seed}-{rate:g}", EVAL_STEPS, **fields
        )
        result["settings"] = fields
        append(path, result)
        last = result["evals"][-1]
        print(f"  {last['train_seconds']:.0f} s of training; proxy {last['proxy']:.3f}, gold {last['gold']:.3f}")


def sweep(options) -> None:
    _run(SWEEP_FILE, [(m, 0, rate) for m in METHODS for rate in SWEEP_RATES], SWEEP_STEPS, "sweep")


def run(options) -> None:
    rates = best_rates(load(SWEEP_FILE))
    missing = [m for m in METHODS if m not in rates]
    if missing:
        raise SystemExit(f"No swept rate for {missing}: run `python benchmarks/bench_algorithms.py sweep` first.")
    _run(RUN_FILE, [(m, seed, rates[m]) for seed in range(1, SEEDS + 1) for m in METHODS], STEPS, "run")


def _timed_trainer(method: str, seed: int, steps: int, output_dir: str):
    fields = overrides(method) if method in METHODS else {}
    return toy_trainer(method, seed, 3e-3, steps, output_dir, eval_strategy="no", eval_kl=False, **fields)


def smoke(options) -> None:
    """Two optimizer steps (one round) of each method, evaluation off, into /tmp: that it runs in this setting, and
    its seconds per step (`train()`'s wall time over 2, setup included). Nothing is written to the results."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    for method in options.methods or list(METHODS):
        with tempfile.TemporaryDirectory(dir="/tmp") as output_dir:
            trainer = _timed_trainer(method, 0, 2, output_dir)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        print(f"{method}: 2 steps in {seconds:.1f} s, {seconds / 2:.2f} s per optimizer step", flush=True)


def cost(options) -> None:
    """Seconds per optimizer step of each method in one process and one thread, methods alternated, evaluation off,
    the first round left out (as `bench_forward.py cost`). Each timing is saved as it is taken; a rerun adds only the
    missing ones."""
    import tempfile

    import torch
    from bench_trainer import StepClock

    torch.set_num_threads(1)
    steps = 6
    measured = load_cost()
    for repeat in range(options.repeats):
        for method in ("flow_grpo", "nft", "awm", *METHODS):
            if len(measured.get(method, [])) > repeat:
                continue
            with tempfile.TemporaryDirectory(dir="/tmp") as output_dir:
                trainer = _timed_trainer(method, repeat, steps, output_dir)
                stamps: list[float] = []
                trainer.add_callback(StepClock(stamps))
                trainer.train()
            per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
            measured.setdefault(method, []).append(round(per_step, 3))
            with open(COST_FILE + ".tmp", "w") as f:
                json.dump({"seconds_per_step": measured, "steps": steps, "threads": 1}, f, indent=1)
            os.replace(COST_FILE + ".tmp", COST_FILE)
            print(f"{method} repeat {repeat}: {per_step:.2f} s per optimizer step", flush=True)


def load_cost() -> dict[str, list[float]]:
    if not os.path.exists(COST_FILE):
        return {}
    with open(COST_FILE) as f:
        return json.load(f)["seconds_per_step"]


def _first_steps(run: dict, steps: int) -> dict:
    """`run` with its evaluations up to `steps`: the window benchmark's runs go to 40, ours to 20."""
    return {**run, "evals": [e for e in run["evals"] if e["step"] <= steps]}


def groups() -> dict[str, list[dict]]:
    """Every finished run of the comparison, by method, up to step `STEPS`: the baselines' and ours."""
    found: dict[str, list[dict]] = {}
    for r in load(WINDOW_FILE)["runs"]:
        if r.get("window") == "full" and r["method"] in BASELINES:
            found.setdefault(r["method"], []).append(_first_steps(r, STEPS))
    for path in (FORWARD_FILE, RUN_FILE):
        for r in load(path)["runs"]:
            found.setdefault(r["method"], []).append(_first_steps(r, STEPS))
    return found


def _order(method: str) -> tuple[int, str]:
    known = (*BASELINES, *METHODS)
    return (known.index(method) if method in known else len(known), method)


def analyse(plot_dir: str | None = None) -> str:
    from analysis.overoptimization import bootstrap, fmt

    by_method = groups()
    swept = load(SWEEP_FILE)["runs"]
    if not swept and not any(m in by_method for m in METHODS):
        return "No runs of the new methods yet: run the sweep, then `run`."
    best = best_rates({"runs": swept})
    lines = ["Sweep (seed 0, 20 steps; mean proxy over the last three evaluations; * the pick):", ""]
    for r in sorted(swept, key=lambda r: (_order(r["method"]), r["learning_rate"])):
        pick = " *" if np.isclose(best[r["method"]], r["learning_rate"]) else ""
        lines.append(
            f"- {r['method']} lr {r['learning_rate']:g}: {np.mean([e['proxy'] for e in r['evals'][-3:]]):.3f}{pick}"
        )
    measured = {m: float(np.median(v)) for m, v in load_cost().items()}
    if "flow_grpo" in measured:
        measured.setdefault("grpo_guard", measured["flow_grpo"])  # the loss does not change the cost of a step
    lines += [
        "",
        f"After {STEPS} optimizer steps (mean over seeds, 95% bootstrap interval); proxy gained per CPU-second uses "
        "the one-process cost per step (`cost`) where measured, else the runs' own training seconds (marked *).",
        "",
        "| method | seeds | rate | s per step | proxy | gold (caption fidelity) | proxy gained per step "
        "| against Flow-GRPO, per step | proxy gained per CPU-second | against Flow-GRPO, per CPU-second |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gains: dict[str, list[float]] = {}
    step_gains: dict[str, list[float]] = {}
    rows = []
    for method, group in sorted(by_method.items(), key=lambda item: _order(item[0])):
        group = [r for r in group if r["evals"][-1]["step"] >= STEPS]  # a run cut short is left out
        if not group:
            continue
        proxy = [at_step(r, STEPS, "proxy") for r in group]
        gold = [at_step(r, STEPS, "gold") for r in group]
        if method in measured:
            per_step, mark = [measured[method]] * len(group), ""
        else:
            per_step, mark = [at_step(r, STEPS, "train_seconds") / STEPS for r in group], "*"
        step_gains[method] = [(p - r["evals"][0]["proxy"]) / STEPS for p, r in zip(proxy, group)]
        gains[method] = [g / s for g, s in zip(step_gains[method], per_step)]
        rows.append((method, group, proxy, gold, per_step, mark))

    def against(measure: dict[str, list[float]], method: str) -> str:
        reference = np.mean(measure["flow_grpo"]) if "flow_grpo" in measure else np.nan
        ratio = np.mean(measure[method]) / reference
        return f"{ratio:.2f}x" if np.isfinite(ratio) and reference > 0 else "n/a"

    for method, group, proxy, gold, per_step, mark in rows:
        seeds = ",".join(str(r["seed"]) for r in group)
        lines.append(
            f"| {method} | {seeds} | {group[0]['learning_rate']:g} | {np.mean(per_step):.2f}{mark} | "
            f"{fmt(bootstrap(proxy))} | {fmt(bootstrap(gold))} | {fmt(bootstrap(step_gains[method]), 4)} | "
            f"{against(step_gains, method)} | {fmt(bootstrap(gains[method]), 5)} | {against(gains, method)} |"
        )
    compared = {m: g for m, g in by_method.items() if m in gains}
    lines += matched_table(compared, "Gold at matched proxy, every method (runs that reach the level):")
    # A method that gains little caps the levels above; the others are compared again further out.
    far = {m: g for m, g in compared.items() if np.median([max(e["proxy"] for e in r["evals"]) for r in g]) >= 0.2}
    if 2 <= len(far) < len(compared):
        lines += matched_table(
            far, f"Gold at matched proxy among the methods whose median run reaches 0.2 ({', '.join(sorted(far))}):"
        )
    if plot_dir:
        path = plot(compared, plot_dir, name="algorithms.png", sweep=swept)
        if path:
            lines += ["", f"Plot: {path}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["smoke", "sweep", "run", "cost", "analyse"])
    parser.add_argument("methods", nargs="*", help="`smoke`: the methods (default: every new one)")
    parser.add_argument("--repeats", type=int, default=2, help="`cost`: timings per method")
    parser.add_argument("--plot-dir", default=RESULTS, help="where `analyse` writes algorithms.png")
    options = parser.parse_args()
    {"smoke": smoke, "sweep": sweep, "run": run, "cost": cost}.get(
        options.phase, lambda o: print(analyse(o.plot_dir))
    )(options)


if __name__ == "__main__":
    main()
