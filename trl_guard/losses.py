"""The GRPO policy-loss variants compared in the GRPO-Guard paper, group advantages and the KL penalty.

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

from .metrics import Stat
from .sde import _mean_per_sample, _safe_divide, sde_std, velocity_coefficient

#: The importance-ratio losses on recorded SDE steps (Flow-GRPO, GRPO-Guard and the paper's ablations).
SDE_LOSS_TYPES = ("flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard")
#: The forward-process losses (DiffusionNFT, AWM), which train on re-noised clean samples; defined below.
FORWARD_LOSS_TYPES = ("nft", "awm")
#: Every `GuardConfig.loss_type`.
LOSS_TYPES = SDE_LOSS_TYPES + FORWARD_LOSS_TYPES
KL_TYPES = ("flow_grpo", "exact")
SCALE_REWARDS = ("group", "batch", "none")
#: How several rewards become one advantage: weighted sum then normalisation, or the reverse (GDPO).
MULTI_REWARD_NORMALIZATIONS = ("sum", "decoupled")
# GRPO-Guard's weight under the constant-noise (DanceGRPO) schedule. The paper prints beta_t / (-dt) ("paper"); the
# RatioNorm log-ratio's gradient with respect to the velocity scales with beta_t * (-dt), so 1 / (beta_t * (-dt))
# ("inverse") is what evens it out, and it measured 1.3x max/min spread of per-timestep gradient norms against 5.8x
# for the printed form on a tiny FLUX (docs/dance_grpo_weighting.md). "inverse" is the default.
DANCE_WEIGHTINGS = ("inverse", "paper")

# Clip ranges the papers use: ``log r`` is ~1e-3 wide, the std-normalised log-ratio ~100x narrower.
DEFAULT_EPSILON = {
    "flow_grpo": 1e-4,
    "temp_reweight": 1e-4,
    "mean_revised": 1e-4,
    "ratio_norm": 2e-6,
    "grpo_guard": 2e-6,
    "awm": 1.0,  # AWM's released configs (its ratio is 1 on-policy, so the clip rarely acts)
}


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


def compute_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    scale_rewards: str = "group",
    adv_clip_max: float | None = 5.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages for rewards laid out as consecutive groups of ``num_generations``.

    ``A = (R - mean_group(R)) / (std(R) + eps)``, with the standard deviation taken per group (``"group"``),
    over the whole batch (``"batch"``, as Flow-GRPO's global-std option) or not at all (``"none"``). Standard
    deviations are population ones (``ddof=0``), as in Flow-GRPO. A group of equal rewards gets ``A = 0``.

    Example:
        >>> import torch
        >>> [round(a, 3) for a in compute_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2).tolist()]
        [-1.0, 1.0, 0.0, 0.0]
    """
    if rewards.ndim != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be a 1-D tensor whose length ({rewards.numel()}) is a multiple of num_generations "
            f"({num_generations})."
        )
    grouped = rewards.view(-1, num_generations)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif scale_rewards == "batch":
        advantages = centered / (rewards.std(unbiased=False) + eps)
    elif scale_rewards == "none":
        advantages = centered
    else:
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; expected one of {SCALE_REWARDS}.")
    advantages = advantages.reshape(-1)
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return advantages


