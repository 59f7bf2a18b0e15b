"""RL algorithm families behind one seam (`Algorithm`), picked by `GuardConfig.loss_type`.

- `SDERatioAlgorithm` (sde_ratio.py): Flow-GRPO, GRPO-Guard, TempFlow-GRPO reweighting and the paper's ablations.
- `ForwardProcessAlgorithm` (forward.py): DiffusionNFT and Advantage Weighted Matching.

Adding a family is one module with an `Algorithm` subclass and one entry in `ALGORITHMS` (docs/method.md). Everything
else reads this registry: `GuardConfig` (its loss types, fields, checks and default clip ranges), the trainer, the
rollout buffer reader and the model card.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Algorithm, RoundPlan
from .dgpo import DGPOAlgorithm
from .dpo import DPOAlgorithm
from .flow_dppo import FlowDPPOAlgorithm
from .forward import ForwardProcessAlgorithm, ForwardProcessArguments
from .gardo import GardoAlgorithm, GardoNFTAlgorithm
from .sde_ratio import SDERatioAlgorithm, SDERatioArguments, path_kl_to_reference, policy_mean

if TYPE_CHECKING:
    from ..adapters import PipelineAdapter
    from ..config import GuardConfig

#: Every algorithm family, in the order their loss types are listed. `register_algorithm` adds one at run time.
ALGORITHMS: list[type[Algorithm]] = [
    SDERatioAlgorithm,
    ForwardProcessAlgorithm,
    FlowDPPOAlgorithm,
    DGPOAlgorithm,
    DPOAlgorithm,
    GardoAlgorithm,
    GardoNFTAlgorithm,
]

#: The families' arguments dataclasses, which `GuardConfig` inherits: fixed when `trl_guard.config` is imported.
ALGORITHM_ARGUMENTS: tuple[type, ...] = tuple(
    dict.fromkeys(cls.arguments for cls in ALGORITHMS if cls.arguments is not None)
)


def loss_types() -> tuple[str, ...]:
    """Every `GuardConfig.loss_type` of the registered families, in order."""
    return tuple(name for cls in ALGORITHMS for name in cls.loss_types)


def __getattr__(name: str) -> Any:
    # `LOSS_TYPES` is read from the registry on each access, so that it includes families registered later
    if name == "LOSS_TYPES":
        return loss_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Add a family to `ALGORITHMS` (usable as a class decorator), refusing a loss type another family implements.

    A family listed in `ALGORITHMS` itself needs no call. A family registered after `trl_guard.config` was imported
    is accepted by `GuardConfig` (loss type, checks, defaults, refusals) and the trainer, but `GuardConfig` does not
    gain the fields of its `arguments` (a dataclass's fields are fixed when it is made): subclass `GuardConfig` with
    them, or list the family in `ALGORITHMS`.
    """
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)) or not cls.loss_types:
        raise TypeError(f"{cls!r} must be an Algorithm subclass that names its loss_types.")
    taken = sorted(set(cls.loss_types) & set(loss_types()))
    if taken:
        raise ValueError(f"{cls.__name__} names loss types another registered family implements: {taken}.")
    ALGORITHMS.append(cls)
    return cls


def unregister_algorithm(cls: type[Algorithm]) -> None:
    """Remove a family `register_algorithm` added (tests register a toy family and remove it afterwards)."""
    ALGORITHMS.remove(cls)


def method_name(loss_type: str) -> str:
    """The method ``loss_type`` runs, as people name it (the family's `method_names`), or ``loss_type`` itself."""
    return algorithm_class(loss_type).method_names.get(loss_type, loss_type)


def algorithm_class(loss_type: str) -> type[Algorithm]:
    """The family that implements ``loss_type``, or a ValueError naming the known loss types."""
    for cls in ALGORITHMS:
        if loss_type in cls.loss_types:
            return cls
    raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {list(loss_types())}.")


def get_algorithm(args: GuardConfig, adapter: PipelineAdapter) -> Algorithm:
    return algorithm_class(args.loss_type)(args, adapter)


__all__ = [
    "ALGORITHMS",
    "ALGORITHM_ARGUMENTS",
    "Algorithm",
    "ForwardProcessAlgorithm",
    "ForwardProcessArguments",
    "LOSS_TYPES",
    "RoundPlan",
    "SDERatioAlgorithm",
    "SDERatioArguments",
    "algorithm_class",
    "get_algorithm",
    "loss_types",
    "method_name",
    "path_kl_to_reference",
    "policy_mean",
    "register_algorithm",
    "unregister_algorithm",
]
