"""One stochastic sampling step of a flow-matching model, with the log-probability of its outcome.

Convention (diffusers): ``sigmas`` run from 1 (pure noise) to 0 (data); one step goes from ``sigma`` to
``sigma_next`` with ``dt = sigma_next - sigma < 0``. The reverse-time SDE that shares the marginals of the
probability-flow ODE ``dx = v dt`` is discretised with Euler-Maruyama:

    s      = noise_level * sqrt(sigma / (1 - sigma'))   # "flow_grpo"; sigma' = sigma_next where sigma == 1
    s      = noise_level                                # "dance_grpo"
    s      = noise_level * sigma                        # "linear" (Flow-GRPO's Wan2.1 script)
    mean   = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std    = s * sqrt(-dt)
    x_next = mean + std * eps

``log_prob`` is the Gaussian log-density of ``x_next`` averaged (MEAN, not sum) over every non-batch element, as
Flow-GRPO, DanceGRPO and GRPO-Guard do. This keeps importance ratios within ~1e-3 of 1, which is why clip ranges
for these methods are tiny (1e-4 for Flow-GRPO, 2e-6 for GRPO-Guard).

``"cps"`` is Coefficients-Preserving Sampling (arXiv 2509.05952), Flow-GRPO's ``sde_type="cps"``. It predicts the
clean image ``x0_hat = x - sigma * v`` and the noise ``x1_hat = x + (1 - sigma) * v`` and re-mixes them at
``sigma_next`` so that the noise it adds keeps the total noise coefficient exactly ``sigma_next``:

    std    = sigma_next * sin(noise_level * pi / 2)
    mean   = x0_hat * (1 - sigma_next) + x1_hat * sqrt(sigma_next**2 - std**2)

Its last step (``sigma_next = 0``) adds no noise. Its log-probability, by default, is Flow-GRPO's: ``-MEAN((x_next -
mean)**2)``, every constant and the variance dropped (``cps_log_prob="official"``; the clip ranges of its configs,
1e-5, assume this form). ``cps_log_prob="gaussian"`` keeps the normalised Gaussian density instead. Where ``std`` is
0 the Gaussian density is undefined; it is reported as 0 there, so nothing is ever inf or NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

NOISE_SCHEDULES = ("flow_grpo", "dance_grpo", "linear", "cps")
CPS_LOG_PROBS = ("official", "gaussian")

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SDEStepOutput(NamedTuple):
    """What one SDE step returns; unpacks as ``prev_sample, log_prob, mean, std``."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


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
    ``"linear"`` is Flow-GRPO's Wan2.1 schedule, ``sigma_min + (sigma_max - sigma_min) * sigma`` with ``sigma_min`` the
    grid's last sigma (0) and ``sigma_max`` its second (``sigmas[1]``): ``noise_level`` plays ``sigma_max``. CPS is not
    an Euler-Maruyama step and has no diffusion coefficient; its ``s`` is what Flow-GRPO's CPS step returns in that
    place (and its KL divides by): the noise std itself.
    """
    if noise_schedule == "flow_grpo":
        denominator_sigma = torch.where(sigma == 1, sigma_next, sigma)
        return noise_level * torch.sqrt(sigma / (1 - denominator_sigma))
    if noise_schedule == "dance_grpo":
        return torch.full_like(sigma, float(noise_level))
    if noise_schedule == "linear":
        return noise_level * sigma
    if noise_schedule == "cps":
        return sde_std(sigma, sigma_next, noise_level=noise_level, noise_schedule="cps")
    raise ValueError(f"Unknown noise_schedule {noise_schedule!r}; expected one of {NOISE_SCHEDULES}.")


def sde_std(
    sigma: torch.Tensor, sigma_next: torch.Tensor, *, noise_level: float, noise_schedule: str = "flow_grpo"
) -> torch.Tensor:
    """The standard deviation of the noise one step adds (shape of ``sigma``); 0 only at CPS's last step."""
    if noise_schedule == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)
    s = sde_noise_scale(sigma, sigma_next, noise_level=noise_level, noise_schedule=noise_schedule)
    return s * torch.sqrt(sigma - sigma_next)


