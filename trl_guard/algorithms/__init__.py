"""RL algorithm families behind one seam (`Algorithm`), picked by `GuardConfig.loss_type`.

- `SDERatioAlgorithm` (sde_ratio.py): Flow-GRPO, GRPO-Guard, TempFlow-GRPO reweighting and the paper's ablations.
- `ForwardProcessAlgorithm` (forward.py): DiffusionNFT and Advantage Weighted Matching.

Adding a family is one module with an `Algorithm` subclass, listed in `ALGORITHMS` (docs/method.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Algorithm, RoundPlan
from .forward import ForwardProcessAlgorithm
from .sde_ratio import SDERatioAlgorithm, path_kl_to_reference, policy_mean

if TYPE_CHECKING:
    from ..adapters import PipelineAdapter
    from ..config import GuardConfig

#: Every algorithm family, in the order their loss types are listed.
ALGORITHMS: tuple[type[Algorithm], ...] = (SDERatioAlgorithm, ForwardProcessAlgorithm)


def algorithm_class(loss_type: str) -> type[Algorithm]:
    """The family that implements ``loss_type``, or a ValueError naming the known loss types."""
    for cls in ALGORITHMS:
        if loss_type in cls.loss_types:
            return cls
    known = [name for cls in ALGORITHMS for name in cls.loss_types]
    raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {known}.")


def get_algorithm(args: GuardConfig, adapter: PipelineAdapter) -> Algorithm:
    return algorithm_class(args.loss_type)(args, adapter)


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ForwardProcessAlgorithm",
    "RoundPlan",
    "SDERatioAlgorithm",
    "algorithm_class",
    "get_algorithm",
    "path_kl_to_reference",
    "policy_mean",
]
