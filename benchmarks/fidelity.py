"""Numbers behind docs/fidelity.md: where our math and the official Flow-GRPO / GRPO-Guard code differ, and by how much.

    python benchmarks/fidelity.py

1. The factor between the exact Gaussian KL and Flow-GRPO's KL, per step of SD3.5's 10-step schedule (shift 3).
2. RatioNorm's mean-bias: GRPO-Guard's official code averages it over the batch, the paper and we take it per sample.
   On synthetic steps whose per-sample mean shifts span 0-10 clip ranges, how far apart are the two normalised
   log-ratios, and how many clip decisions change?
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trl_guard.losses import policy_log_ratio


def kl_factors() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.double()
    factors = 1 / (sigmas[:-1] - sigmas[1:])
    print("1. exact KL / Flow-GRPO KL = 1/(-dt), SD3.5 10 steps, shift 3:")
    print("   " + " ".join(f"{f:.1f}" for f in factors.tolist()))
    print(
        f"   range {factors.min():.1f} to {factors.max():.1f}; over the trained steps 0-8: {factors[:9].max():.1f} max"
    )


def mean_bias(batches: int = 32, batch: int = 7, epsilon: float = 2e-6) -> None:
    g = torch.Generator().manual_seed(0)
    differences, changed, decisions = [], 0, 0
    for _ in range(batches):
        shape = (batch, 16, 16, 16)
        old_mean = torch.randn(shape, generator=g, dtype=torch.float64)
        std = torch.full((batch, 1, 1, 1), 0.1, dtype=torch.float64)
        eps = torch.randn(shape, generator=g, dtype=torch.float64)
        x = old_mean + std * eps
        direction = torch.randn(shape, generator=g, dtype=torch.float64)
        direction /= direction.pow(2).flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)
        # per-sample shift of the normalised log-ratio, std * MEAN(d**2) / (2 std**2), uniform in [0, 10 epsilon]
        shift = torch.rand(batch, generator=g, dtype=torch.float64) * 10 * epsilon
        d = direction * torch.sqrt(2 * std.flatten() * shift).view(-1, 1, 1, 1)
        ours = policy_log_ratio(old_mean - d, old_mean, x, std, loss_type="ratio_norm")
        bias = d.pow(2).flatten(1).mean(1) / (2 * std.flatten())  # the shift removed from each sample
        official = ours - bias + bias.mean()  # the batch-averaged mean-bias
        differences.append((ours - official).abs() / epsilon)
        clip = lambda r: (torch.exp(r) > 1 + epsilon).long() - (torch.exp(r) < 1 - epsilon).long()  # noqa: E731
        changed += int((clip(ours) != clip(official)).sum())
        decisions += batch
    differences = torch.cat(differences)
    print(f"2. RatioNorm mean-bias, per sample (ours) vs batch mean (official), {batches} batches of {batch}:")
    print(f"   |difference| in clip ranges: max {differences.max():.2f}, mean {differences.mean():.2f}")
    print(f"   clip decisions that change: {changed} of {decisions}")


if __name__ == "__main__":
    kl_factors()
    mean_bias()