def velocity_coefficient(
    sigma: torch.Tensor, sigma_next: torch.Tensor, *, noise_level: float, noise_schedule: str = "flow_grpo"
) -> torch.Tensor:
    """``d mean / d v``: how strongly the step's mean moves with the velocity (negative; ``dt`` for the ODE).

    The RatioNorm log-ratio's gradient with respect to ``v`` scales with it, which is what GRPO-Guard's per-step
    weight evens out. Euler-Maruyama: ``(1 + s**2 (1 - sigma) / (2 sigma)) * dt``. CPS: ``(1 - sigma) *
    sqrt(sigma_next**2 - std**2) - sigma * (1 - sigma_next)``, which is ``dt`` when ``noise_level = 0``.
    """
    if noise_schedule == "cps":
        std = sde_std(sigma, sigma_next, noise_level=noise_level, noise_schedule="cps")
        return (1 - sigma) * torch.sqrt(sigma_next**2 - std**2) - sigma * (1 - sigma_next)
    s = sde_noise_scale(sigma, sigma_next, noise_level=noise_level, noise_schedule=noise_schedule)
    return (1 + s**2 * (1 - sigma) / (2 * sigma)) * (sigma_next - sigma)


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 (with a zero gradient) where the denominator is 0 (a noiseless step)."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0.0)


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
    cps_log_prob: str = "official",
) -> SDEStepOutput:
    """Take one SDE step from ``sigma`` to ``sigma_next`` and score its outcome.

    Args:
        velocity: The model's velocity prediction ``v``, shape (B, ...).
        sample: The current latents ``x`` at ``sigma``, shape (B, ...).
        sigma: Current noise level per sample, shape (B,).
        sigma_next: Noise level after the step per sample, shape (B,); ``sigma_next < sigma``.
        noise_level: The SDE noise multiplier (0.7 in Flow-GRPO and GRPO-Guard).
        noise_schedule: ``"flow_grpo"`` (``s`` grows with ``sigma``), ``"dance_grpo"`` (constant ``s``),
            ``"linear"`` (``s = noise_level * sigma``, Flow-GRPO's Wan2.1 step) or ``"cps"`` (Coefficients-Preserving
            Sampling).
        prev_sample: When given, the step is not sampled: the log-probability of this ``x_next`` is returned
            (used in training to re-score a recorded trajectory). Named as in diffusers' schedulers.
        generator: Generator, or one generator per sample, for the step's noise.
        cps_log_prob: Under ``"cps"``: ``"official"`` (``-MEAN((x_next - mean)**2)``, Flow-GRPO's) or
            ``"gaussian"`` (the normalised density).

    Returns:
        An :class:`SDEStepOutput` ``(prev_sample, log_prob, mean, std)``, unpackable as four values: the next
        latents (B, ...), their log-probability (B,) as the per-element MEAN of the log-density, the Gaussian's
        mean (B, ...) and its standard deviation broadcastable to the sample (B, 1, ..., 1). ``log_prob`` is
        differentiable with respect to ``velocity`` (and ``sample``) through the mean; ``prev_sample`` is treated
        as data, also when it was just drawn, so the sampling call's ``log_prob`` carries the policy gradient. The
        math runs in float32 or wider: bf16 overflows here.

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

    if noise_schedule == "cps":
        std = sde_std(sigma, sigma_next, noise_level=noise_level, noise_schedule="cps")
        predicted_clean = sample - sigma * velocity
        predicted_noise = sample + (1 - sigma) * velocity
        mean = predicted_clean * (1 - sigma_next) + predicted_noise * torch.sqrt(sigma_next**2 - std**2)
    else:
        dt = sigma_next - sigma
        s = sde_noise_scale(sigma, sigma_next, noise_level=noise_level, noise_schedule=noise_schedule)
        mean = sample + (velocity + s**2 / (2 * sigma) * (sample + (1 - sigma) * velocity)) * dt
        std = s * torch.sqrt(-dt)

    if prev_sample is None:
        prev_sample = mean + std * _standard_normal(mean, generator)
    # Scored as data: differentiating through a sample that was just drawn from the mean would cancel the gradient.
    prev_sample = prev_sample.detach().to(compute_dtype)

    squared_error = (prev_sample - mean) ** 2
    if noise_schedule == "cps" and cps_log_prob == "official":
        log_density = -squared_error
    elif noise_schedule != "cps" or cps_log_prob == "gaussian":
        log_density = torch.where(
            std > 0, -_safe_divide(squared_error, 2 * std**2) - torch.log(std.clamp_min(1e-30)) - _LOG_SQRT_2PI, 0.0
        )
    else:
        raise ValueError(f"Unknown cps_log_prob {cps_log_prob!r}; expected one of {CPS_LOG_PROBS}.")
    return SDEStepOutput(prev_sample, _mean_per_sample(log_density), mean, std)


def ode_step(
    velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One deterministic Euler step of the probability-flow ODE (``noise_level = 0``), used for evaluation."""
    compute_dtype = torch.promote_types(sample.dtype, torch.float32)
    dt = _per_sample((sigma_next - sigma).to(device=sample.device, dtype=compute_dtype), sample)
    return sample.to(compute_dtype) + velocity.to(compute_dtype) * dt
