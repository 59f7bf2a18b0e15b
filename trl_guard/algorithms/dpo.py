"""Online Diffusion-DPO (`loss_type="dpo"`): Diffusion-DPO on pairs formed within each prompt group of a round.

Wallace et al.'s Diffusion-DPO (arXiv 2311.12908) in its online form as yifan123/flow_grpo runs it
(``scripts/train_sd3_dpo.py``, ``config/dpo.py``, ``flow_grpo/stat_tracking.py`` type ``'dpo'``, at commit ac4c86e):

- a round is sampled with the *reference* policy, with Flow-GRPO's SDE (``noise_level``, CFG ``guidance_scale``), and
  only each sample's clean final latent is kept;
- in each prompt group the sample of highest reward is *chosen* and the one of lowest reward *rejected*: one pair per
  group, the other samples are not trained on (`dpo_pairs`);
- each pair is noised again at ``int(num_inference_steps * timestep_fraction)`` training units, each with its own noise
  level (logit-normal over the family's 1000-level training schedule) and noise, both shared by the two samples of the
  pair; the loss compares the flow-matching errors of the policy and of the reference on the two
  (`compute_dpo_loss`);
- the reference is the frozen base model (the adapter disabled) unless `dpo_ref_update_steps` makes it a copy of the
  trained weights refreshed every that many optimizer steps (the official "OnlineDPO" mode). The reference samples the
  rounds, so with the frozen base the rollouts (and the logged rollout reward) do not change as the policy trains:
  evaluation shows its progress.

The pair needs both of its samples in one micro-batch, so a group must sit whole in one micro-batch on one process
(`needs_whole_groups`). docs/fidelity.md lists where this differs from the official code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..adapters import PipelineAdapter, PromptEmbeddings
from ..losses.advantages import compute_multi_reward_advantages
from ..rollout import CleanRollout, TrainBatch, sample_sde
from ..schedule import SDESchedule
from ..seeding import Stream, keyed_generator
from .base import COMMON_CARD_FIELDS, Algorithm, RoundPlan, field_names
from .dgpo import group_shared_noise
from .forward import LaggedWeights

if TYPE_CHECKING:
    from ..config import GuardConfig

#: Appended to the keys of the pairs' noise-level generators, so that they never draw what another stream keyed by the
#: round and a group or sample index draws.
PAIR_SIGMA_KEY = 0x4450_4F53  # "DPOS"
#: The size of the training noise schedule the official draws from (``noise_scheduler.config.num_train_timesteps``).
TRAIN_SCHEDULE_LEVELS = 1000


# ---- pairs ----------------------------------------------------------------------------------------------------------
def dpo_pairs(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Online Diffusion-DPO's pair of each prompt group, marked on the samples: +1 chosen, -1 rejected, 0 unused (N,).

    ``scores`` (N,) are consecutive groups of ``num_generations``. In each group the sample of highest score is chosen
    and the one of lowest score rejected (the first of them on equal scores), as the official ``'dpo'`` stat tracker
    does: one pair per group, best against worst, no margin. A group whose scores are all equal has no pair (all 0):
    the official forces one there (sample 1 over sample 0, labels without meaning); here it is skipped, which gives
    that group zero gradient as Flow-Factory's port does.

    Example:
        >>> import torch
        >>> dpo_pairs(torch.tensor([0.2, 0.9, 0.1, 0.5, 3.0, 3.0, 3.0, 3.0]), 4).tolist()
        [0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    if scores.ndim != 1 or scores.numel() % num_generations != 0:
        raise ValueError(f"scores must be (N,) with N a multiple of num_generations={num_generations}.")
    grouped = scores.view(-1, num_generations)
    marks = torch.zeros_like(grouped, dtype=torch.float32)
    rows = torch.arange(len(grouped), device=scores.device)
    chosen, rejected = grouped.argmax(dim=1), grouped.argmin(dim=1)
    paired = grouped.amax(dim=1) > grouped.amin(dim=1)
    marks[rows[paired], chosen[paired]] = 1.0
    marks[rows[paired], rejected[paired]] = -1.0
    return marks.view(-1)


def pair_rows(marks: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a micro-batch's chosen and rejected samples, pair by pair in the order of their groups:
    ``(chosen, rejected)``, each (P,) long. Refuses a micro-batch that holds half of a pair."""
    chosen, rejected = torch.nonzero(marks > 0).flatten(), torch.nonzero(marks < 0).flatten()
    chosen = chosen[torch.argsort(group_ids[chosen], stable=True)]
    rejected = rejected[torch.argsort(group_ids[rejected], stable=True)]
    if len(chosen) != len(rejected) or not torch.equal(group_ids[chosen], group_ids[rejected]):
        raise ValueError(
            "loss_type='dpo' needs both samples of each pair in one micro-batch; this one holds a chosen or rejected "
            "sample without its partner. Keep per_device_train_batch_size a multiple of num_generations."
        )
    return chosen, rejected


