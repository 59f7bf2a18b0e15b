"""The seam between the trainer and an RL algorithm family.

The trainer runs the same loop for every algorithm: sample a generation round, score it, turn the rewards into
advantages, then train over (micro-batch, unit) pairs with one backward per unit and log. What differs between
families is behind this interface: what a rollout records (an SDE trajectory with its old means, or only the clean
sample), which units a batch trains on (sampling steps, or noise levels drawn for training) and how the loss of one
unit is computed. docs/method.md ("Adding an algorithm") walks through writing one.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..losses.advantages import compute_multi_reward_advantages

if TYPE_CHECKING:
    from ..adapters import PipelineAdapter, PromptEmbeddings
    from ..config import GuardConfig
    from ..rollout import CleanRollout, Rollout, TrainBatch

#: The model card's settings every run shows (after `loss_type` and before or after the family's own).
COMMON_CARD_FIELDS = (
    "epsilon",
    "beta",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "num_generations",
    "learning_rate",
    "max_steps",
    "height",
    "width",
    "timestep_fraction",
    "scale_rewards",
)


def field_names(arguments: type | None) -> tuple[str, ...]:
    """The field names of an arguments dataclass, in order (none for ``None``)."""
    return tuple(f.name for f in dataclasses.fields(arguments)) if arguments is not None else ()


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

    What the rest of the library needs to know about a family before any model exists is declared here, as class
    attributes and classmethods, so that `GuardConfig` (validation, defaults), the trainer (reference copy, training
    signal, buffer reading) and the model card read it from the registered class instead of from lists of names.

    Args:
        args: The run's configuration.
        adapter: The model family's adapter: the algorithm calls only its `sigmas`, `predict_velocity` and
            `reference_policy`, so it works with every family.
    """

    #: The `GuardConfig.loss_type` values this family implements.
    loss_types: ClassVar[tuple[str, ...]] = ()
    #: How `GuardConfig`'s messages name the family, after ``loss_type=...``.
    description: ClassVar[str] = ""
    #: The method each loss type runs, as people name it (``"flow_grpo"``: ``"Flow-GRPO"``), for scripts' output.
    method_names: ClassVar[dict[str, str]] = {}
    #: The dataclass of the family's own `GuardConfig` fields (documented in its docstring, TRL style), which
    #: `GuardConfig` inherits; ``None`` for a family without fields of its own.
    arguments: ClassVar[type | None] = None
    #: The `GuardConfig` fields only this family reads: any other loss type refuses them when they are set away from
    #: their defaults. Usually the fields of `arguments`.
    config_fields: ClassVar[tuple[str, ...]] = ()
    #: What a rollout of this family is (`Rollout` or `CleanRollout`): a checkpoint's rollout buffer is read as it.
    rollout_type: ClassVar[type[Rollout] | type[CleanRollout]]
    #: Whether every prompt group must sit whole in one training micro-batch on one process (an algorithm that
    #: compares the samples of a group within the loss): `GuardConfig` then refuses settings that could split one.
    needs_whole_groups: ClassVar[bool] = False
    #: The run settings the model card lists, in order.
    card_fields: ClassVar[tuple[str, ...]] = ("loss_type", *COMMON_CARD_FIELDS)
    #: BibTeX entries of the family's papers, cited by the model card.
    citation: ClassVar[str] = ""

    @classmethod
    def fields_read(cls, loss_type: str) -> tuple[str, ...]:
        """The fields of `config_fields` that ``loss_type`` reads (all of them unless a family says otherwise)."""
        return cls.config_fields

    @classmethod
    def unread_settings(cls, args: GuardConfig) -> list[str]:
        """Settings of shared fields that ``args.loss_type`` does not read (as ``"name=value"``), refused in the same
        message as other families' fields (for example an `epsilon` given to a loss without a ratio). None by default.
        """
        return []

    @classmethod  # noqa: B027 (a hook)
    def validate(cls, args: GuardConfig) -> None:
        """The family's own checks of ``args`` (ranges, options that only make sense together), raising a ValueError
        that names the field and the fix. Called by `GuardConfig.__post_init__`, before any model is loaded, after the
        other families' fields were refused and the shared fields checked. Nothing by default."""

    @classmethod
    def default_epsilon(cls, loss_type: str) -> float | None:
        """The clip range `GuardConfig.epsilon` takes when unset (``None``: the loss has no ratio to clip)."""
        return None

    @classmethod
    def needs_reference(cls, args: GuardConfig) -> bool:
        """Whether training reads the frozen reference policy (by default when ``beta > 0`` weighs a penalty to it).
        For full fine-tuning the trainer then keeps a frozen copy of the starting weights (with LoRA the reference is
        the model with the adapter disabled, which costs nothing)."""
        return args.beta > 0

    @classmethod  # noqa: B027 (a hook)
    def check_setup(cls, args: GuardConfig, reward_names: Sequence[str]) -> None:
        """The family's checks of what only the trainer knows, run before the pipeline loads: ``reward_names`` are the
        reward functions' log names, in order (for example a field that names some of them). Nothing by default."""

    @classmethod
    def signal_inputs(cls, args: GuardConfig) -> tuple[str, ...]:
        """The extra inputs `training_signal` takes by keyword, none by default: ``"reward_names"`` (the reward
        functions' log names, in the order of the rewards' columns) and ``"image_features"`` (per-sample features
        (N, D) of the round's decoded samples from `image_features`, computed where the rewards are scored and
        gathered from every process like them, in global order)."""
        return ()

    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """Feature vectors (B, D) of one sampled micro-batch's decoded images (PIL images, or lists of frames for a
        video family); called only when `signal_inputs` names ``"image_features"``."""
        raise NotImplementedError(f"{type(self).__name__} reads no image features.")

    @classmethod
    def training_signal(
        cls, rewards: torch.Tensor, weights: torch.Tensor, args: GuardConfig
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """How a generation round's rewards become what training reads, on every process alike.

        The trainer calls it on the algorithm object, once per round, with the keyword inputs `signal_inputs` names:
        a family whose signal keeps state across rounds may override it as a method (its state then belongs in
        `state_dict`).

        Args:
            rewards: The round's gathered rewards (N, F) in global order, consecutive groups of `num_generations`,
                NaN where a reward function does not apply.
            weights: The reward functions' weights (F,).
            args: The run's configuration.

        Returns:
            ``(advantages, reward_advantages)``: the per-sample training signal (N,) that `TrainBatch.advantages`
            carries, and each reward's own normalised advantage (N, F), logged with several rewards. By default the
            group-relative advantages of `compute_multi_reward_advantages`. A third element, a dict of per-sample
            tensors (N, ...), may follow: each `TrainBatch` carries its samples' rows in `extras` (and the rollout
            buffer keeps them, so a mid-round resume reads them back).
        """
        return compute_multi_reward_advantages(
            rewards,
            weights,
            args.num_generations,
            normalization=args.multi_reward_normalization,
            scale_rewards=args.scale_rewards,
            adv_clip_max=args.adv_clip_max,
        )

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        self.args = args
        self.adapter = adapter

    def on_round_start(self, round_index: int, global_step: int) -> None:  # noqa: B027 (a hook)
        """Called before round ``round_index`` is sampled, after ``global_step`` optimizer steps (for example to
        update a lagged copy of the weights). The SDE family needs nothing here."""

    def on_optimizer_step(self, global_step: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:  # noqa: B027
        """Called on every process after optimizer step ``global_step`` (before that step's checkpoint), for example to
        act on what the step's units measured. ``reduce`` averages a tensor over the processes (a collective: call it
        on every process or on none). Nothing by default."""

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
