"""Group-relative advantages from one or several rewards, shared by every algorithm family."""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")
#: How several rewards become one advantage: weighted sum then normalisation, or the reverse (GDPO).
MULTI_REWARD_NORMALIZATIONS = ("sum", "decoupled")


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


__all__ = ["MULTI_REWARD_NORMALIZATIONS", "SCALE_REWARDS", "compute_advantages", "compute_multi_reward_advantages"]
