"""trl_guard: online RL (GRPO-Guard, Flow-GRPO, DanceGRPO) for flow-matching text-to-image pipelines.

The math (`sde_step_with_logprob`, `compute_policy_loss`, `compute_advantages`) imports only torch; the config and
trainer, which pull in transformers, TRL and diffusers, are imported on first use, as is `LOSS_TYPES`, read from the
algorithm registry (`trl_guard.algorithms.ALGORITHMS`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .losses import KL_TYPES, compute_advantages, compute_kl, compute_policy_loss
from .sde import NOISE_SCHEDULES, ode_step, sde_step_with_logprob

__version__ = "0.1.0"

_LAZY = {
    "GuardConfig": ".config",
    "GuardGRPODiffusionTrainer": ".trainer",
    "OverOptimizationCallback": ".overoptimization",
}

if TYPE_CHECKING:
    from .config import GuardConfig
    from .overoptimization import OverOptimizationCallback
    from .trainer import GuardGRPODiffusionTrainer


def __getattr__(name: str):
    if name == "LOSS_TYPES":  # on each access: the registry may have grown
        return importlib.import_module(".algorithms", __name__).loss_types()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'trl_guard' has no attribute {name!r}")


__all__ = [
    "LOSS_TYPES",
    "NOISE_SCHEDULES",
    "GuardConfig",
    "GuardGRPODiffusionTrainer",
    "OverOptimizationCallback",
    "compute_advantages",
    "compute_policy_loss",
    "compute_kl",
    "KL_TYPES",
    "ode_step",
    "sde_step_with_logprob",
]
