"""One stochastic sampling step of a flow-matching model, with the log-probability of its outcome.

Convention (diffusers): ``sigmas`` run from 1 (pure noise) to 0 (data); one step goes from ``sigma`` to
``sigma_next`` with ``dt = sigma_next - sigma < 0``. The reverse-time SDE that shares the marginals of the
probability-flow ODE ``dx = v dt`` is discretised with Euler-Maruyama:

    s      = noise_level * sqrt(sigma / (1 - sigma'))   # "flow_grpo"; sigma' = sigma_next where sigma == 1
    s      = noise_level                                # "dance_grpo"
    mean   = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std    = s * sqrt(-dt)
    x_next = mean + std * eps

``log_prob`` is the Gaussian log-density of ``x_next`` averaged (MEAN, not sum) over every non-batch element, as
Flow-GRPO, DanceGRPO and GRPO-Guard do. This keeps importance ratios within ~1e-3 of 1, which is why clip ranges
for these methods are tiny (1e-4 for Flow-GRPO, 2e-6 for GRPO-Guard).
"""

from __future__ import annotations

import math

import torch

NOISE_SCHEDULES = ("flow_grpo", "dance_grpo")

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor so it broadcasts against a (B, ...) tensor."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(dim=1)


def sde_noise_scale(
    sigma: torch.Tensor, sigma_next: torch.Tensor, *, noise_level: float, noise_schedule: str = "flow_grpo"
) -> torch.Tensor:
    """The diffusion coefficient ``s`` of the SDE at ``sigma`` (shape of ``sigma``).

    For ``"flow_grpo"`` it grows with ``sigma``; at ``sigma == 1`` the formula divides by zero, so ``sigma_next``
    stands in for ``sigma`` in the denominator there (Flow-GRPO's rule). ``"dance_grpo"`` keeps it constant.
    """
    if noise_schedule == "flow_grpo":
        denominator_sigma = torch.where(sigma == 1, sigma_next, sigma)
        return noise_level * torch.sqrt(sigma / (1 - denominator_sigma))
    if noise_schedule == "dance_grpo":
        return torch.full_like(sigma, float(noise_level))
    raise ValueError(f"Unknown noise_schedule {noise_schedule!r}; expected one of {NOISE_SCHEDULES}.")


def _standard_normal(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        # One generator per sample makes the noise of a sample independent of the batch it lands in.
        if len(generator) != like.shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {like.shape[0]} samples.")
        return torch.stack(
            [
                torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype).to(like.device)
                for g in generator
            ]
        )
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    noise_level: float,
    noise_schedule: str = "flow_grpo",
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take one SDE step from ``sigma`` to ``sigma_next`` and score its outcome.

    Args:
        velocity: The model's velocity prediction ``v``, shape (B, ...).
        sample: The current latents ``x`` at ``sigma``, shape (B, ...).
        sigma: Current noise level per sample, shape (B,).
        sigma_next: Noise level after the step per sample, shape (B,); ``sigma_next < sigma``.
        noise_level: The SDE noise multiplier (0.7 in Flow-GRPO and GRPO-Guard).
        noise_schedule: ``"flow_grpo"`` (``s`` grows with ``sigma``) or ``"dance_grpo"`` (constant ``s``).
        prev_sample: When given, the step is not sampled: the log-probability of this ``x_next`` is returned
            (used in training to re-score a recorded trajectory). Named as in diffusers' schedulers.
        generator: Generator, or one generator per sample, for the step's noise.

    Returns:
        ``(prev_sample, log_prob, mean, std)``: the next latents (B, ...), their log-probability (B,) as the
        per-element MEAN of the Gaussian log-density, the Gaussian's mean (B, ...) and its standard deviation
        broadcastable to the sample (B, 1, ..., 1). The math runs in float32 or wider: bf16 overflows here.

    Example:
        >>> import torch
        >>> x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> sigma, sigma_next = torch.tensor([1.0, 1.0]), torch.tensor([0.9, 0.9])
        >>> x_next, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7)
        >>> log_prob.shape, std.shape
        (torch.Size([2]), torch.Size([2, 1, 1, 1]))
    """
    compute_dtype = torch.promote_types(sample.dtype, torch.float32)
    sample = sample.to(compute_dtype)
    velocity = velocity.to(compute_dtype)
    sigma = _per_sample(sigma.to(device=sample.device, dtype=compute_dtype), sample)
    sigma_next = _per_sample(sigma_next.to(device=sample.device, dtype=compute_dtype), sample)

    dt = sigma_next - sigma
    s = sde_noise_scale(sigma, sigma_next, noise_level=noise_level, noise_schedule=noise_schedule)
    mean = sample + (velocity + s**2 / (2 * sigma) * (sample + (1 - sigma) * velocity)) * dt
    std = s * torch.sqrt(-dt)

    if prev_sample is None:
        prev_sample = mean + std * _standard_normal(mean, generator)
    else:
        prev_sample = prev_sample.to(compute_dtype)

    log_density = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return prev_sample, _mean_per_sample(log_density), mean, std


def ode_step(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One deterministic Euler step of the probability-flow ODE (``noise_level = 0``), used for evaluation."""
    compute_dtype = torch.promote_types(sample.dtype, torch.float32)
    dt = _per_sample((sigma_next - sigma).to(device=sample.device, dtype=compute_dtype), sample)
    return sample.to(compute_dtype) + velocity.to(compute_dtype) * dt
