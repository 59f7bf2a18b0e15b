"""DGPO, Direct Group Preference Optimization (`loss_type="dgpo"`; Luo, Hu and Tang, ICLR 2026, arXiv 2510.08425).

DGPO trains on clean samples, as the forward-process family does: a rollout samples with the deterministic ODE and
keeps only the clean latents, and training noises them again. Its loss is a DPO loss over the *groups* of a prompt: the
group's samples are split by the sign of their advantage, each side's implicit reward is its advantage-weighted
flow-matching error relative to a reference, and the gradient of ``-log sigmoid(R(G+) - R(G-))`` is computed as an
advantage-weighted flow-matching loss whose per-group weight is the sigmoid of the group's preference score.

What this follows (Luo-Yihong/DGPO at commit 01ceb4b, ``scripts/train_sd3_dgpo.py``, ``config/dgpo.py``):

- the noise levels trained in a round are ``dgpo_num_train_timesteps`` distinct indices of the sampling grid among
  the first ``dgpo_max_train_step + 1``, the same for every sample of the round;
- every sample of a group is noised with the same noise at a level (`dgpo_shared_noise`), fresh for each level;
- a *lagged copy* of the weights (the official ``ema_ref``) is the old policy of a PPO-style clip, optionally the
  reference of the group score (`dgpo_lagged_reference`), and the sampler once enough steps were taken
  (`dgpo_lagged_sampling_after`);
- the group score needs every sample of its group, so a group must sit whole in one micro-batch on one process
  (`needs_whole_groups`; `GuardConfig` refuses settings that could split one).

The loss functions below are pure torch, with the formulas in their docstrings; the group helpers (`group_sums`,
`group_means`, `group_shared_noise`) are written for any algorithm that compares the samples of a group.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..adapters import PipelineAdapter, PromptEmbeddings
from ..metrics import Stat
from ..rollout import CleanRollout, TrainBatch, sample_ode
from ..seeding import Stream, keyed_generator
from .base import COMMON_CARD_FIELDS, Algorithm, RoundPlan, field_names
from .forward import LaggedWeights

if TYPE_CHECKING:
    from ..config import GuardConfig

#: Appended to the keys of `group_shared_noise`'s generators, so that they never draw what a sample's own generator
#: (keyed by the round and the sample's global index) draws.
GROUP_NOISE_KEY = 0x47524F5550  # "GROUP"


# ---- group helpers ------------------------------------------------------------------------------------------------
def group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's group total: ``out[i] = sum_{j : g_j = g_i} values[j]`` (B,), for any group ids (B,) long.

    Example:
        >>> import torch
        >>> group_sums(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([7, 7, 2, 7])).tolist()
        [7.0, 7.0, 3.0, 7.0]
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    totals = torch.zeros(int(inverse.max()) + 1, dtype=values.dtype, device=values.device)
    return totals.scatter_add(0, inverse, values)[inverse]


def group_means(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Each sample's group mean over the samples present (B,).

    Example:
        >>> import torch
        >>> group_means(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0, 0, 1, 0])).tolist()
        [3.0, 3.0, 3.0, 3.0]
    """
    counts = group_sums(torch.ones_like(values), group_ids)
    return group_sums(values, group_ids) / counts


