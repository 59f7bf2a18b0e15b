"""The SDE-ratio losses: the GRPO policy-loss variants compared in the GRPO-Guard paper and the KL penalty.

With ``old_mean`` the mean of the policy that sampled ``x_next``, ``mean`` the current policy's mean,
``d = old_mean - mean`` and ``eps = (x_next - old_mean) / std`` (the noise that was drawn):

    log r = log p_new(x_next) - log p_old(x_next) = -MEAN(d**2) / (2 std**2) - MEAN(d * eps) / std

Its expectation ``-MEAN(d**2) / (2 std**2)`` is negative: the ratio is shifted below 1 by an amount that depends
on the timestep through ``std``. That is why PPO clipping fails for flow models. The variants (paper Table 2):

=================  ================================================  =====================================
``loss_type``      log-ratio used                                    weight per step
=================  ================================================  =====================================
``flow_grpo``      ``log r``                                         1
``temp_reweight``  ``log r``                                         ``std``
``mean_revised``   ``log r + MEAN(d**2) / (2 std**2)``               1
``ratio_norm``     ``std * (log r + MEAN(d**2)/(2 std**2))``         1
                   ``= -MEAN(d * eps)``
``grpo_guard``     as ``ratio_norm``                                 ``1/(-dt)`` (flow_grpo schedule),
                                                                     ``1/(beta_t (-dt))`` (dance_grpo; the
                                                                     paper prints ``beta_t/(-dt)``),
                                                                     ``1/|d mean/d v|`` (cps)
=================  ================================================  =====================================

Under CPS with its official log-probability ``-MEAN((x_next - mean)**2)`` (no variance), the log-ratios of
``flow_grpo`` and ``mean_revised`` are the Gaussian ones times ``2 std**2``; RatioNorm is ``-MEAN(d * eps)`` either
way. A step without noise (CPS's last) has log-ratio 0 and no gradient.

The per-sample loss is ``weight * max(-A r, -A clip(r, 1 - epsilon, 1 + epsilon))`` with ``r = exp(log-ratio)``.
Log-ratios are per-element MEANs, so clip ranges are tiny: see :mod:`trl_guard.sde`.
"""

from __future__ import annotations

import torch

from ..metrics import Stat
from ..sde import _mean_per_sample, _safe_divide, sde_std, velocity_coefficient

#: The importance-ratio losses on recorded SDE steps (Flow-GRPO, GRPO-Guard and the paper's ablations), which
#: `trl_guard.algorithms.SDERatioAlgorithm` implements.
SDE_LOSS_TYPES = ("flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard")
KL_TYPES = ("flow_grpo", "exact")
# GRPO-Guard's weight under the constant-noise (DanceGRPO) schedule. The paper prints beta_t / (-dt) ("paper"); the
# RatioNorm log-ratio's gradient with respect to the velocity scales with beta_t * (-dt), so 1 / (beta_t * (-dt))
# ("inverse") is what evens it out, and it measured 1.3x max/min spread of per-timestep gradient norms against 5.8x
# for the printed form on a tiny FLUX (docs/dance_grpo_weighting.md). "inverse" is the default.
DANCE_WEIGHTINGS = ("inverse", "paper")


def policy_log_ratio(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    prev_sample: torch.Tensor,
    std: torch.Tensor,
    *,
    loss_type: str,
    noise_schedule: str = "flow_grpo",
    cps_log_prob: str = "official",
) -> torch.Tensor:
    """The per-sample log-ratio (B,) that ``loss_type`` clips, written so that cancellation cannot lose precision.

    ``(x - mean)**2 - (x - old_mean)**2`` is factored as ``(old_mean - mean) * (2x - mean - old_mean)``, so
    ``mean == old_mean`` gives exactly 0 (ratio exactly 1) and tiny ``d`` keeps full relative precision.
    """
    diff = mean - old_mean  # = -d
    # The log-density's scale: 1 / (2 std**2) for a Gaussian, 1 for CPS's official variance-free form.
    official_cps = noise_schedule == "cps" and cps_log_prob == "official"
    scale = torch.ones_like(std) if official_cps else _safe_divide(torch.ones_like(std), 2 * std**2)
    if loss_type in ("flow_grpo", "temp_reweight"):
        return _mean_per_sample(scale * diff * (2 * prev_sample - mean - old_mean))
    if loss_type == "mean_revised":
        return _mean_per_sample(scale * 2 * diff * (prev_sample - old_mean))
    if loss_type in ("ratio_norm", "grpo_guard"):
        return _mean_per_sample(_safe_divide(diff * (prev_sample - old_mean), std))
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {SDE_LOSS_TYPES}.")