def pair_sigmas(
    seed: int, round_index: int, group_ids: torch.Tensor, units: int, schedule: torch.Tensor
) -> torch.Tensor:
    """The noise level of each training unit of each sample (B, units), shared by the samples of a group (so by a
    pair) and drawn per group and unit as the official draws it per pair: ``u = sigmoid(z)``, ``z ~ N(0, 1)``
    (diffusers' ``logit_normal`` weighting, mean 0, std 1), index ``floor(1000 u)`` into ``schedule``, the family's
    1000 training noise levels from 1 down (for SD3.5-M ``shift_3((1000 - index) / 1000)``, median 0.75).

    Group ``g``'s levels come from a generator keyed by ``(seed, round_index, g)`` alone, so they do not depend on the
    micro-batches or processes, and a resumed run draws the same.
    """
    levels = {}
    for group in group_ids.unique().tolist():
        generator = keyed_generator(seed, Stream.TIMESTEPS, round_index, PAIR_SIGMA_KEY, group)
        u = torch.sigmoid(torch.randn(units, generator=generator, dtype=torch.float64))
        index = (u * TRAIN_SCHEDULE_LEVELS).long().clamp(max=len(schedule) - 1)
        levels[group] = schedule[index]
    return torch.stack([levels[group] for group in group_ids.tolist()])


