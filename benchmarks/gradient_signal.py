"""How much of a training step's gradient is signal? Each method's gradient at the base policy, over independent steps.

    OMP_NUM_THREADS=2 python benchmarks/gradient_signal.py            # measure (resumes per method)
    python benchmarks/gradient_signal.py --analyse                    # the table from the results file

Why. On the Goodhart testbed (`goodhart_testbed.py`, candidate a: the learned proxy on the stream of captions),
Flow-GRPO at 3e-3 moved far from the base (KL about 1 at step 100) while its held-out proxy barely moved, and AWM and
NFT bought far more proxy per unit of KL. One explanation: Flow-GRPO's gradient on a batch is mostly noise, and Adam
takes a step of about the learning rate's size per weight whatever the gradient's signal, so the policy drifts
without improving. This script measures the first half of that explanation; it does not test the second.

What it measures. Each method trains the study's setting (seed 0, the learned proxy, 16 prompts x 8 images a round,
two optimizer steps of 64 images), but every gradient is recorded just before the optimizer step and then dropped,
so the policy stays the base policy and every step's gradient `g_i` is an independent draw of the same random vector
(mean `mu`, total variance `sigma^2`). Then:

- the signal fraction `rho = |mu|^2 / E|g|^2`, estimated without bias in the numerator as the mean of `g_i . g_j`
  over pairs `i != j` divided by the mean of `|g_i|^2`; 1 is a gradient the same at every step, 0 one that is all
  noise. With `m` times the batch, the noise variance is `sigma^2 / m`, so `rho_m = rho / (rho + (1 - rho) / m)`.
- its 95% interval by a percentile bootstrap over the steps (pairs of one resampled step with itself left out).

The LoRA's B matrices start at zero, so at the base policy only they have gradients: this is the gradient of the
first steps of a run. Every run is written to `docs/results/gradient_signal.json` as it finishes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from goodhart_testbed import PROMPTS_PER_ROUND, stream_captions  # noqa: E402
from overoptimization import RESULTS, append, load, toy_trainer  # noqa: E402

RESULTS_FILE = os.path.join(RESULTS, "gradient_signal.json")
METHODS = ("flow_grpo", "grpo_guard", "nft", "awm")
STEPS = 24  # independent gradients per method: 12 rounds of two optimizer steps
LEARNING_RATE = 1e-3  # unused by the measurement (no step is taken), but the methods' settings read it


class RecordAndDropGradients(TrainerCallback):
    """Keeps each optimizer step's gradient of the trainable weights, then drops it so that the step changes nothing."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.gradients: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        self.gradients.append(torch.cat([g.detach().flatten().double() for g in grads]))
        for p in self.parameters:
            p.grad = None  # the optimizer skips a weight without a gradient: the policy stays the base


def signal_fraction(gradients: np.ndarray) -> float:
    """`rho` from the gradients of independent steps (rows)."""
    return _fraction(gradients @ gradients.T, np.arange(len(gradients)))


def _fraction(gram: np.ndarray, steps: np.ndarray) -> float:
    """`rho` from the steps' Gram matrix, over the (possibly resampled) `steps`."""
    distinct = steps[:, None] != steps[None, :]  # a step paired with its own copy is no independent pair
    return float(gram[np.ix_(steps, steps)][distinct].mean() / np.diag(gram)[steps].mean())


def bootstrap(gradients: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    gram = gradients @ gradients.T  # once: every draw resamples its rows and columns
    values = [_fraction(gram, rng.integers(0, len(gram), len(gram))) for _ in range(draws)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def measure(method: str, output_dir: str) -> dict:
    from trl_guard.toy.learned_proxy import learned_proxy

    trainer = toy_trainer(
        method,
        0,
        LEARNING_RATE,
        STEPS,
        output_dir,
        reward=learned_proxy,
        train_captions=stream_captions(),
        eval_strategy="no",
        eval_kl=False,
        per_device_train_batch_size=PROMPTS_PER_ROUND * 8 // 2,
        max_grad_norm=0.0,  # the raw gradient: clipping would shorten the larger draws before they are recorded
    )
    recorder = RecordAndDropGradients(trainer.model)
    before = [p.detach().clone() for p in recorder.parameters]
    trainer.add_callback(recorder)
    trainer.train()
    if not all(torch.equal(p, q) for p, q in zip(recorder.parameters, before)):
        raise RuntimeError("the weights moved: the gradients were not draws at the base policy")
    gradients = torch.stack(recorder.gradients).numpy()
    rho = signal_fraction(gradients)
    norms = np.linalg.norm(gradients, axis=1)
    cosines = gradients @ gradients.T / np.outer(norms, norms)
    return {
        "method": method,
        "steps": len(gradients),
        "gradient_norm": float(norms.mean()),
        "signal_fraction": rho,
        "interval": bootstrap(gradients),
        "cosine_of_pairs": float(cosines[np.triu_indices(len(cosines), k=1)].mean()),
    }


def scaled(rho: float, m: float) -> float:
    """The signal fraction with `m` times the batch: the noise variance divides by `m`."""
    return rho / (rho + (1 - rho) / m) if rho > 0 else rho


def table(results: dict) -> str:
    lines = [
        "| method | steps | mean gradient norm | signal fraction (95% bootstrap) | mean cosine of two steps "
        "| at 4x the batch | at 16x |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        low, high = run["interval"]
        rho = run["signal_fraction"]
        lines.append(
            f"| {run['method']} | {run['steps']} | {run['gradient_norm']:.2e} | {rho:.3f} [{low:.3f}, {high:.3f}] "
            f"| {run['cosine_of_pairs']:.3f} | {scaled(rho, 4):.3f} | {scaled(rho, 16):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--analyse", action="store_true")
    parser.add_argument("--output_dir", default="/tmp/gradient_signal")
    options = parser.parse_args()
    if not options.analyse:
        for method in METHODS:
            if any(r["method"] == method for r in load(RESULTS_FILE)["runs"]):
                continue
            print(f"{method} ...", flush=True)
            append(RESULTS_FILE, measure(method, os.path.join(options.output_dir, method)), key=("method",))
    print(table(load(RESULTS_FILE)))


if __name__ == "__main__":
    main()