def timestep_weight(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    loss_type: str,
    noise_level: float,
    noise_schedule: str = "flow_grpo",
    dance_weighting: str = "inverse",
) -> torch.Tensor:
    """The per-step loss weight (B,) of ``loss_type`` (Table 2 of the GRPO-Guard paper).

    ``dance_weighting`` picks GRPO-Guard's weight under the ``"dance_grpo"`` schedule: ``"inverse"`` (default) is
    ``1 / (beta_t * (-dt))``, ``"paper"`` is ``beta_t / (-dt)`` as printed in the paper. Under ``"cps"`` and ``"linear"``
    (where, unlike ``"flow_grpo"``, the velocity's coefficient in the mean is not ``-dt`` times a constant) the weight is
    ``1 / |d mean / d v|`` (see :func:`trl_guard.sde.velocity_coefficient`), the same rule that gives ``1 / (-dt)`` for
    an Euler step.
    """
    if loss_type in ("flow_grpo", "mean_revised", "ratio_norm"):
        return torch.ones_like(sigma)
    neg_dt = sigma - sigma_next
    if loss_type == "temp_reweight":
        return sde_std(sigma, sigma_next, noise_level=noise_level, noise_schedule=noise_schedule)
    if loss_type == "grpo_guard":
        if noise_schedule == "flow_grpo":
            return 1 / neg_dt
        if noise_schedule in ("cps", "linear"):
            coefficient = velocity_coefficient(
                sigma, sigma_next, noise_level=noise_level, noise_schedule=noise_schedule
            )
            return -1 / coefficient
        if noise_schedule == "dance_grpo":
            beta_t = 1 + noise_level**2 * (1 - sigma) / (2 * sigma)
            if dance_weighting == "paper":
                return beta_t / neg_dt
            if dance_weighting == "inverse":
                return 1 / (beta_t * neg_dt)
            raise ValueError(f"Unknown dance_weighting {dance_weighting!r}; expected one of {DANCE_WEIGHTINGS}.")
        raise ValueError(f"Unknown noise_schedule {noise_schedule!r}.")
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {SDE_LOSS_TYPES}.")


def compute_policy_loss(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    prev_sample: torch.Tensor,
    std: torch.Tensor,
    advantages: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    loss_type: str,
    epsilon: float,
    noise_level: float,
    noise_schedule: str = "flow_grpo",
    dance_weighting: str = "inverse",
    cps_log_prob: str = "official",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss of one sampling step, averaged over the batch.

    Args:
        mean: Current policy's mean of ``prev_sample`` (B, ...); carries the gradient.
        old_mean: Mean under the policy that sampled ``prev_sample`` (B, ...), recorded at rollout.
        prev_sample: The recorded next latents ``x_next`` (B, ...).
        std: The noise std applied at this step, broadcastable to the sample.
        advantages: Per-sample advantages (B,).
        sigma: Noise level before the step (B,).
        sigma_next: Noise level after the step (B,).
        loss_type: One of ``"flow_grpo"``, ``"temp_reweight"``, ``"mean_revised"``, ``"ratio_norm"``,
            ``"grpo_guard"``.
        epsilon: Clip range; ``r`` is clipped to ``[1 - epsilon, 1 + epsilon]``. Log-ratios are per-element
            means, so use ~1e-4 for ``flow_grpo`` and ~2e-6 for ``grpo_guard``.
        noise_level: SDE noise multiplier used at sampling (for the per-step weights).
        noise_schedule: ``"flow_grpo"``, ``"dance_grpo"``, ``"linear"`` or ``"cps"``.
        dance_weighting: ``"inverse"`` or ``"paper"``; see :func:`timestep_weight`.
        cps_log_prob: ``"official"`` or ``"gaussian"``, the log-density used under ``"cps"``; see
            :func:`trl_guard.sde.sde_step_with_logprob`.

    Returns:
        ``(loss, stats)``: the scalar loss and detached diagnostics (each a scalar tensor): ``log_ratio_mean``
        and ``log_ratio_std`` of the log-ratio used, ``raw_log_ratio_mean`` (plain ``log r``, whatever the
        variant), ``clip_frac_high`` / ``clip_frac_low`` (fraction of samples with ``r > 1 + epsilon`` /
        ``r < 1 - epsilon``) and ``weight``.

    Example:
        >>> import torch
        >>> x_next, mean, std = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.full((4, 1, 1, 1), 0.3)
        >>> sigma, sigma_next = torch.full((4,), 0.8), torch.full((4,), 0.7)
        >>> loss, stats = compute_policy_loss(mean, mean, x_next, std, torch.tensor([1.0, -1.0, 0.5, -0.5]),
        ...     sigma, sigma_next, loss_type="grpo_guard", epsilon=2e-6, noise_level=0.7)
        >>> float(stats["log_ratio_mean"]), float(stats["clip_frac_high"])  # same policy: ratio exactly 1
        (0.0, 0.0)
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}.")
    advantages = advantages.to(device=mean.device, dtype=mean.dtype)
    sigma = sigma.to(device=mean.device, dtype=mean.dtype)
    sigma_next = sigma_next.to(device=mean.device, dtype=mean.dtype)
    std = std.to(mean.dtype)

    forms = dict(noise_schedule=noise_schedule, cps_log_prob=cps_log_prob)
    log_ratio = policy_log_ratio(mean, old_mean, prev_sample, std, loss_type=loss_type, **forms)
    weight = timestep_weight(
        sigma,
        sigma_next,
        loss_type=loss_type,
        noise_level=noise_level,
        noise_schedule=noise_schedule,
        dance_weighting=dance_weighting,
    )
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = (weight * torch.maximum(unclipped, clipped)).mean()

    with torch.no_grad():
        if loss_type in ("flow_grpo", "temp_reweight"):
            raw = log_ratio
        else:
            raw = policy_log_ratio(mean, old_mean, prev_sample, std, loss_type="flow_grpo", **forms)
        stats = {
            Stat.LOG_RATIO_MEAN: log_ratio.mean(),
            Stat.LOG_RATIO_STD: log_ratio.std(unbiased=False),
            Stat.RAW_LOG_RATIO_MEAN: raw.mean(),
            Stat.CLIP_FRAC_HIGH: (ratio > 1 + epsilon).float().mean(),
            Stat.CLIP_FRAC_LOW: (ratio < 1 - epsilon).float().mean(),
            Stat.WEIGHT: weight.mean(),
        }
    return loss, stats


