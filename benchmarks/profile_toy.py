"""Where the toy world's time goes: sampling, scoring, training and evaluation of the demo's and the studies' steps.

    python benchmarks/profile_toy.py --setting demo --steps 6 --threads 2
    python benchmarks/profile_toy.py --setting study --steps 6 --threads 1   # a study shard runs single-threaded

Trains `--steps` optimizer steps of Flow-GRPO in the chosen setting (the demo's toy world: colour proxy, 16 eval
prompts; or the over-optimisation studies': learned proxy, 64 eval prompts with `eval_kl`), evaluating every 2 steps
so evaluation shows in the split, and prints the seconds spent in each part, measured by wrapping the trainer's own
methods:

- sampling: the algorithm's rollouts (the denoiser's forwards without gradients);
- scoring: the reward functions on the rollouts (in the worker thread that overlaps sampling) and, at evaluation,
  the proxy and gold scorers;
- training: the per-timestep forwards and backwards;
- evaluation: the ODE samples and the KL of the evaluation, scorers included (they are also counted in scoring).

Measured here (2 shared cores, no GPU) in docs/performance.md, "The toy world's time".

It writes nothing: run it on an idle machine and compare the parts within one run (timings on a shared machine are
noisy, ratios within a run less so).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class Timer:
    """Seconds spent in wrapped callables, by part; thread-safe (scoring runs in a worker thread)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[part] += time.perf_counter() - start

        setattr(owner, name, timed)


def build_trainer(setting: str, steps: int):
    """Flow-GRPO in the study's setting (`benchmarks/overoptimization.py`, learned proxy), or the demo's trainer
    (`trl_guard.scripts.demo.demo_trainer`), evaluated every 2 steps."""
    if setting == "study":
        from overoptimization import toy_trainer

        from trl_guard.toy.learned_proxy import learned_proxy

        return toy_trainer("flow_grpo", 1, 1e-3, steps, "/tmp/profile_toy/study", 2, learned_proxy)
    from trl_guard.scripts import demo

    options = demo.parse_options(["--world", "toy", "--steps", str(steps), "--output-dir", "/tmp/profile_toy/demo"])
    trainer = demo.demo_trainer("flow_grpo", demo.toy_world(), options)
    trainer.args.eval_steps = 2
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["demo", "study"], default="demo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    options = parser.parse_args(argv)
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    trainer = build_trainer(options.setting, options.steps)
    timer = Timer()
    timer.wrap(trainer.algorithm, "sample", "sampling")
    # calling an instance looks `__call__` up on its class: both reward sets (proxy and gold) are timed there
    timer.wrap(type(trainer.rewards), "__call__", "scoring")
    timer.wrap(trainer, "_train_on_batch", "training")
    timer.wrap(trainer, "_evaluate_dataset", "evaluation")
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    print(f"{options.setting}: {options.steps} steps, {torch.get_num_threads()} threads, {total:.1f} s in all")
    for part in ("sampling", "scoring", "training", "evaluation"):
        print(f"  {part:<10} {timer.seconds[part]:8.1f} s  {100 * timer.seconds[part] / total:5.1f}%")


if __name__ == "__main__":
    main()
