"""Forward-process RL: DiffusionNFT and AWM (Advantage Weighted Matching).

Neither algorithm needs the sampler's log-probabilities. Both re-noise a finished sample's clean latent ``x0`` at a
fresh noise level ``t`` (``x_t = (1 - t) x0 + t eps``) and train on the flow-matching regression at that point, so
they work with any sampler (ODE included). Notation: ``v*`` = ``eps - x0`` the target velocity, ``MEAN_d`` the mean
over non-batch dimensions, ``E`` the mean over the batch. Sources: NVlabs/DiffusionNFT (``scripts/train_nft_sd3.py``,
``config/nft.py``) and scxue/advantage_weighted_matching (``scripts/train_sd3_awm.py``, ``config/dgx_awm.py``).
"""

from __future__ import annotations

import torch

from ..metrics import Stat
from ..sde import _mean_per_sample

#: The forward-process losses, which train on re-noised clean samples and which
#: `trl_guard.algorithms.ForwardProcessAlgorithm` implements.
FORWARD_LOSS_TYPES = ("nft", "awm")

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