def compute_kl(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    kl_type: str = "flow_grpo",
    noise_schedule: str = "flow_grpo",
    reduction: str = "mean",
) -> torch.Tensor:
    """KL penalty of one sampling step to the reference policy, a scalar: MEAN over elements, then over the batch.

    Both policies share the step's noise ``std``, so the exact KL between the two Gaussians is
    ``MEAN((mean - ref_mean)**2) / (2 std**2)`` (``kl_type="exact"``). Flow-GRPO divides by the squared diffusion
    coefficient ``s**2`` instead (``std = s * sqrt(-dt)``), which is the exact KL times ``(-dt)``; that is
    ``kl_type="flow_grpo"``, the default, so that β values from its configs mean the same here. Under ``"cps"``,
    which has no diffusion coefficient, Flow-GRPO divides by ``std**2``: the two types agree. A noiseless step
    (CPS's last) contributes 0.

    Args:
        mean: Current policy's mean (B, ...), carrying the gradient.
        ref_mean: Reference policy's mean (B, ...).
        std: The step's noise std, broadcastable to the sample.
        sigma: Noise level before the step (B,).
        sigma_next: Noise level after the step (B,).
        kl_type: ``"flow_grpo"`` or ``"exact"``.
        noise_schedule: ``"flow_grpo"``, ``"dance_grpo"``, ``"linear"`` or ``"cps"``.
        reduction: ``"mean"`` over the batch (a scalar) or ``"none"`` (one value per sample, (B,)).

    Example:
        >>> import torch
        >>> mean, ref_mean, std = torch.full((1, 4), 0.3), torch.zeros(1, 4), torch.full((1, 1), 0.5)
        >>> sigma, sigma_next = torch.tensor([0.6]), torch.tensor([0.5])
        >>> round(float(compute_kl(mean, ref_mean, std, sigma, sigma_next, kl_type="exact")), 4)
        0.18
        >>> round(float(compute_kl(mean, ref_mean, std, sigma, sigma_next)), 4)  # times -dt = 0.1
        0.018
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"Unknown kl_type {kl_type!r}; expected one of {KL_TYPES}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"Unknown reduction {reduction!r}; expected 'mean' or 'none'.")
    kl = _mean_per_sample(_safe_divide((mean - ref_mean) ** 2, 2 * std**2))
    if kl_type == "flow_grpo" and noise_schedule != "cps":
        kl = kl * (sigma - sigma_next).to(device=kl.device, dtype=kl.dtype)
    return kl.mean() if reduction == "mean" else kl


__all__ = [
    "DANCE_WEIGHTINGS",
    "KL_TYPES",
    "SDE_LOSS_TYPES",
    "compute_kl",
    "compute_policy_loss",
    "policy_log_ratio",
    "timestep_weight",
]
