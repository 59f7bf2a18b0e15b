"""The algorithms' pure loss functions, one module per family, and the group advantages they share.

- `advantages`: group-relative advantages from one or several rewards.
- `sde_ratio`: the clipped importance-ratio losses on recorded SDE steps (Flow-GRPO, GRPO-Guard, the ablations) and
  the KL penalty.
- `forward`: DiffusionNFT, AWM and the lagged copy's decay.

`LOSS_TYPES` (every `GuardConfig.loss_type`) is read from the registry, `trl_guard.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

from typing import Any

from .advantages import MULTI_REWARD_NORMALIZATIONS, SCALE_REWARDS, compute_advantages, compute_multi_reward_advantages
from .forward import (
    AWM_WEIGHTINGS,
    FORWARD_LOSS_TYPES,
    LAGGED_DECAY_SCHEDULES,
    awm_log_likelihood,
    compute_awm_loss,
    compute_awm_regularizer,
    compute_nft_loss,
    lagged_decay,
    nft_optimality,
)
from .sde_ratio import (
    DANCE_WEIGHTINGS,
    KL_TYPES,
    SDE_LOSS_TYPES,
    compute_kl,
    compute_policy_loss,
    policy_log_ratio,
    timestep_weight,
)


def __getattr__(name: str) -> Any:
    # read from the registry on each access (not copied at import): the algorithms import these losses, and a
    # registered algorithm adds its loss types
    if name == "LOSS_TYPES":
        from .. import algorithms

        return algorithms.LOSS_TYPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AWM_WEIGHTINGS",
    "DANCE_WEIGHTINGS",
    "FORWARD_LOSS_TYPES",
    "KL_TYPES",
    "LAGGED_DECAY_SCHEDULES",
    "LOSS_TYPES",
    "MULTI_REWARD_NORMALIZATIONS",
    "SCALE_REWARDS",
    "SDE_LOSS_TYPES",
    "awm_log_likelihood",
    "compute_advantages",
    "compute_awm_loss",
    "compute_awm_regularizer",
    "compute_kl",
    "compute_multi_reward_advantages",
    "compute_nft_loss",
    "compute_policy_loss",
    "lagged_decay",
    "nft_optimality",
    "policy_log_ratio",
    "timestep_weight",
]
