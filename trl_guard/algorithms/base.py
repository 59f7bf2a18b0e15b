"""The seam between the trainer and an RL algorithm family.

The trainer runs the same loop for every algorithm: sample a generation round, score it, turn the rewards into
advantages, then train over (micro-batch, unit) pairs with one backward per unit and log. What differs between
families is behind this interface: what a rollout records (an SDE trajectory with its old means, or only the clean
sample), which units a batch trains on (sampling steps, or noise levels drawn for training) and how the loss of one
unit is computed. docs/method.md ("Adding an algorithm") walks through writing one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..adapters import PipelineAdapter, PromptEmbeddings
    from ..config import GuardConfig
    from ..rollout import Rollout, TrainBatch


@dataclass(frozen=True)
class RoundPlan:
    """What one generation round samples and trains, decided before it samples (from the seed and the round index
    alone, so every process and a resumed run decide the same).

    Attributes:
        sigmas: The sampling grid, ``num_inference_steps + 1`` noise levels from 1 to 0.
        train_steps: The units every micro-batch of the round trains on, in order (for the SDE family, sampling steps).
        sde_steps: The sampling steps taken with the SDE and recorded; ``None`` records every step.
        metrics: Scalars to log for the round (for example where an SDE window started).
    """

    sigmas: torch.Tensor
    train_steps: list[int]
    sde_steps: range | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm(ABC):
    """One algorithm family. Subclasses name the `loss_types` they implement and register in `ALGORITHMS`.

    Args:
        args: The run's configuration.
        adapter: The model family's adapter: the algorithm calls only its `sigmas`, `predict_velocity` and
            `reference_policy`, so it works with every family.
    """

    #: The `GuardConfig.loss_type` values this family implements.
    loss_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        self.args = args
        self.adapter = adapter

    def on_round_start(self, round_index: int, global_step: int) -> None:  # noqa: B027 (a hook)
        """Called before round ``round_index`` is sampled, after ``global_step`` optimizer steps (for example to
        update a lagged copy of the weights). The SDE family needs nothing here."""

    @abstractmethod
    def plan(self, round_index: int) -> RoundPlan:
        """Decide what round ``round_index`` samples and trains."""

    @abstractmethod
    def sample(
        self,
        prompt_embeds: PromptEmbeddings,
        negative_embeds: PromptEmbeddings | None,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        plan: RoundPlan,
    ) -> Rollout:
        """Sample one micro-batch from ``latents`` (no gradients), recording what `loss` will need."""

    def bind_parameters(self, parameters: dict[str, torch.nn.Parameter], sharded_module: torch.nn.Module) -> None:  # noqa: B027
        """Follow the trainable parameters under new objects of the same names (FSDP2 replaces them when it shards
        `sharded_module`): an algorithm that keeps copies of the weights rebinds them here. Nothing by default."""

    def before_first_update(self, batches: list[TrainBatch]) -> None:  # noqa: B027
        """Called once per round with all of the round's micro-batches, after scoring and before the first update,
        with the denoiser in training mode. Nothing by default."""

    @abstractmethod
    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of one training unit of ``batch`` (with its graph) and detached scalar diagnostics, which
        the trainer logs per unit (``timestep/{unit:02d}/{name}``) and averaged (``{name}``)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors this algorithm keeps across rounds (for example a lagged copy of the weights), saved in every
        checkpoint so that a resume is exact. Empty for the SDE family."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Restore what `state_dict` returned."""

    def describe(self) -> dict[str, Any]:
        """The settings that define this algorithm's runs, for the run settings a resume compares."""
        return {"loss_type": self.args.loss_type}