# ---- the loss -------------------------------------------------------------------------------------------------------
def _flow_matching_error(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``MEAN_d (velocity - target)**2`` per sample (B,), in float64."""
    return (velocity.to(torch.float64) - target.detach().to(torch.float64)).square().flatten(1).mean(dim=1)


def compute_dpo_loss(
    velocity: torch.Tensor,
    ref_velocity: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float,
    num_groups: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO's loss of one training unit, as flow_grpo's ``train_sd3_dpo.py`` computes it.

    The batch holds ``P`` pairs laid out as the official lays them out, the ``P`` chosen samples first and their
    rejected partners next in the same order; each pair shares its noise and noise level. With ``v`` the policy's
    velocity (with gradient), ``v_ref`` the reference's (without), ``v* = noise - x0`` the flow-matching target and
    ``MEAN_d`` the mean over non-batch elements::

        err_i     = MEAN_d (v_i - v*_i)**2            ref_err_i = MEAN_d (v_ref_i - v*_i)**2
        inside_p  = -0.5 beta [(err_w - ref_err_w) - (err_l - ref_err_l)]      (w, l: pair p's chosen, rejected)
        loss      = sum_p -log sigmoid(inside_p) / num_groups

    ``num_groups`` defaults to ``P``, the official mean over pairs; the algorithm passes the micro-batch's group count,
    so that a group skipped for equal rewards counts as a zero (each pair's weight does not depend on how many other
    groups had a pair). This is Wallace et al.'s ``-log sigmoid(-beta T / 2 [...])`` with the velocity error in place
    of the noise error, a mean over elements rather than a sum and no factor ``T``. ``inside_p`` is the margin between
    the two samples' implicit rewards ``-0.5 beta (err - ref_err)``.

    When the policy is the reference, ``inside = 0``, the loss is ``log 2`` per pair and its gradient
    ``(beta / 4) (grad err_w - grad err_l)`` per pair: lower the chosen sample's error, raise the rejected one's. A
    pair of two identical samples has zero gradient. Computed in float64.

    Args:
        velocity: The policy's velocity (2P, ...), with its graph.
        ref_velocity: The reference's velocity (2P, ...); a constant.
        target: ``v*`` (2P, ...).
        beta: Diffusion-DPO's ``beta`` (the official ``train.beta``, 100); > 0.
        num_groups: The divisor of the summed pair losses; defaults to ``P``.

    Returns:
        ``(loss, stats)``: the scalar loss and detached float64 diagnostics: ``implicit_acc`` (the fraction of pairs
        with ``inside > 0``), ``inside`` (its mean), ``chosen_reward`` and ``rejected_reward`` (the mean implicit
        rewards), ``chosen_err``, ``rejected_err``, ``ref_chosen_err``, ``ref_rejected_err`` (mean errors) and
        ``pairs`` (``P / num_groups``).

    Example:
        >>> import torch
        >>> v, target = torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3)
        >>> loss, stats = compute_dpo_loss(v, v.detach(), target, beta=100.0)
        >>> round(loss.item(), 4), float(stats["implicit_acc"])  # policy == reference: log 2
        (0.6931, 0.0)
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if velocity.shape[0] % 2 != 0 or velocity.shape != ref_velocity.shape or velocity.shape != target.shape:
        raise ValueError(
            f"velocity, ref_velocity and target must all be (2P, ...), got {tuple(velocity.shape)}, "
            f"{tuple(ref_velocity.shape)} and {tuple(target.shape)}."
        )
    pairs = velocity.shape[0] // 2
    num_groups = pairs if num_groups is None else num_groups
    if num_groups < max(pairs, 1):
        raise ValueError(f"num_groups={num_groups} must be at least the number of pairs, {pairs}.")
    err = _flow_matching_error(velocity, target)
    with torch.no_grad():
        ref_err = _flow_matching_error(ref_velocity, target)
    chosen_reward = -0.5 * beta * (err[:pairs] - ref_err[:pairs])
    rejected_reward = -0.5 * beta * (err[pairs:] - ref_err[pairs:])
    inside = chosen_reward - rejected_reward
    loss = -F.logsigmoid(inside).sum() / num_groups
    with torch.no_grad():
        stats = {
            "implicit_acc": (inside > 0).to(torch.float64).mean(),
            "inside": inside.mean(),
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "chosen_err": err[:pairs].mean(),
            "rejected_err": err[pairs:].mean(),
            "ref_chosen_err": ref_err[:pairs].mean(),
            "ref_rejected_err": ref_err[pairs:].mean(),
            "pairs": torch.tensor(pairs / num_groups, dtype=torch.float64),
        }
    return loss, stats


# ---- the algorithm --------------------------------------------------------------------------------------------------
@dataclass
class DPOArguments:
    r"""
    The `GuardConfig` fields only `loss_type="dpo"` reads; every other loss type refuses them when they are set away
    from their defaults. Under `dpo`, rounds are sampled with Flow-GRPO's SDE at `noise_level` and `guidance_scale`
    from the reference, each training micro-batch trains `int(num_inference_steps * timestep_fraction)` noise levels
    per pair, and `epsilon`, `beta` and `adv_clip_max` are not read (DPO has no ratio, no penalty besides its own
    reference term, and ranks raw rewards).

    Parameters:
        dpo_beta (`float`, *optional*, defaults to `100.0`):
            Diffusion-DPO's `beta`: the loss is `-log sigmoid(-dpo_beta / 2 [(err_w - ref_err_w) - (err_l -
            ref_err_l)])` (official `train.beta`, 100 in its SD3.5-M configs; Flow-Factory and verl-omni default to
            2000). `dpo` only.
        dpo_ref_update_steps (`int`, *optional*):
            `None`: the reference (which also samples the rounds) is the frozen base model, the adapter disabled (the
            official default, `ref_update_step = 1e7`, never). An int `N`: the reference is a copy of the trained
            weights, replaced by them at the first round that starts after every `N` optimizer steps (the official
            "OnlineDPO" mode, "e.g. 40"); the copy is saved in checkpoints. `dpo` only.
    """

    dpo_beta: float = 100.0
    dpo_ref_update_steps: int | None = None


@dataclass(frozen=True)
class DPOPlan(RoundPlan):
    """A DPO round: `RoundPlan` plus the round's index, which keys its pairs' noise and noise levels."""

    round_index: int = 0


class DPOAlgorithm(Algorithm):
    """Online Diffusion-DPO on SDE rollouts of the reference, one best-against-worst pair per prompt group."""

    loss_types = ("dpo",)
    description = "online Diffusion-DPO, sampled with the reference's SDE"
    method_names = {"dpo": "online Diffusion-DPO"}
    arguments = DPOArguments
    config_fields = field_names(DPOArguments)
    rollout_type = CleanRollout
    needs_whole_groups = True
    card_fields = (
        "loss_type",
        "dpo_beta",
        "dpo_ref_update_steps",
        *(name for name in COMMON_CARD_FIELDS if name not in ("epsilon", "beta")),  # neither is read
        "noise_level",
    )
    citation = """@inproceedings{wallace2024diffusiondpo,
  title     = {Diffusion Model Alignment Using Direct Preference Optimization},
  author    = {Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and Purushwalkam,
               Senthil and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  year      = {2024},
  note      = {arXiv:2311.12908}
}
@article{liu2025flowgrpo,
  title   = {Flow-GRPO: Training Flow Matching Models via Online RL},
  author  = {Liu, Jie and others},
  journal = {arXiv preprint arXiv:2505.05470},
  year    = {2025}
}"""

    #: Shared settings `dpo` does not read, and why (refused when set away from their defaults).
    _UNREAD = {
        "epsilon": (None, "DPO has no ratio to clip"),
        "beta": (0.0, "DPO's strength is dpo_beta"),
        "adv_clip_max": (5.0, "pairs are ranked by the rewards themselves"),
    }

    @classmethod
    def unread_settings(cls, args: GuardConfig) -> list[str]:
        return [
            f"{name}={getattr(args, name)!r} ({why})"
            for name, (default, why) in cls._UNREAD.items()
            if getattr(args, name) != default
        ]

    @classmethod
    def validate(cls, args: GuardConfig) -> None:
        if args.dpo_beta <= 0:
            raise ValueError(f"dpo_beta={args.dpo_beta} must be > 0 (flow_grpo's SD3.5-M configs use 100).")
        if args.dpo_ref_update_steps is not None and args.dpo_ref_update_steps < 1:
            raise ValueError(
                f"dpo_ref_update_steps={args.dpo_ref_update_steps} must be >= 1 (the official OnlineDPO suggests 40), "
                "or unset for the frozen base model as reference."
            )

    @classmethod
    def needs_reference(cls, args: GuardConfig) -> bool:
        return args.dpo_ref_update_steps is None

    @classmethod
    def training_signal(
        cls, rewards: torch.Tensor, weights: torch.Tensor, args: GuardConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair marks of `dpo_pairs` (+1 chosen, -1 rejected, 0 unused). Samples are ranked by their weighted
        reward total (`multi_reward_normalization="sum"`, what the official's reward function returns) or by their
        decoupled advantage (`"decoupled"`)."""
        advantages, per_reward = compute_multi_reward_advantages(
            rewards,
            weights,
            args.num_generations,
            normalization=args.multi_reward_normalization,
            scale_rewards=args.scale_rewards,
            adv_clip_max=None,
        )
        if args.multi_reward_normalization == "sum":
            scores = (rewards * weights.to(rewards.device, rewards.dtype)).nansum(dim=1)
        else:
            scores = advantages
        return dpo_pairs(scores, args.num_generations).to(rewards.device), per_reward

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        super().__init__(args, adapter)
        self.schedule = SDESchedule.from_config(args)  # Flow-GRPO's SDE at noise_level (the family's fields default)
        self.reference: LaggedWeights | None = None
        self.reference_version = 0  # optimizer steps // dpo_ref_update_steps when the copy was last refreshed
        if args.dpo_ref_update_steps is not None:
            trainable = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
            self.reference = LaggedWeights(trainable)  # the starting weights (with LoRA, the base model)
        self.round_index = 0
        self._train_schedule: torch.Tensor | None = None

    def _reference(self) -> contextlib.AbstractContextManager:
        return self.adapter.reference_policy() if self.reference is None else self.reference.swapped_in()

    def on_round_start(self, round_index: int, global_step: int) -> None:
        if self.reference is None:
            return
        version = global_step // self.args.dpo_ref_update_steps
        if version > self.reference_version:
            self.reference.pull(0.0)  # a hard copy, as the official `copy_learner_to_ref`
            self.reference_version = version

    def plan(self, round_index: int) -> DPOPlan:
        sigmas = self.adapter.sigmas(self.args.num_inference_steps)
        units = max(1, int(self.args.num_inference_steps * self.args.timestep_fraction))
        self.round_index = round_index
        return DPOPlan(sigmas, list(range(units)), round_index=round_index)

    def sample(
        self,
        prompt_embeds: PromptEmbeddings,
        negative_embeds: PromptEmbeddings | None,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        plan: DPOPlan,
    ) -> CleanRollout:
        with self._reference():
            trajectory = sample_sde(
                self.adapter,
                prompt_embeds,
                negative_embeds,
                latents,
                plan.sigmas,
                self.schedule,
                generators=generators,
            )
        clean = trajectory.final_latents
        # The pairs' noise levels and noise are drawn per group in `before_first_update`, once the groups are known.
        units = len(plan.train_steps)
        return CleanRollout(
            clean, clean.new_zeros(len(clean), units), clean.new_zeros(len(clean), units, *clean.shape[1:])
        )

    def _schedule(self) -> torch.Tensor:
        if self._train_schedule is None:
            self._train_schedule = self.adapter.sigmas(TRAIN_SCHEDULE_LEVELS)[:-1].double().cpu()
        return self._train_schedule

    def before_first_update(self, batches: list[TrainBatch]) -> None:
        for batch in batches:
            rollout, groups = batch.rollout, batch.group_ids.cpu()
            units = len(rollout.steps)
            sigmas = pair_sigmas(self.args.seed, self.round_index, groups, units, self._schedule())
            noise = group_shared_noise(self.args.seed, self.round_index, groups, units, tuple(rollout.final.shape[1:]))
            rollout.train_sigmas.copy_(sigmas.to(rollout.train_sigmas))
            rollout.train_noise.copy_(noise.to(rollout.train_noise))

    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_rows(batch.advantages, batch.group_ids)
        num_groups = len(torch.unique(batch.group_ids))
        rollout = batch.rollout
        if len(chosen) == 0:
            # Every group of the micro-batch had equal rewards. A zero loss still runs one policy forward with its
            # graph: the backward must reach every parameter (under DDP every process joins the gradient average).
            noisy, sigma, _ = rollout.select(slice(0, 1)).noised(unit)
            velocity = self.adapter.predict_velocity(noisy, sigma, batch.prompt_embeds.index(slice(0, 1)), None)
            zero = torch.zeros((), dtype=torch.float64, device=velocity.device)
            return velocity.sum() * 0.0, {"pairs": zero, "implicit_acc": zero}
        rows = torch.cat([chosen, rejected])
        noisy, sigma, target = CleanRollout(
            rollout.final[rows], rollout.train_sigmas[rows], rollout.train_noise[rows]
        ).noised(unit)
        embeds = batch.prompt_embeds.index(rows)
        # The reference's forward without gradients runs first: swapping weights in place after the forward with
        # gradients would change tensors its backward still needs. Both are unguided, as the official trains.
        with torch.no_grad(), self._reference():
            ref_velocity = self.adapter.predict_velocity(noisy, sigma, embeds, None)
        velocity = self.adapter.predict_velocity(noisy, sigma, embeds, None)
        return compute_dpo_loss(velocity, ref_velocity, target, beta=self.args.dpo_beta, num_groups=num_groups)

    def bind_parameters(self, parameters: dict[str, torch.nn.Parameter], sharded_module: torch.nn.Module) -> None:
        if self.reference is not None:
            self.reference.rebind(parameters, sharded_module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.reference is None:
            return {}
        return {**self.reference.state("reference/"), "reference_version": torch.tensor(self.reference_version)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.reference is None:
            return
        self.reference.load(state, "reference/")
        self.reference_version = int(state["reference_version"])

    def describe(self) -> dict[str, object]:
        return {"loss_type": self.args.loss_type, "dpo_ref_update_steps": self.args.dpo_ref_update_steps}
