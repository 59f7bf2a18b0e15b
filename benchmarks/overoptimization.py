"""Does GRPO-Guard protect the gold score? Multi-seed over-optimisation study on the toy world.

    python benchmarks/overoptimization.py sweep      # one seed, three learning rates per method
    python benchmarks/overoptimization.py study      # every method at its best rate, --seeds seeds each
    python benchmarks/overoptimization.py analyse    # tables, the verdict and the plots from the results files

Add `--shard 0/2` and `--shard 1/2` to run a phase as two single-threaded processes (`OMP_NUM_THREADS=1`).

Every method trains the pretrained toy model (`trl_guard/toy/pretrained`) on the hackable colour proxy and is
evaluated every 10 optimizer steps (and before training) on 64 held-out captions, the same for every seed and method,
disjoint from the 64 training captions: the proxy, the gold scores (caption fidelity, cleanliness) and the KL of the
policy from the base policy (`GuardConfig.eval_kl`). The baselines are the official ones: Flow-GRPO's KL definition
(`kl_type="flow_grpo"`, beta 0.04 as its OCR and GenEval configs) and the first `int(10 * 0.99)` = 9 sampling steps
trained (`timestep_selection="first"`). No EMA: with 100 optimizer steps, the official EMA (decay 0.9 every 8 steps)
would average over most of the run.

Each finished run is appended at once to its results file (`docs/results/overoptimization_sweep.json`,
`docs/results/overoptimization.json`); runs already there are skipped, so a stopped study resumes where it was.
The best learning rate of a method is the one with the highest mean proxy over its last three evaluations in the
sweep (what a practitioner tuning for the reward would pick); the KL variants use their base method's rate.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import time

import numpy as np
from transformers import TrainerCallback

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")
STUDY_FILE = os.path.join(RESULTS, "overoptimization.json")
SWEEP_FILE = os.path.join(RESULTS, "overoptimization_sweep.json")

METHODS = {
    "flow_grpo": dict(loss_type="flow_grpo", beta=0.0),
    "flow_grpo_kl": dict(loss_type="flow_grpo", beta=0.04),
    "grpo_guard": dict(loss_type="grpo_guard", beta=0.0),
    "grpo_guard_kl": dict(loss_type="grpo_guard", beta=0.04),
    "ratio_norm": dict(loss_type="ratio_norm", beta=0.0),
    "temp_reweight": dict(loss_type="temp_reweight", beta=0.0),
    # the forward-process losses (benchmarks/bench_forward.py): official settings but the rate, no reference penalty
    "nft": dict(loss_type="nft", beta=0.0),
    "awm": dict(loss_type="awm", beta=0.0),
}
# The paper lowers GRPO-Guard's rate 3x against Flow-GRPO's: the grids are offset by the same factor.
SWEEP_RATES = {
    "flow_grpo": [1e-3, 3e-3, 1e-2],
    "grpo_guard": [3e-4, 1e-3, 3e-3],
    "ratio_norm": [1e-3, 3e-3, 1e-2],
    "temp_reweight": [1e-3, 3e-3, 1e-2],
}
BASE_METHOD = {"flow_grpo_kl": "flow_grpo", "grpo_guard_kl": "grpo_guard"}
PROXY, GOLD = "eval_reward", "eval_gold/caption_fidelity"


def captions() -> tuple[list[str], list[str]]:
    """64 training and 64 held-out captions, disjoint, fixed for every seed and method."""
    from trl_guard.toy.train import all_captions

    shuffled = all_captions()
    random.Random(2026).shuffle(shuffled)
    return shuffled[:64], shuffled[64:128]


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": []}


def append(path: str, run: dict, key: tuple[str, ...] = ()) -> None:
    """Add one finished run and rewrite the file atomically, so a kill never leaves it half-written; a lock file
    keeps two shards of the study from losing each other's runs. With `key` (field names), a run the file already
    holds with the same values of those fields (kept by another process first) is not added twice."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load(path)
        if key and any(all(kept.get(k) == run.get(k) for k in key) for kept in results["runs"]):
            print(f"{path} already holds this run: not added twice.", flush=True)
            return
        results["runs"].append(run)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


def done(path: str, method: str, seed: int, learning_rate: float) -> bool:
    return any(
        r["method"] == method and r["seed"] == seed and np.isclose(r["learning_rate"], learning_rate)
        for r in load(path)["runs"]
    )