def group_shared_noise(
    seed: int, round_index: int, group_ids: torch.Tensor, units: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Gaussian noise shared by the samples of a group, fresh for each of ``units`` training units: (B, units, *shape).

    Group ``g``'s noise comes from a generator keyed by ``(seed, round_index, g)`` alone, so it does not depend on how
    the round is cut into micro-batches or processes, and a resumed run draws the same.
    """
    noise = {}
    for group in group_ids.unique().tolist():
        generator = keyed_generator(seed, Stream.SDE_NOISE, round_index, GROUP_NOISE_KEY, group)
        noise[group] = torch.randn((units, *shape), generator=generator)
    return torch.stack([noise[group] for group in group_ids.tolist()])


# ---- the loss -----------------------------------------------------------------------------------------------------
def _flow_matching_error(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``MEAN_d (target - velocity)**2`` per sample (B,), in float64."""
    return (target.to(torch.float64) - velocity.to(torch.float64)).square().flatten(1).mean(dim=1)


def dgpo_group_scores(
    dsm: torch.Tensor,
    ref_dsm: torch.Tensor,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    beta: float,
    group_size: int,
) -> torch.Tensor:
    """DGPO's group preference score of each sample's group (B,), without gradient.

    ``s_G = sum_{i in G} A_i beta (dsm_i - ref_dsm_i) / group_size``: positive when the policy fits what the group
    prefers (positive advantages) worse than the reference does, or its rejected samples better. With
    ``R(G+-) = sum_{G+-} |A_i| (ref_dsm_i - dsm_i)`` it is ``-(beta / |G|) (R(G+) - R(G-))``. The official divides by
    the configured group size (``num_image_per_prompt``), which is the group's sample count here.
    """
    terms = advantages.detach().to(torch.float64) * beta * (dsm.detach() - ref_dsm.detach()) / group_size
    return group_sums(terms, group_ids)


def dgpo_clip_mask(
    dsm: torch.Tensor, old_dsm: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DGPO's PPO-style clip: ``(clipped, ratio)``, both (B,).

    The likelihood ratio takes ``log p = -dsm``: ``ratio_i = exp(old_dsm_i - dsm_i)``. A sample is clipped when its
    ratio left the trust region in the direction its advantage pushes: ``ratio > 1 + epsilon`` if ``A_i > 0``, else
    ``ratio < 1 - epsilon`` (``A_i = 0`` included, which contributes nothing anyway).
    """
    ratio = torch.exp(old_dsm.detach() - dsm.detach())
    clipped = torch.where(advantages > 0, ratio > 1 + epsilon, ratio < 1 - epsilon)
    return clipped, ratio


def compute_dgpo_loss(
    velocity: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    ref_velocity: torch.Tensor | None,
    old_velocity: torch.Tensor | None = None,
    beta: float,
    group_size: int,
    epsilon: float | None = None,
    clip_dsm: bool = True,
    clip_kl: bool = False,
    kl_beta: float = 0.0,
    lagged_reference: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DGPO's loss of one training unit (one noise level, shared noise within groups), as the official computes it.

    With ``v`` the policy's velocity (with gradient), ``v_ref`` the frozen reference's, ``v_old`` the lagged copy's
    (both without), ``v* = noise - x0`` the flow-matching target and ``MEAN_d`` the mean over non-batch elements::

        dsm_i     = MEAN_d (v* - v)**2                     old_dsm_i = MEAN_d (v* - v_old)**2
        ref_dsm_i = MEAN_d (v* - v_dgpo_ref)**2            v_dgpo_ref = v_old if lagged_reference else v_ref
        s_G       = sum_{i in G} A_i beta (sg(dsm_i) - ref_dsm_i) / group_size        (dgpo_group_scores)
        w_G       = sg(sigmoid(s_G))
        clipped_i = exp(old_dsm_i - dsm_i) > 1 + epsilon if A_i > 0 else < 1 - epsilon  (dgpo_clip_mask)
        dsm_i     <- sg(dsm_i) where clipped_i, if clip_dsm  (the group score keeps the unclipped value)
        kl_i      = MEAN_d (v - v_ref)**2, sg(kl_i) where clipped_i if clip_kl
        loss      = E_i[w_{G(i)} A_i dsm_i] + kl_beta E_i[kl_i]

    ``E_i`` is the mean over the micro-batch, whose groups must be whole. The first term's gradient is that of the
    group DPO loss ``(|G| / beta) sum_G -log sigmoid(-s_G)`` (over the batch size), so ``beta`` sharpens the
    weights without scaling the gradient. Computed in float64.

    Args:
        velocity: The policy's velocity (B, ...), with its graph.
        target: ``v*`` (B, ...).
        advantages: Per-sample advantages (B,), already clipped to ``adv_clip_max``.
        group_ids: Each sample's prompt group (B,) long.
        ref_velocity: The frozen reference's velocity; needed unless ``lagged_reference`` and ``kl_beta == 0``.
        old_velocity: The lagged copy's velocity; needed for the clip and for ``lagged_reference``.
        beta: DGPO's ``beta_dpo``, inside the sigmoid; > 0.
        group_size: The number of samples per group (``num_generations``).
        epsilon: The clip range; ``None`` (or no ``old_velocity``) does not clip.
        clip_dsm: Clipped samples lose the gradient of their flow-matching term.
        clip_kl: Clipped samples lose the gradient of their penalty term.
        kl_beta: Weight of the velocity penalty towards the frozen reference (0: none).
        lagged_reference: The group score compares with the lagged copy instead of the frozen reference.

    Returns:
        ``(loss, stats)``: the scalar loss and detached diagnostics (``policy_loss``, ``dsm``, ``ref_dsm``,
        ``group_weight_mean``, ``group_score_abs_mean``; ``old_dsm``, ``ratio_mean`` and ``clip_frac`` with an old
        policy; ``kl`` with a penalty).

    Example:
        >>> import torch
        >>> v, target = torch.zeros(2, 3, requires_grad=True), torch.ones(2, 3)
        >>> loss, stats = compute_dgpo_loss(
        ...     v, target, torch.tensor([1.0, -1.0]), torch.tensor([0, 0]), ref_velocity=v.detach(), beta=100.0,
        ...     group_size=2)
        >>> float(stats["group_weight_mean"]), float(loss.detach())  # policy == reference: w = 1/2; sum_G A = 0
        (0.5, 0.0)
    """
    if lagged_reference and old_velocity is None:
        raise ValueError("lagged_reference=True needs old_velocity, the lagged copy's velocity.")
    if ref_velocity is None and (not lagged_reference or kl_beta > 0):
        raise ValueError("ref_velocity is needed unless lagged_reference=True and kl_beta=0.")
    advantages = advantages.detach().to(torch.float64)
    dsm = _flow_matching_error(velocity, target)
    with torch.no_grad():
        ref_dsm = _flow_matching_error(old_velocity if lagged_reference else ref_velocity, target)
        scores = dgpo_group_scores(dsm, ref_dsm, advantages, group_ids, beta=beta, group_size=group_size)
        weights = torch.sigmoid(scores)
    stats: dict[str, torch.Tensor] = {}
    clipped = None
    if old_velocity is not None and epsilon is not None and (clip_dsm or clip_kl):
        with torch.no_grad():
            old_dsm = _flow_matching_error(old_velocity, target)
        clipped, ratio = dgpo_clip_mask(dsm, old_dsm, advantages, epsilon)
        stats.update(old_dsm=old_dsm.mean(), ratio_mean=ratio.mean(), clip_frac=clipped.to(torch.float64).mean())
    trained_dsm = torch.where(clipped, dsm.detach(), dsm) if clipped is not None and clip_dsm else dsm
    policy_loss = (weights * advantages * trained_dsm).mean()
    loss = policy_loss
    if kl_beta > 0:
        kl = _flow_matching_error(velocity, ref_velocity.detach())
        if clipped is not None and clip_kl:
            kl = torch.where(clipped, kl.detach(), kl)
        loss = loss + kl_beta * kl.mean()
        stats[Stat.KL] = kl.detach().mean()
    stats.update(
        policy_loss=policy_loss.detach(),
        dsm=dsm.detach().mean(),
        ref_dsm=ref_dsm.mean(),
        group_weight_mean=weights.mean(),
        group_score_abs_mean=scores.abs().mean(),
    )
    return loss, stats


def dgpo_lagged_decay(step: int) -> float:
    """The decay of the lagged copy's update after optimizer step ``step`` (0-based: the step just taken),
    ``copy <- d copy + (1 - d) weights`` with ``d = min(0.3, 0.001 step)`` (the official ``ema_ref``, hard-coded).

    Example:
        >>> dgpo_lagged_decay(0), dgpo_lagged_decay(100), dgpo_lagged_decay(1000)
        (0.0, 0.1, 0.3)
    """
    return min(0.3, 0.001 * step)


# ---- the algorithm ------------------------------------------------------------------------------------------------
@dataclass
class DGPOArguments:
    r"""
    The `GuardConfig` fields only `loss_type="dgpo"` reads; every other loss type refuses them when they are set away
    from their defaults. Under `dgpo`, `epsilon` is the clip range of the ratio to the lagged copy (default `1e-2`, the
    official SD3.5-M OCR and GenEval value; PickScore uses `5e-2`), `beta` the weight of the velocity penalty
    `MEAN((v - v_ref)**2)` towards the frozen reference (official `train.beta`: 0.02, PickScore 0.001), and
    `timestep_fraction` is not read.

    Parameters:
        dgpo_beta (`float`, *optional*, defaults to `100.0`):
            DGPO's `beta_dpo`, the sharpness of the group weight `sigmoid(s_G)`; it does not scale the gradient
            (official: 100, PickScore 10; 2000 with `dgpo_lagged_reference`). `dgpo` only.
        dgpo_num_train_timesteps (`int`, *optional*, defaults to `4`):
            Noise levels trained per round: distinct indices of the sampling grid drawn per round, the same for every
            sample (official `num_train_timesteps`). `dgpo` only.
        dgpo_max_train_step (`int`, *optional*, defaults to `6`):
            The levels are drawn among grid indices `0..dgpo_max_train_step` (official `trunc_steps`: 6, GenEval 4;
            with 10 steps and shift 3, sigma >= 0.667). Must be below `num_inference_steps`. `dgpo` only.
        dgpo_shared_noise (`bool`, *optional*, defaults to `True`):
            The samples of a group are noised with the same noise at each level (official `use_shared_noise`);
            `False` draws it per sample. `dgpo` only.
        dgpo_clip_dsm (`bool`, *optional*, defaults to `True`):
            Samples whose ratio to the lagged copy left `[1 - epsilon, 1 + epsilon]` in the direction of their
            advantage lose the gradient of their flow-matching term (official `clip_dsm`). `dgpo` only.
        dgpo_clip_kl (`bool`, *optional*, defaults to `False`):
            The same for their velocity penalty towards the reference (official `clip_kl`). `dgpo` only.
        dgpo_lagged_reference (`bool`, *optional*, defaults to `False`):
            The group score compares with the lagged copy instead of the frozen reference (official `use_ema_ref`,
            the "dynamic reference"). `dgpo` only.
        dgpo_lagged_sampling_after (`int`, *optional*, defaults to `200`):
            Rounds are sampled with the lagged copy once more than this many optimizer steps were taken, before that
            with the current weights (official `switch_ema_ref`: 200, GenEval 500). `dgpo` only.
    """

    dgpo_beta: float = 100.0
    dgpo_num_train_timesteps: int = 4
    dgpo_max_train_step: int = 6
    dgpo_shared_noise: bool = True
    dgpo_clip_dsm: bool = True
    dgpo_clip_kl: bool = False
    dgpo_lagged_reference: bool = False
    dgpo_lagged_sampling_after: int = 200


@dataclass(frozen=True)
class DGPOPlan(RoundPlan):
    """A DGPO round: `RoundPlan` plus the round's index and the grid indices of its trained noise levels (unit ``k``
    trains at ``sigmas[train_levels[k]]``)."""

    round_index: int = 0
    train_levels: tuple[int, ...] = ()


class DGPOAlgorithm(Algorithm):
    """DGPO on ODE rollouts of the clean samples, with a lagged copy of the weights as old policy."""

    loss_types = ("dgpo",)
    description = "DGPO's group preference loss, sampled with the ODE"
    method_names = {"dgpo": "DGPO"}
    arguments = DGPOArguments
    config_fields = field_names(DGPOArguments)
    rollout_type = CleanRollout
    needs_whole_groups = True
    card_fields = (
        "loss_type",
        "dgpo_beta",
        "dgpo_num_train_timesteps",
        "dgpo_max_train_step",
        "dgpo_lagged_reference",
        "dgpo_lagged_sampling_after",
        *COMMON_CARD_FIELDS,
    )
    citation = """@inproceedings{luo2026dgpo,
  title     = {Reinforcing Diffusion Models by Direct Group Preference Optimization},
  author    = {Luo, Yihong and Hu, Tianyang and Tang, Jing},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  note      = {arXiv:2510.08425}
}"""

    @classmethod
    def unread_settings(cls, args: GuardConfig) -> list[str]:
        unread = []
        if args.epsilon is not None and not (args.dgpo_clip_dsm or args.dgpo_clip_kl):
            unread.append(f"epsilon={args.epsilon!r}")  # nothing to clip
        default_fraction = next(f.default for f in dataclasses.fields(args) if f.name == "timestep_fraction")
        if args.timestep_fraction != default_fraction:  # dgpo_num_train_timesteps sets the count
            unread.append(f"timestep_fraction={args.timestep_fraction!r}")
        return unread

    @classmethod
    def default_epsilon(cls, loss_type: str) -> float | None:
        return 1e-2  # config/dgpo.py, the SD3.5-M OCR and GenEval runs

    @classmethod
    def validate(cls, args: GuardConfig) -> None:
        if args.dgpo_beta <= 0:
            raise ValueError(
                f"dgpo_beta={args.dgpo_beta} must be > 0 (the official uses 10 to 100, 2000 with an EMA ref)."
            )
        if args.epsilon is not None and args.epsilon <= 0:
            raise ValueError(f"epsilon={args.epsilon} must be > 0: it is DGPO's clip range (official 1e-3 to 5e-2).")
        if args.dgpo_max_train_step < 0 or args.dgpo_max_train_step >= args.num_inference_steps:
            raise ValueError(
                f"dgpo_max_train_step={args.dgpo_max_train_step} must index a noisy level of the "
                f"num_inference_steps={args.num_inference_steps} sampling grid (0 to {args.num_inference_steps - 1}). "
                "Lower dgpo_max_train_step (the official 6 assumes 10 steps) or raise num_inference_steps."
            )
        if not 1 <= args.dgpo_num_train_timesteps <= args.dgpo_max_train_step + 1:
            raise ValueError(
                f"dgpo_num_train_timesteps={args.dgpo_num_train_timesteps} distinct noise levels cannot be drawn from "
                f"grid indices 0..dgpo_max_train_step={args.dgpo_max_train_step}: set it between 1 and "
                f"{args.dgpo_max_train_step + 1}, or raise dgpo_max_train_step."
            )

    @classmethod
    def needs_reference(cls, args: GuardConfig) -> bool:
        return args.beta > 0 or not args.dgpo_lagged_reference

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        super().__init__(args, adapter)
        trainable = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
        # The official `ema_ref`: a copy of the initial trainable weights, pulled after every optimizer step.
        self.lagged = LaggedWeights(trainable)
        self.pulled_steps = 0  # optimizer steps the copy has followed
        self.global_step = 0
        self.round_index = 0

    def on_round_start(self, round_index: int, global_step: int) -> None:
        # The official pulls after each optimizer step with the weights just stepped to. Here the copy follows at the
        # start of the next round, once per step taken since (exact when a round is one optimizer step, as in every
        # official config; otherwise every pull uses the round's last weights).
        for step in range(self.pulled_steps, global_step):
            self.lagged.pull(dgpo_lagged_decay(step))
        self.pulled_steps = global_step
        self.global_step = global_step

    def plan(self, round_index: int) -> DGPOPlan:
        args = self.args
        sigmas = self.adapter.sigmas(args.num_inference_steps)
        generator = keyed_generator(args.seed, Stream.TIMESTEPS, round_index)
        levels = torch.randperm(args.dgpo_max_train_step + 1, generator=generator)[: args.dgpo_num_train_timesteps]
        self.round_index = round_index
        return DGPOPlan(
            sigmas,
            list(range(args.dgpo_num_train_timesteps)),
            round_index=round_index,
            train_levels=tuple(levels.tolist()),
        )

    def sample(
        self,
        prompt_embeds: PromptEmbeddings,
        negative_embeds: PromptEmbeddings | None,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        plan: DGPOPlan,
    ) -> CleanRollout:
        lagged = self.global_step > self.args.dgpo_lagged_sampling_after
        with self.lagged.swapped_in() if lagged else contextlib.nullcontext():
            clean = sample_ode(self.adapter, prompt_embeds, negative_embeds, latents, plan.sigmas)
        levels = plan.sigmas[list(plan.train_levels)].float().to(clean.device)
        train_sigmas = levels.expand(len(clean), -1).clone()
        # Per-sample noise from the sample's own generator; with shared noise `before_first_update` replaces it by
        # its group's once the round's group ids are known.
        units = len(plan.train_levels)
        noise = torch.stack([torch.randn((units, *clean.shape[1:]), generator=g) for g in generators])
        return CleanRollout(clean, train_sigmas, noise.to(clean.device))

    def before_first_update(self, batches: list[TrainBatch]) -> None:
        if not self.args.dgpo_shared_noise:
            return
        for batch in batches:
            rollout = batch.rollout
            noise = group_shared_noise(
                self.args.seed, self.round_index, batch.group_ids.cpu(), len(rollout.steps), rollout.final.shape[1:]
            )
            rollout.train_noise.copy_(noise.to(rollout.train_noise))

    @torch.no_grad()
    def _velocity_under(self, weights, batch: TrainBatch, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with weights:
            return self.adapter.predict_velocity(noisy, sigma, batch.prompt_embeds, None)

    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        counts = torch.unique(batch.group_ids, return_counts=True)[1]
        if bool((counts != args.num_generations).any()):
            raise ValueError(
                f"loss_type='dgpo' needs whole prompt groups of num_generations={args.num_generations} in each "
                f"micro-batch; this one has groups of {sorted(set(counts.tolist()))} samples."
            )
        noisy, sigma, target = batch.rollout.noised(unit)
        clips = args.dgpo_clip_dsm or args.dgpo_clip_kl
        # The no-grad forwards under other weights run first: swapping weights in place after the forward with
        # gradients would change tensors its backward still needs. Every forward is unguided, as the official trains.
        ref_velocity = old_velocity = None
        if self.needs_reference(args):
            ref_velocity = self._velocity_under(self.adapter.reference_policy(), batch, noisy, sigma)
        if clips or args.dgpo_lagged_reference:
            old_velocity = self._velocity_under(self.lagged.swapped_in(), batch, noisy, sigma)
        velocity = self.adapter.predict_velocity(noisy, sigma, batch.prompt_embeds, None)
        return compute_dgpo_loss(
            velocity,
            target,
            batch.advantages,
            batch.group_ids,
            ref_velocity=ref_velocity,
            old_velocity=old_velocity,
            beta=args.dgpo_beta,
            group_size=args.num_generations,
            epsilon=args.epsilon if clips else None,
            clip_dsm=args.dgpo_clip_dsm,
            clip_kl=args.dgpo_clip_kl,
            kl_beta=args.beta,
            lagged_reference=args.dgpo_lagged_reference,
        )

    def bind_parameters(self, parameters: dict[str, torch.nn.Parameter], sharded_module: torch.nn.Module) -> None:
        self.lagged.rebind(parameters, sharded_module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.lagged.state("lagged/"), "lagged_pulled_steps": torch.tensor(self.pulled_steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.lagged.load(state, "lagged/")
        self.pulled_steps = int(state["lagged_pulled_steps"])

    def describe(self) -> dict[str, object]:
        args = self.args
        return {
            "loss_type": args.loss_type,
            "dgpo_num_train_timesteps": args.dgpo_num_train_timesteps,
            "dgpo_max_train_step": args.dgpo_max_train_step,
            "dgpo_shared_noise": args.dgpo_shared_noise,
        }