def compute_multi_reward_advantages(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    *,
    normalization: str = "sum",
    scale_rewards: str = "group",
    adv_clip_max: float | None = 5.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages from several rewards, ``rewards`` (N, F) with NaN where a reward does not apply, and ``weights`` (F,).

    ``"sum"``: the weighted sum of the rewards present, ``sum_k w_k R_k``, normalised as :func:`compute_advantages`
    does. A reward on a large scale (a judge's 1-10 against a CLIP score's 0.2-0.3) then sets the group's ranking
    alone, whatever the weights. ``"decoupled"`` (GDPO): each reward is centred and scaled within its group first
    (``A_k``, as ``scale_rewards`` says, NaN entries left out and given ``A_k = 0``), then weighted,
    ``A = sum_k w_k A_k``, so each reward moves the advantage in proportion to its weight, whatever its scale. No
    batch re-normalisation follows; ``adv_clip_max`` clips the sum.

    Returns the advantages (N,) and the per-reward ones ``A_k`` (N, F), unweighted and unclipped, in either mode, for
    logging how much each reward drives the result.

    Example:
        >>> import torch
        >>> # reward 0 on a large scale, reward 1 on a small one, ranking the group's two samples the other way round
        >>> rewards = torch.tensor([[10.0, 0.2], [11.0, 0.1]])
        >>> summed, _ = compute_multi_reward_advantages(rewards, torch.ones(2), 2)
        >>> [round(a, 2) for a in summed.tolist()]
        [-1.0, 1.0]
        >>> decoupled, _ = compute_multi_reward_advantages(rewards, torch.tensor([1.0, 2.0]), 2, normalization="decoupled")
        >>> [round(a, 2) for a in decoupled.tolist()]
        [1.0, -1.0]
    """
    if normalization not in MULTI_REWARD_NORMALIZATIONS:
        raise ValueError(
            f"Unknown multi_reward_normalization {normalization!r}; expected one of {MULTI_REWARD_NORMALIZATIONS}."
        )
    if rewards.ndim != 2 or rewards.shape[1] != weights.numel():
        raise ValueError(
            f"rewards must be (N, {weights.numel()}) for {weights.numel()} weights, got {tuple(rewards.shape)}."
        )
    weights = weights.to(rewards.device, rewards.dtype)
    per_reward = torch.stack(
        [_nan_group_advantages(rewards[:, k], num_generations, scale_rewards, eps) for k in range(rewards.shape[1])],
        dim=1,
    )
    if normalization == "sum":
        advantages = compute_advantages(
            (rewards * weights).nansum(dim=1), num_generations, scale_rewards=scale_rewards, adv_clip_max=None, eps=eps
        )
    else:
        advantages = (per_reward * weights).sum(dim=1)
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return advantages, per_reward


def _nan_group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str, eps: float) -> torch.Tensor:
    """`compute_advantages` (unclipped) over the values that are not NaN; NaN entries, and groups with none, get 0."""
    if rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must have a length ({rewards.numel()}) that is a multiple of num_generations ({num_generations})."
        )
    grouped = rewards.view(-1, num_generations)
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    values = torch.where(valid, grouped, torch.zeros_like(grouped))
    centered = torch.where(valid, values - values.sum(dim=1, keepdim=True) / count, torch.zeros_like(grouped))
    if scale_rewards == "group":
        advantages = centered / ((centered**2).sum(dim=1, keepdim=True) / count).sqrt().add(eps)
    elif scale_rewards == "batch":
        present = rewards[~torch.isnan(rewards)]
        advantages = centered / ((present.std(unbiased=False) if present.numel() else 0.0) + eps)
    elif scale_rewards == "none":
        advantages = centered
    else:
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; expected one of {SCALE_REWARDS}.")
    return advantages.reshape(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Forward-process RL: DiffusionNFT and AWM (Advantage Weighted Matching)
#
# Neither algorithm needs the sampler's log-probabilities. Both re-noise a finished sample's clean latent ``x0`` at a
# fresh noise level ``t`` (``x_t = (1 - t) x0 + t eps``) and train on the flow-matching regression at that point, so
# they work with any sampler (ODE included). Notation: ``v*`` = ``eps - x0`` the target velocity, ``MEAN_d`` the mean
# over non-batch dimensions, ``E`` the mean over the batch. Sources: NVlabs/DiffusionNFT (``scripts/train_nft_sd3.py``,
# ``config/nft.py``) and scxue/advantage_weighted_matching (``scripts/train_sd3_awm.py``, ``config/dgx_awm.py``).
# ---------------------------------------------------------------------------------------------------------------------

# AWM's per-sample weightings of the flow-matching error (official names: Uniform, t, t**2, huber, ghuber).
AWM_WEIGHTINGS = ("uniform", "t", "t_squared", "huber", "ghuber")
# Decay schedules of the lagged parameter copy: NFT's "old" policy (decay_type 0, 1, 2) and AWM's "ema" adapter.
LAGGED_DECAY_SCHEDULES = ("none", "nft", "nft_ocr", "awm")

# AWM's Huber-type weightings add this inside the power so that the gradient stays finite at zero error.
_AWM_HUBER_DELTA = 1e-10


def _velocity_sq_distance(velocity: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``MEAN_d (velocity - other)**2`` per sample (B,), in float64; ``other`` is a constant."""
    return _mean_per_sample((velocity.to(torch.float64) - other.detach().to(torch.float64)) ** 2)


def _per_sample(values: torch.Tensor, batch: int, ndim: int, name: str) -> torch.Tensor:
    """``values`` (B elements) as a float64 (B, 1, ..., 1) tensor that broadcasts against a ``ndim``-D sample."""
    if values.numel() != batch:
        raise ValueError(f"{name} must have one value per sample ({batch}), got shape {tuple(values.shape)}.")
    return values.detach().to(torch.float64).reshape(batch, *([1] * (ndim - 1)))


def nft_optimality(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality probability of each sample, from its advantage.

    ``r_hat = clip(clip(A, -M, M) / (2 M) + 1/2, 0, 1)`` with ``M = adv_clip_max``: the advantage clip is mapped
    linearly onto ``[0, 1]`` and ``A = 0`` gives ``1/2``. The official code uses ``M = 5``, so
    ``r_hat = A / 10 + 1/2`` inside the clip (``train_nft_sd3.py``, ``config.train.adv_clip_max = 5``).

    Args:
        advantages: Per-sample advantages (B,); for the official setting, the group-centred reward divided by the
            standard deviation over the whole batch plus 1e-4 (:func:`compute_advantages` with
            ``scale_rewards="batch"``, ``adv_clip_max=None``).
        adv_clip_max: ``M``, the advantage clip; > 0.

    Returns:
        ``r_hat`` (B,) in ``[0, 1]``, the same dtype as ``advantages``.

    Example:
        >>> import torch
        >>> nft_optimality(torch.tensor([-7.0, -5.0, 0.0, 2.5, 5.0])).tolist()
        [0.0, 0.0, 0.5, 0.75, 1.0]
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}.")
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def _nft_x0_loss(x0_prediction: torch.Tensor, clean_latents: torch.Tensor, min_normalizer: float) -> torch.Tensor:
    """The self-normalised x0 loss per sample (B,)."""
    error = x0_prediction - clean_latents
    # The normaliser is a stop-gradient: it rescales each sample's loss to ~|error| without changing its direction.
    with torch.no_grad():
        normalizer = _mean_per_sample(error.abs()).clamp(min=min_normalizer)
    return _mean_per_sample(error**2) / normalizer


def compute_nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    noisy_latents: torch.Tensor,
    clean_latents: torch.Tensor,
    sigma: torch.Tensor,
    optimality: torch.Tensor,
    *,
    nft_beta: float,
    adv_clip_max: float = 5.0,
    ref_velocity: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    min_normalizer: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss at one noise level, averaged over the batch.

    The current velocity ``v`` and the old (lagged) policy's ``v_old`` define an implicit positive and negative
    policy, each scored by the self-normalised error of its x0 prediction:

        v_plus  = beta v + (1 - beta) v_old
        v_minus = (1 + beta) v_old - beta v
        x0_pm   = x_t - t v_pm
        L_pm    = MEAN_d (x0_pm - x0)**2 / sg(max(MEAN_d |x0_pm - x0|, min_normalizer))
        loss    = (M / beta) E[r_hat L_plus + (1 - r_hat) L_minus] + kl_beta E[MEAN_d (v - v_ref)**2]

    with ``sg`` the stop-gradient, ``beta = nft_beta`` and ``M = adv_clip_max``: the official code multiplies the
    policy loss by its advantage clip (``ori_policy_loss * config.train.adv_clip_max``). At ``v = v_old`` the
    gradient is ``(M / B) (2 r_hat_i - 1) dL_i/dv = (1 / B) clip(A_i, -M, M) dL_i/dv``, with ``L_i`` the normalised
    x0 loss of ``v_old``: an advantage-weighted regression, whatever ``beta`` and ``M``. The loss is computed in
    float64, like the official one (its normaliser is a float64 tensor).

    Official settings (``config/nft.py``): ``nft_beta`` (``config.beta``) 1.0, 0.1 for OCR and multi-reward;
    ``kl_beta`` (``config.train.beta``) 1e-4; ``M = 5``.

    Args:
        velocity: The current policy's velocity ``v`` at ``x_t`` (B, ...); carries the gradient.
        old_velocity: The old policy's velocity ``v_old`` at the same ``x_t`` (B, ...); a constant.
        noisy_latents: ``x_t = (1 - t) x0 + t eps`` (B, ...).
        clean_latents: ``x0``, the sampled clean latent (B, ...).
        sigma: ``t`` in (0, 1), one per sample (B elements).
        optimality: ``r_hat`` (B,), from :func:`nft_optimality`.
        nft_beta: ``beta`` > 0, the interpolation strength of the implicit policies.
        adv_clip_max: ``M``, the loss multiplier (the advantage clip of :func:`nft_optimality`).
        ref_velocity: The reference policy's velocity (B, ...), needed when ``kl_beta > 0``.
        kl_beta: Weight of the velocity-space penalty to the reference policy.
        min_normalizer: Floor of the normaliser ``MEAN_d |x0_pm - x0|`` (official: 1e-5).

    Returns:
        ``(loss, stats)``: the float64 scalar loss and detached float64 diagnostics (scalars): ``policy_loss`` (the
        loss without the penalty), ``positive_loss`` and ``negative_loss`` (``E[L_plus]``, ``E[L_minus]``),
        ``x0_error`` (``E[MEAN_d |x_t - t v - x0|]``, the current policy's own x0 error), ``old_deviation``
        (``E[MEAN_d (v - v_old)**2]``), ``optimality`` (``E[r_hat]``) and, with ``ref_velocity``, ``kl``
        (``E[MEAN_d (v - v_ref)**2]``).

    Example:
        >>> import torch
        >>> x0, x_t, v = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 0.5), torch.zeros(2, 3, 4)
        >>> loss, stats = compute_nft_loss(v, v, x_t, x0, torch.full((2,), 0.5), torch.ones(2), nft_beta=1.0)
        >>> float(stats["positive_loss"]), float(loss)  # |x0_hat - x0| = 0.5: L = 0.25 / 0.5; loss = 5 * L / 1
        (0.5, 2.5)
    """
    if nft_beta <= 0:
        raise ValueError(f"nft_beta must be > 0, got {nft_beta}.")
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}.")
    if kl_beta > 0 and ref_velocity is None:
        raise ValueError("kl_beta > 0 needs ref_velocity.")
    batch, ndim = velocity.shape[0], velocity.ndim
    v = velocity.to(torch.float64)
    v_old = old_velocity.detach().to(torch.float64)
    x_t = noisy_latents.detach().to(torch.float64)
    x0 = clean_latents.detach().to(torch.float64)
    t = _per_sample(sigma, batch, ndim, "sigma")
    r = _per_sample(optimality, batch, 1, "optimality")

    v_plus = nft_beta * v + (1 - nft_beta) * v_old
    v_minus = (1 + nft_beta) * v_old - nft_beta * v
    positive = _nft_x0_loss(x_t - t * v_plus, x0, min_normalizer)
    negative = _nft_x0_loss(x_t - t * v_minus, x0, min_normalizer)
    policy_loss = adv_clip_max * ((r * positive + (1 - r) * negative) / nft_beta).mean()
    loss = policy_loss

    kl = _velocity_sq_distance(v, ref_velocity) if ref_velocity is not None else None
    if kl is not None and kl_beta > 0:
        loss = loss + kl_beta * kl.mean()

    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss.detach(),
            "positive_loss": positive.mean(),
            "negative_loss": negative.mean(),
            "x0_error": _mean_per_sample((x_t - t * v - x0).abs()).mean(),
            "old_deviation": _mean_per_sample((v - v_old) ** 2).mean(),
            "optimality": r.mean(),
        }
        if kl is not None:
            stats[Stat.KL] = kl.detach().mean()
    return loss, stats


def awm_log_likelihood(
    velocity: torch.Tensor,
    target_velocity: torch.Tensor,
    sigma: torch.Tensor,
    *,
    weighting: str = "ghuber",
    ghuber_power: float = 0.25,
) -> torch.Tensor:
    """AWM's surrogate log-likelihood of each sample, ``log p_tilde = -w(l, t)``, in float64 (B,).

    ``l = MEAN_d (v - v*)**2`` is the flow-matching error of the velocity ``v`` at ``x_t``, ``t = sigma``,
    ``delta = 1e-10`` and ``p = ghuber_power``:

    ===============  ===============================================
    ``weighting``    ``w(l, t)``
    ===============  ===============================================
    ``uniform``      ``l``
    ``t``            ``t l``
    ``t_squared``    ``t**2 l``
    ``huber``        ``t (sqrt(l + delta) - 1e-5)``
    ``ghuber``       ``(t / p) ((l + delta)**p - delta**p)``
    ===============  ===============================================

    (``compute_log_prob_awm`` of the official ``train_sd3_awm.py``; ``1e-5`` is ``sqrt(delta)``, so both Huber forms
    vanish at ``l = 0``. Its released configs use ``ghuber`` with ``p = 0.25``.) The error is taken in float64, as
    the official code does, so that ratios of nearly equal likelihoods keep their precision.

    Args:
        velocity: The policy's velocity at ``x_t`` (B, ...); carries the gradient.
        target_velocity: ``v* = eps - x0`` (B, ...).
        sigma: ``t`` in (0, 1], one per sample (B elements).
        weighting: One of :data:`AWM_WEIGHTINGS`.
        ghuber_power: ``p`` > 0 of ``ghuber``.

    Returns:
        The float64 surrogate log-likelihoods (B,).

    Example:
        >>> import torch
        >>> v, target, t = torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.tensor([0.5])  # l = 1
        >>> [round(float(awm_log_likelihood(v, target, t, weighting=w)), 4) for w in ("uniform", "t", "ghuber")]
        [-1.0, -0.5, -1.9937]
    """
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; expected one of {AWM_WEIGHTINGS}.")
    if ghuber_power <= 0:
        raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}.")
    error = _mean_per_sample((velocity.to(torch.float64) - target_velocity.detach().to(torch.float64)) ** 2)
    t = _per_sample(sigma, velocity.shape[0], 1, "sigma")
    if weighting == "uniform":
        weighted = error
    elif weighting == "t":
        weighted = t * error
    elif weighting == "t_squared":
        weighted = t**2 * error
    elif weighting == "huber":
        weighted = t * (torch.sqrt(error + _AWM_HUBER_DELTA) - 1e-5)
    else:
        delta_power = _AWM_HUBER_DELTA**ghuber_power
        weighted = t * ((error + _AWM_HUBER_DELTA) ** ghuber_power - delta_power) / ghuber_power
    return -weighted


def compute_awm_loss(
    log_likelihood: torch.Tensor,
    old_log_likelihood: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon: float,
    adv_clip_max: float = 5.0,
    advantage_max: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's clipped policy loss on surrogate log-likelihoods, averaged over the batch.

        A_hat = clip(A, -M, M) / M * advantage_max
        rho   = exp(log p_tilde - sg(log p_tilde_old))
        loss  = E[max(-A_hat rho, -A_hat clip(rho, 1 - epsilon, 1 + epsilon))]

    with ``M = adv_clip_max`` and ``log p_tilde`` from :func:`awm_log_likelihood` at the same ``(x_t, t)`` for both
    policies. The official configs (``config/dgx_awm.py``) use ``M = 5``, ``advantage_max = 1`` and
    ``epsilon = 1`` (clip range ``[0, 2]``), one ratio per sample and noise level (``loss_type = 'exp_first'``;
    ``'sum_first'`` averages the log-likelihoods over noise levels first, which the caller can do before calling).
    At ``rho = 1`` the gradient is ``-E[A_hat grad log p_tilde]``: advantage-weighted flow matching. The released
    configs take one optimizer step per round with the round's own detached log-likelihoods as the old ones, so
    every ratio there is exactly 1.

    Args:
        log_likelihood: The current policy's ``log p_tilde`` (B,); carries the gradient.
        old_log_likelihood: The old policy's ``log p_tilde`` (B,), treated as a constant.
        advantages: Per-sample advantages (B,).
        epsilon: Clip range, > 0.
        adv_clip_max: ``M``, the advantage clip, > 0.
        advantage_max: The clipped advantage's new maximum, > 0.

    Returns:
        ``(loss, stats)``: the scalar loss (float64 for float64 inputs) and detached diagnostics: ``policy_loss``,
        ``log_ratio_mean``, ``ratio_mean``, ``clip_frac`` (fraction with ``|rho - 1| > epsilon``, the official
        ``clipfrac``), ``clip_frac_high`` / ``clip_frac_low`` (``rho > 1 + epsilon`` / ``rho < 1 - epsilon``).

    Example:
        >>> import torch
        >>> log_p = torch.tensor([-0.3, -0.2, -0.1], dtype=torch.float64)
        >>> loss, stats = compute_awm_loss(log_p, log_p, torch.tensor([5.0, 0.0, -2.5]), epsilon=1.0)
        >>> float(stats["ratio_mean"]), float(stats["clip_frac"]), round(float(loss), 4)  # on-policy: E[-A_hat]
        (1.0, 0.0, -0.1667)
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}.")
    if adv_clip_max <= 0 or advantage_max <= 0:
        raise ValueError(f"adv_clip_max and advantage_max must be > 0, got {adv_clip_max} and {advantage_max}.")
    advantages = advantages.detach().to(device=log_likelihood.device, dtype=log_likelihood.dtype)
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max
    log_ratio = log_likelihood - old_log_likelihood.detach().to(log_likelihood.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            Stat.LOG_RATIO_MEAN: log_ratio.mean(),
            "ratio_mean": ratio.mean(),
            "clip_frac": ((ratio - 1).abs() > epsilon).to(ratio.dtype).mean(),
            Stat.CLIP_FRAC_HIGH: (ratio > 1 + epsilon).to(ratio.dtype).mean(),
            Stat.CLIP_FRAC_LOW: (ratio < 1 - epsilon).to(ratio.dtype).mean(),
        }
    return loss, stats


def compute_awm_regularizer(
    velocity: torch.Tensor,
    *,
    ref_velocity: torch.Tensor | None = None,
    ref_weight: float = 0.0,
    lagged_velocity: torch.Tensor | None = None,
    lagged_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's velocity-space penalties to the reference policy and to the lagged copy, in float64.

        penalty = ref_weight E[MEAN_d (v - v_ref)**2] + lagged_weight E[MEAN_d (v - v_lagged)**2]

    The lagged copy (the official ``"ema"`` adapter) is pulled towards the trained weights once per round with the
    decay of :func:`lagged_decay` (schedule ``"awm"``). Official values (``config/dgx_awm.py``, ``kl_weight`` and
    ``kl_ema_weight = 'Uniform'``): ``ref_weight`` (``train.beta``) 1e-4 for PickScore, 1e-3 for GenEval, 3e-3 for
    OCR; ``lagged_weight`` (``train.ema_beta``) 1.

    Args:
        velocity: The current policy's velocity (B, ...); carries the gradient.
        ref_velocity: The reference policy's velocity (B, ...); required when ``ref_weight > 0``.
        ref_weight: Weight of the reference penalty, >= 0.
        lagged_velocity: The lagged copy's velocity (B, ...); required when ``lagged_weight > 0``.
        lagged_weight: Weight of the lagged-copy penalty, >= 0.

    Returns:
        ``(penalty, stats)``: the float64 scalar penalty and detached diagnostics ``ref_distance`` and
        ``lagged_distance`` (``E[MEAN_d (v - other)**2]``) for each velocity given.

    Example:
        >>> import torch
        >>> v, ref, lagged = torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 3), 0.5)
        >>> penalty, stats = compute_awm_regularizer(v, ref_velocity=ref, ref_weight=1e-3, lagged_velocity=lagged,
        ...     lagged_weight=1.0)
        >>> round(float(penalty), 6), float(stats["lagged_distance"])  # 1e-3 * 1 + 1 * 0.25
        (0.251, 0.25)
    """
    penalty = torch.zeros((), dtype=torch.float64, device=velocity.device)
    stats: dict[str, torch.Tensor] = {}
    for name, other, weight in (("ref", ref_velocity, ref_weight), ("lagged", lagged_velocity, lagged_weight)):
        if weight < 0:
            raise ValueError(f"{name}_weight must be >= 0, got {weight}.")
        if other is None:
            if weight > 0:
                raise ValueError(f"{name}_weight > 0 needs {name}_velocity.")
            continue
        distance = _velocity_sq_distance(velocity, other).mean()
        if weight > 0:
            penalty = penalty + weight * distance
        stats[f"{name}_distance"] = distance.detach()
    return penalty, stats


def lagged_decay(step: int, schedule: str) -> float:
    """The decay ``d`` of the lagged parameter copy after ``step`` optimizer steps.

    The copy is updated as ``theta_lag <- d theta_lag + (1 - d) theta``, once per round after the round's optimizer
    steps, with ``step`` the number of optimizer steps taken so far (both official scripts); ``d = 0`` makes the copy
    the policy just trained. NFT's copy is its "old" policy (``v_old`` of :func:`compute_nft_loss`), AWM's the
    lagged copy of :func:`compute_awm_regularizer`. Schedules:

    - ``"none"``: ``d = 0`` (NFT ``return_decay``, ``decay_type=0``).
    - ``"nft"``: ``d = min(0.001 step, 0.5)`` (NFT ``decay_type=1``, the default of ``config/nft.py``).
    - ``"nft_ocr"``: ``d = 0`` below step 75, then ``min(0.0075 (step - 75), 0.999)`` (NFT ``decay_type=2``, its
      ``sd3_ocr`` config).
    - ``"awm"``: ``d = min(0.001 step, 0.3)`` (AWM ``kl_ema_decay_type='linear'`` with ``kl_ema_decay=0.3``, all
      released configs of ``config/dgx_awm.py``).

    Example:
        >>> [lagged_decay(step, "nft") for step in (0, 100, 1000)]
        [0.0, 0.1, 0.5]
        >>> lagged_decay(74, "nft_ocr"), lagged_decay(175, "nft_ocr"), lagged_decay(500, "awm")
        (0.0, 0.75, 0.3)
    """
    if schedule not in LAGGED_DECAY_SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {LAGGED_DECAY_SCHEDULES}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if schedule == "none":
        return 0.0
    if schedule == "nft":
        return min(0.001 * step, 0.5)
    if schedule == "nft_ocr":
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    return min(0.001 * step, 0.3)


__all__ = [
    "DANCE_WEIGHTINGS",
    "DEFAULT_EPSILON",
    "LOSS_TYPES",
    "MULTI_REWARD_NORMALIZATIONS",
    "SCALE_REWARDS",
    "SDE_LOSS_TYPES",
    "compute_advantages",
    "compute_multi_reward_advantages",
    "KL_TYPES",
    "compute_kl",
    "compute_policy_loss",
    "policy_log_ratio",
    "timestep_weight",
    "AWM_WEIGHTINGS",
    "FORWARD_LOSS_TYPES",
    "LAGGED_DECAY_SCHEDULES",
    "awm_log_likelihood",
    "compute_awm_loss",
    "compute_awm_regularizer",
    "compute_nft_loss",
    "lagged_decay",
    "nft_optimality",
]