def toy_trainer(
    method: str,
    seed: int,
    learning_rate: float,
    steps: int,
    output_dir: str,
    eval_steps: int = 10,
    reward=None,
    train_captions: list[str] | None = None,
    **overrides,
):
    """The study's trainer for `method` on the toy world, evaluated every `eval_steps`; `reward` replaces the colour
    proxy (the learned-proxy probe), `train_captions` the 64 training captions (the Goodhart testbed's stream),
    `overrides` replace or add `GuardConfig` fields (the window benchmark's `sde_window_size`)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
    from trl_guard.callbacks import GuardProgressCallback
    from trl_guard.scoring import resolve_reward_funcs
    from trl_guard.toy import caption_fidelity, cleanliness, colour_proxy
    from trl_guard.toy.model import load_toy_pipeline
    from trl_guard.toy.train import MAX_SEQUENCE_LENGTH

    default_train, eval_captions = captions()
    train_captions = default_train if train_captions is None else train_captions
    settings = METHODS[method]
    fields = dict(
        output_dir=output_dir,
        loss_type=settings["loss_type"],
        beta=settings["beta"],
        kl_type="flow_grpo",
        timestep_fraction=0.99,
        timestep_selection="first",
        num_generations=8,
        per_device_train_batch_size=32,
        steps_per_generation=2,  # two optimizer steps per round, as Flow-GRPO
        num_inference_steps=10,
        eval_num_inference_steps=10,
        noise_level=0.7,
        height=32,
        width=32,
        guidance_scale=1.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_steps=steps,
        eval_strategy="steps",
        eval_steps=eval_steps,
        per_device_eval_batch_size=64,
        eval_kl=True,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
    )
    args = GuardConfig(**{**fields, **overrides})
    # GARDO's gate compares the proxy's ranks with auxiliary rewards' (`gardo_aux_rewards`, built-in names): they are
    # trained-on rewards of their own, never the gold scores, which training must not see.
    auxiliary = resolve_reward_funcs(args.gardo_aux_rewards or [], field="gardo_aux_rewards")
    trainer = GuardGRPODiffusionTrainer(
        model=load_toy_pipeline(),
        reward_funcs=[reward or colour_proxy, *auxiliary],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": train_captions}),
        eval_dataset=Dataset.from_dict({"prompt": eval_captions}),
        peft_config=LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian"),
        gold_reward_funcs=[caption_fidelity, cleanliness],
    )
    for callback in (PrinterCallback, ProgressCallback, GuardProgressCallback):
        trainer.remove_callback(callback)
    return trainer


def train_run(
    method: str,
    seed: int,
    learning_rate: float,
    steps: int,
    output_dir: str,
    eval_steps: int = 10,
    reward=None,
    train_captions: list[str] | None = None,
    callbacks: list | None = None,
    resume: bool = False,
    **overrides,
) -> dict:
    """One run of `method` on the toy world, evaluated before training and every `eval_steps`; `callbacks` are added
    to the trainer (the Goodhart study's live alarm), `overrides` are extra `GuardConfig` fields. Each evaluation
    records the seconds of training before it (evaluation time excluded).

    With `resume`, a checkpoint is saved at every evaluation (the newest kept) and the run's own bookkeeping (the base
    evaluation, the training clock, the minutes so far) is written beside them at that evaluation, before the
    checkpoint; a run started again in the same `output_dir` continues from the newest checkpoint: its evaluations
    are those of an unstopped run (the trainer's resume is exact, the alarm's counts travel in the checkpoint, and a
    log falls at each checkpoint). A checkpoint of the last step is read, not trained on again (the trainer takes no
    step from it); one whose bookkeeping is missing makes the run start afresh. The time between that checkpoint and the stop is not counted in
    `minutes`."""
    if resume:
        overrides = {
            **dict(save_strategy="steps", save_steps=eval_steps, save_total_limit=1, logging_steps=eval_steps),
            **overrides,
        }
    checkpoint, progress = _resumable_checkpoint(output_dir) if resume else (None, None)
    if resume and progress is None and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)  # a stop before any usable checkpoint: nothing to continue from
    trainer = toy_trainer(
        method, seed, learning_rate, steps, output_dir, eval_steps, reward, train_captions, **overrides
    )
    settings = METHODS[method]
    clock = _TrainingClock()
    start = time.time()
    if progress is not None:
        clock.seconds_at = {int(step): seconds for step, seconds in progress["seconds_at"].items()}
        clock.total = progress["total"]
        start -= 60 * progress["minutes"]
    saver = _RunProgress(clock, start, progress["base"] if progress else None) if resume else None
    for callback in [clock, *(callbacks or []), *([saver] if saver else [])]:
        trainer.add_callback(callback)
    base = trainer.evaluate() if progress is None else progress["base"]
    trainer.train(resume_from_checkpoint=checkpoint)  # from the last step's checkpoint it takes no step
    history = [{**base, "step": 0}] + [e for e in trainer.state.log_history if PROXY in e]
    for entry in history:
        entry["train_seconds"] = clock.seconds_at.get(entry["step"], 0.0)
    evals = [
        {
            "step": e["step"],
            "proxy": e[PROXY],
            "gold": e[GOLD],
            "kl": e["eval_kl"],
            "cleanliness": e["eval_gold/cleanliness"],
            "train_seconds": round(e["train_seconds"], 2),
        }
        for e in history
    ]
    train_rewards = [{"step": e["step"], "reward": e["reward"]} for e in trainer.state.log_history if "reward" in e]
    return {
        "method": method,
        "loss_type": settings["loss_type"],
        "seed": seed,
        "learning_rate": learning_rate,
        "beta": settings["beta"],
        "minutes": round((time.time() - start) / 60, 2),
        "evals": evals,
        "train_rewards": train_rewards,
    }


def _progress_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"run_progress-{step}.json")


def _resumable_checkpoint(output_dir: str) -> tuple[str | None, dict | None]:
    """The newest checkpoint of a stopped run in `output_dir` and the bookkeeping written at its evaluation; (None,
    None) when there is no checkpoint or no bookkeeping for it."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if checkpoint is None:
        return None, None
    step = int(checkpoint.rsplit("-", 1)[-1])
    path = _progress_path(output_dir, step)
    if not os.path.exists(path):
        path = os.path.join(checkpoint, "run_progress.json")  # where the first runs that resumed wrote it
    if not os.path.exists(path):
        return None, None
    with open(path) as f:
        return checkpoint, {**json.load(f), "step": step}


