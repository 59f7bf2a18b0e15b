"""How far from on-policy is the first training pass in half precision?

    OMP_NUM_THREADS=1 python benchmarks/precision_drift.py [--samples 16] [--train-batch 4] [--steps 10]

Before the first update the policy that trains is the policy that sampled, so the importance ratio should be exactly
1. It is, when the training forward repeats the sampling forward bit for bit; in half precision a forward over a
batch of another shape (other kernels, other summation orders) gives slightly different velocities, and the ratio
then starts off 1 by noise alone. With GRPO-Guard's clip range of 2e-6, noise of that size decides clipping.

The pretrained toy model (`trl_guard.toy`) samples `--samples` SDE trajectories (noise level 0.7, `--steps` steps)
as one batch, recording each step's mean, as the trainer records them; the first training pass then recomputes the
means with gradients on, in training micro-batches of `--train-batch` (other shape) or of `--samples` (same shape).
Per timestep it prints the largest |log-ratio| over samples, for Flow-GRPO's log-ratio and for RatioNorm's (what
GRPO-Guard clips), and the fraction of samples whose RatioNorm ratio already lies outside 1 +- 2e-6. Every
configuration runs in one process, so the figures compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_guard.algorithms.sde_ratio import policy_mean  # noqa: E402
from trl_guard.losses import policy_log_ratio  # noqa: E402
from trl_guard.rollout import sample_sde  # noqa: E402
from trl_guard.schedule import SDESchedule  # noqa: E402

GUARD_CLIP = 2e-6


def first_pass_log_ratios(pipeline, adapter, dtype, train_batch, samples, steps, recompute=False):
    """Per timestep, per sample: the log-ratios of the first training pass, (steps, samples) for each loss."""
    from trl_guard.toy.world import SIZE

    schedule = SDESchedule(noise_level=0.7)
    pipeline.transformer.to(dtype)
    captions = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a blue circle"]
    prompts = [captions[i % len(captions)] for i in range(samples)]
    embeds = adapter.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((samples, 3, SIZE, SIZE), generator=generator)
    sigmas = adapter.sigmas(steps)
    generators = [torch.Generator().manual_seed(100 + i) for i in range(samples)]
    pipeline.transformer.eval()
    with torch.no_grad():
        rollout = sample_sde(adapter, embeds, None, latents, sigmas, schedule, generators=generators)
    old_means = rollout.old_means
    if recompute:  # the option: the old means again, without gradients, in the training batch's shape
        with torch.no_grad():
            old_means = torch.stack(
                [
                    torch.cat(
                        [
                            policy_mean(
                                adapter,
                                schedule,
                                rollout.latents[rows, i],
                                rollout.latents[rows, i + 1],
                                sigmas[i],
                                sigmas[i + 1],
                                embeds.index(rows),
                                None,
                            )[0]
                            for rows in _chunks(samples, train_batch)
                        ]
                    )
                    for i in range(steps)
                ],
                1,
            )
    pipeline.transformer.train()
    results = {"flow_grpo": torch.zeros(steps, samples), "grpo_guard": torch.zeros(steps, samples)}
    for i in range(steps):
        for rows in _chunks(samples, train_batch):
            x, x_next = rollout.latents[rows, i], rollout.latents[rows, i + 1]
            mean, std = policy_mean(adapter, schedule, x, x_next, sigmas[i], sigmas[i + 1], embeds.index(rows), None)
            for loss_type in results:
                ratio = policy_log_ratio(mean.detach(), old_means[rows, i], x_next, std, loss_type=loss_type)
                results[loss_type][i, rows] = ratio.float()
    pipeline.transformer.to(torch.float32)
    return results


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, total)) for s in range(0, total, size)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default=os.path.join("docs", "results", "precision_drift.json"))
    options = parser.parse_args(argv)
    from trl_guard.adapters import get_adapter
    from trl_guard.adapters.base import SamplingSettings
    from trl_guard.toy.model import load_toy_pipeline
    from trl_guard.toy.train import MAX_SEQUENCE_LENGTH
    from trl_guard.toy.world import SIZE

    pipeline = load_toy_pipeline()
    adapter = get_adapter(pipeline)
    adapter.configure(SamplingSettings(height=SIZE, width=SIZE, max_sequence_length=MAX_SEQUENCE_LENGTH))
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, train_batch in (("same", options.samples), ("other", options.train_batch)):
            for recompute in (False, True):
                ratios = first_pass_log_ratios(
                    pipeline, adapter, dtype, train_batch, options.samples, options.steps, recompute
                )
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "train_batch": train_batch,
                    "shape": shape,
                    "recompute_old_means": recompute,
                    "max_abs_log_ratio_flow_grpo": ratios["flow_grpo"].abs().amax(1).tolist(),
                    "max_abs_log_ratio_grpo_guard": ratios["grpo_guard"].abs().amax(1).tolist(),
                    "frac_outside_guard_clip": (ratios["grpo_guard"].abs() > GUARD_CLIP).float().mean(1).tolist(),
                }
                rows.append(row)
                print(
                    f"{row['dtype']:>8} train batch {train_batch:>3} ({shape:>5}) recompute={str(recompute):5} "
                    f"max|log r| flow {max(row['max_abs_log_ratio_flow_grpo']):.2e}  "
                    f"guard {max(row['max_abs_log_ratio_grpo_guard']):.2e}  "
                    f"outside 1+-2e-6: {sum(row['frac_outside_guard_clip']) / options.steps:.0%}",
                    flush=True,
                )
    result = {"options": vars(options), "threads": torch.get_num_threads(), "rows": rows}
    with open(options.output, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