class _TrainingClock(TrainerCallback):
    """Seconds spent training (evaluations excluded) up to each evaluation, keyed by step."""

    def __init__(self):
        self.seconds_at: dict[int, float] = {}
        self.total = 0.0
        self.since: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.since = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        if self.since is not None:
            self.total += time.perf_counter() - self.since
        self.seconds_at[state.global_step] = self.total
        self.since = time.perf_counter() if self.since is not None else None  # the clock restarts after evaluation


class _RunProgress(TrainerCallback):
    """Writes what `train_run` needs to continue a run at each evaluation, before the checkpoint of that step is
    saved (so a checkpoint never exists without it); the first evaluation is the base."""

    def __init__(self, clock: _TrainingClock, start: float, base: dict | None):
        self.clock, self.start, self.base = clock, start, base

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.base = self.base if self.base is not None else metrics
        progress = {
            "base": self.base,
            "seconds_at": self.clock.seconds_at,
            "total": self.clock.total,
            "minutes": (time.time() - self.start) / 60,
        }
        path = _progress_path(args.output_dir, state.global_step)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(progress, f)
        os.replace(path + ".tmp", path)


def run_all(path: str, plan: list[tuple[str, int, float]], steps: int) -> None:
    for method, seed, learning_rate in plan:
        if done(path, method, seed, learning_rate):
            continue
        print(f"{method} seed {seed} lr {learning_rate:g} ...", flush=True)
        run = train_run(method, seed, learning_rate, steps, f"/tmp/overoptimization/{method}-{seed}-{learning_rate:g}")
        append(path, run)
        last = run["evals"][-1]
        print(
            f"  {run['minutes']:.1f} min; step {last['step']}: proxy {last['proxy']:.3f}, gold {last['gold']:.3f} "
            f"(base {run['evals'][0]['gold']:.3f}), kl {last['kl']:.3g}",
            flush=True,
        )


def best_rates(sweep: dict) -> dict[str, float]:
    """Per swept method, the rate with the highest mean proxy over its last three evaluations."""
    scores: dict[str, dict[float, float]] = {}
    for run in sweep["runs"]:
        scores.setdefault(run["method"], {})[run["learning_rate"]] = float(
            np.mean([e["proxy"] for e in run["evals"][-3:]])
        )
    best = {method: max(by_rate, key=by_rate.get) for method, by_rate in scores.items()}
    for method, base in BASE_METHOD.items():
        if base in best:
            best[method] = best[base]
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["sweep", "study", "analyse"])
    parser.add_argument("--methods", nargs="+", default=["flow_grpo", "grpo_guard", "flow_grpo_kl", "grpo_guard_kl"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--shard",
        default="0/1",
        help="i/n: run every n-th planned run starting at i. Two single-threaded shards (OMP_NUM_THREADS=1) finish "
        "this small model's runs sooner than one two-threaded process on a 2-core machine.",
    )
    options = parser.parse_args(argv)
    shard, shards = (int(x) for x in options.shard.split("/"))
    if options.phase == "sweep":
        swept = [m for m in options.methods if m in SWEEP_RATES]
        plan = [(m, 0, lr) for m in swept for lr in SWEEP_RATES[m]]
        run_all(SWEEP_FILE, plan[shard::shards], options.steps)
    elif options.phase == "study":
        rates = best_rates(load(SWEEP_FILE))
        missing = [m for m in options.methods if m not in rates]
        if missing:
            raise SystemExit(f"No swept learning rate for {missing}: run the sweep phase for them first.")
        # seed-major order: every method gets its first seeds before any gets its last
        plan = [(m, seed, rates[m]) for seed in range(1, options.seeds + 1) for m in options.methods]
        run_all(STUDY_FILE, plan[shard::shards], options.steps)
    else:
        from analysis.overoptimization import analyse

        print(analyse(load(STUDY_FILE), load(SWEEP_FILE), plot_dir=RESULTS))


if __name__ == "__main__":
    main()
