"""The SDE-ratio family: Flow-GRPO, GRPO-Guard, TempFlow-GRPO reweighting and the paper's ablations.

A rollout samples with the SDE and records, at every step it trains, the latents before and after the step and the
mean of the step's Gaussian under the sampling policy. Training re-predicts that mean with the current policy at one
recorded step at a time and compares the two through an importance ratio (the `loss_type` picks its form and weight;
formulas in :mod:`trl_guard.losses.sde_ratio`). The old policy is never re-run: its means were recorded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..adapters import PipelineAdapter, PromptEmbeddings
from ..losses.sde_ratio import DANCE_WEIGHTINGS, KL_TYPES, SDE_LOSS_TYPES
from ..metrics import Stat
from ..rollout import Rollout, TrainBatch, sample_sde, select_train_steps
from ..schedule import SDESchedule
from ..sde import CPS_LOG_PROBS, NOISE_SCHEDULES
from ..seeding import Stream, keyed_generator
from .base import COMMON_CARD_FIELDS, Algorithm, RoundPlan, field_names

if TYPE_CHECKING:
    from ..config import GuardConfig

TIMESTEP_SELECTIONS = ("first", "random")
SDE_WINDOW_SCHEDULES = ("random", "sliding")


@dataclass
class SDERatioArguments:
    r"""
    The `GuardConfig` fields only the SDE-ratio family reads (`loss_type` `"flow_grpo"`, `"temp_reweight"`,
    `"mean_revised"`, `"ratio_norm"` or `"grpo_guard"`, and Flow-DPPO's `"flow_dppo"`, all but `dance_weighting`);
    every other loss type refuses them when they are set away from their defaults.

    Parameters:
        noise_schedule (`str`, *optional*, defaults to `"flow_grpo"`):
            `"flow_grpo"`: `s = noise_level * sqrt(sigma / (1 - sigma))`; `"dance_grpo"`: constant `s = noise_level`;
            `"linear"`: `s = noise_level * sigma`, Flow-GRPO's Wan2.1 schedule (there `noise_level` is the sampling
            grid's second sigma, `sigmas[1]`); `"cps"`: Coefficients-Preserving Sampling (Flow-GRPO's `sde_type="cps"`), noise std
            `sigma_next * sin(noise_level * pi / 2)`, no noise at the last step (which is then never trained).
        cps_log_prob (`str`, *optional*, defaults to `"official"`):
            The log-probability under `noise_schedule="cps"`: `"official"` is Flow-GRPO's `-MEAN((x_next - mean)**2)`
            (constants and variance dropped; its CPS configs clip at `1e-5`), `"gaussian"` the normalised density
            (whose log-ratios are the official ones divided by `2 std**2`). docs/fidelity.md compares the two.
        dance_weighting (`str`, *optional*, defaults to `"inverse"`):
            GRPO-Guard's per-step weight under `noise_schedule="dance_grpo"`: `"inverse"` is `1 / (beta_t * (-dt))`,
            `"paper"` is `beta_t / (-dt)` as printed in the paper, with `beta_t = 1 + noise_level**2 (1 - sigma) /
            (2 sigma)`. The default is the inverse: it is the weight that undoes the `beta_t * (-dt)` scale of the
            RatioNorm gradient, and it evened out per-timestep gradient norms (max/min 1.3x against 5.8x) on a tiny
            FLUX; docs/dance_grpo_weighting.md has the measurement.
        kl_type (`str`, *optional*, defaults to `"flow_grpo"`):
            `"flow_grpo"`: Flow-GRPO's per-step KL, `MEAN((mean - ref_mean)**2) / (2 s**2)` with `s` the diffusion
            coefficient, that is the exact Gaussian KL times `(-dt)`, so β values from its configs (0.01-0.04) carry
            over. `"exact"`: the closed-form KL between the two Gaussians of the step.
        timestep_selection (`str`, *optional*, defaults to `"first"`):
            Which steps `timestep_fraction` keeps: `"first"` (the official rule: the first steps, in sampling order,
            so `0.99` leaves out the last, least noisy step) or `"random"` (a subset drawn per rollout from the
            seed, shared by every sample of the rollout). Steps without noise (CPS's last) are never trained.
        sde_window_size (`int`, *optional*, defaults to `0`):
            `0` samples every step with the SDE. Otherwise Flow-GRPO-Fast's (and MixGRPO's) SDE window: each round,
            only `sde_window_size` consecutive steps are SDE steps and the others deterministic ODE steps; only the
            window's steps are recorded and trained (`timestep_fraction` does not apply), so memory and training
            time scale with the window, not with `num_inference_steps`. Flow-GRPO-Fast trains windows of 2.
        sde_window_range (`list[int]`, *optional*):
            `[start, end)`: the sampling steps the window may cover; defaults to `[0, num_inference_steps // 2]`,
            the noisier half. The window's first step is drawn per round as set by `sde_window_schedule`.
        sde_window_schedule (`str`, *optional*, defaults to `"random"`):
            `"random"`: the window's first step is drawn uniformly from `[start, end - sde_window_size]` each round,
            from the seed and the round index, so every process draws the same and a resumed run the same again.
            `"sliding"` (MixGRPO): it starts at `start` and moves one step later every `sde_window_shift_interval`
            rounds, stopping at `end - sde_window_size`.
        sde_window_shift_interval (`int`, *optional*, defaults to `25`):
            Rounds between two moves of a `"sliding"` window.
        recompute_old_means (`bool`, *optional*, defaults to `False`):
            Before the first update of each round, compute the sampling policy's means again with one no-grad
            forward per trained step in the training micro-batch's shape, and use them as the old policy's (SDE
            losses only). The first pass is then exactly on-policy whatever the sampling batch, at one extra forward
            per trained step and sample. Worth it with half precision when `per_device_sample_batch_size` differs
            from `per_device_train_batch_size`, or on hardware whose kernels are not deterministic
            (docs/launching.md, "Precision").
    """

    noise_schedule: str = field(default="flow_grpo", metadata={"choices": list(NOISE_SCHEDULES)})
    cps_log_prob: str = field(default="official", metadata={"choices": list(CPS_LOG_PROBS)})
    dance_weighting: str = field(default="inverse", metadata={"choices": list(DANCE_WEIGHTINGS)})
    kl_type: str = field(default="flow_grpo", metadata={"choices": list(KL_TYPES)})
    timestep_selection: str = field(default="first", metadata={"choices": list(TIMESTEP_SELECTIONS)})
    sde_window_size: int = 0
    sde_window_range: list[int] | None = None
    sde_window_schedule: str = field(default="random", metadata={"choices": list(SDE_WINDOW_SCHEDULES)})
    sde_window_shift_interval: int = 25
    recompute_old_means: bool = False


def validate_window(args: GuardConfig) -> None:
    """Check the SDE window's fields, and fill in `sde_window_range`'s default (the noisier half of the grid)."""
    if args.sde_window_size < 0:
        raise ValueError(f"sde_window_size={args.sde_window_size} must be >= 0 (0 turns the window off).")
    if args.sde_window_shift_interval < 1:
        raise ValueError(f"sde_window_shift_interval={args.sde_window_shift_interval} must be >= 1.")
    if args.sde_window_size == 0:
        return
    if args.sde_window_range is None:
        args.sde_window_range = [0, args.num_inference_steps // 2]
    window = list(args.sde_window_range)
    if not (len(window) == 2 and 0 <= window[0] < window[1] <= args.num_inference_steps) or (
        window[1] - window[0] < args.sde_window_size
    ):
        raise ValueError(
            f"sde_window_range={args.sde_window_range} must be [start, end) with 0 <= start < end <= "
            f"num_inference_steps={args.num_inference_steps} and room for sde_window_size={args.sde_window_size} "
            "steps (end - start >= sde_window_size)."
        )
    if args.noise_schedule == "cps" and args.sde_window_size == 1 and window[1] == args.num_inference_steps:
        raise ValueError(
            f"sde_window_size=1 with sde_window_range={window} can fall on CPS's last step, which has no noise and "
            "nothing to train: end the range at num_inference_steps - 1 or widen the window."
        )


def policy_mean(
    adapter: PipelineAdapter,
    schedule: SDESchedule,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prompt_embeds: PromptEmbeddings,
    negative_embeds: PromptEmbeddings | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The current policy's ``(mean, std)`` of the step from ``latents`` at ``sigma`` to ``next_latents``.

    Under `adapter.reference_policy()` this is the reference's mean: training's KL and the evaluation KL use it so.
    """
    size = latents.shape[0]
    sigma, sigma_next = sigma.expand(size), sigma_next.expand(size)
    velocity = adapter.predict_velocity(latents, sigma, prompt_embeds, negative_embeds)
    _, _, mean, std = schedule.step(velocity, latents, sigma, sigma_next, prev_sample=next_latents)
    return mean, std


def window(args: GuardConfig, round_index: int) -> range | None:
    """The sampling steps of round ``round_index`` that are SDE steps, recorded and trained (Flow-GRPO-Fast's and
    MixGRPO's SDE window); ``None`` without a window (every step).

    A ``"random"`` window's first step is drawn from the seed and the round alone, so every process draws the same and
    a resumed run the same again; a ``"sliding"`` one moves one step later every `sde_window_shift_interval` rounds.
    """
    if args.sde_window_size == 0:
        return None
    start, end = args.sde_window_range
    last_start = end - args.sde_window_size
    if args.sde_window_schedule == "sliding":
        first = min(start + round_index // args.sde_window_shift_interval, last_start)
    else:
        generator = keyed_generator(args.seed, Stream.WINDOW, round_index)
        first = start + int(torch.randint(last_start - start + 1, (1,), generator=generator))
    return range(first, first + args.sde_window_size)


class SDERatioAlgorithm(Algorithm):
    """Clipped importance-ratio policy gradient on recorded SDE steps, with an optional KL to the reference."""

    loss_types = SDE_LOSS_TYPES
    description = "an SDE-ratio loss"
    method_names = {
        "flow_grpo": "Flow-GRPO",
        "grpo_guard": "GRPO-Guard",
        "temp_reweight": "TempFlow-GRPO's reweighting",
        "mean_revised": "the mean-revised ratio, an ablation",
        "ratio_norm": "RatioNorm without reweighting, an ablation",
    }
    arguments = SDERatioArguments
    config_fields = field_names(SDERatioArguments)
    rollout_type = Rollout
    card_fields = (
        "loss_type",
        *COMMON_CARD_FIELDS,
        "noise_schedule",
        "noise_level",
        "init_same_noise",
        "dance_weighting",
    )
    citation = """@article{wang2025grpoguard,
  title   = {GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping},
  author  = {Wang, Jing and Liang, Jiajun and Liu, Jie and Liu, Henglin and Liu, Gongye and Zheng, Jun and
             Pang, Wanyuan and Ma, Ao and Xie, Zhenyu and Wang, Xintao and Wang, Meng and Wan, Pengfei and
             Liang, Xiaodan},
  journal = {arXiv preprint arXiv:2510.22319},
  year    = {2025}
}
@article{liu2025flowgrpo,
  title   = {Flow-GRPO: Training Flow Matching Models via Online RL},
  author  = {Liu, Jie and others},
  journal = {arXiv preprint arXiv:2505.05470},
  year    = {2025}
}
@article{xue2025dancegrpo,
  title   = {DanceGRPO: Unleashing GRPO on Visual Generation},
  author  = {Xue, Zeyue and others},
  journal = {arXiv preprint arXiv:2505.07818},
  year    = {2025}
}"""

    #: Clip ranges the papers use: ``log r`` is ~1e-3 wide, the std-normalised log-ratio ~100x narrower.
    _DEFAULT_EPSILON = {
        "flow_grpo": 1e-4,
        "temp_reweight": 1e-4,
        "mean_revised": 1e-4,
        "ratio_norm": 2e-6,
        "grpo_guard": 2e-6,
    }

    @classmethod
    def default_epsilon(cls, loss_type: str) -> float | None:
        return cls._DEFAULT_EPSILON.get(loss_type)

    @classmethod
    def validate(cls, args: GuardConfig) -> None:
        if args.noise_schedule == "cps" and args.noise_level > 1:
            raise ValueError(
                f"noise_level={args.noise_level} with noise_schedule='cps' must be <= 1: CPS's noise std is "
                "sigma_next * sin(noise_level * pi / 2), which is largest at 1 (Flow-GRPO's CPS configs use 0.7-0.8)."
            )
        if args.noise_schedule == "cps" and args.num_inference_steps < 2:
            raise ValueError(
                f"num_inference_steps={args.num_inference_steps} with noise_schedule='cps' leaves nothing to train: "
                "CPS's last step adds no noise, so it needs at least 2 steps (Flow-GRPO samples 10)."
            )
        validate_window(args)

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        super().__init__(args, adapter)
        self.schedule = SDESchedule.from_config(args)
        if args.noise_schedule == "linear":
            sigma_max = float(adapter.sigmas(args.num_inference_steps)[1])
            if abs(args.noise_level - sigma_max) > 1e-3:
                warnings.warn(
                    f"noise_schedule='linear' with noise_level={args.noise_level}: Flow-GRPO's Wan2.1 step sets it to "
                    f"the sampling grid's second sigma, {sigma_max:.5f} for num_inference_steps="
                    f"{args.num_inference_steps}. Set noise_level to that value to train as it does.",
                    stacklevel=3,
                )

    def plan(self, round_index: int) -> RoundPlan:
        args = self.args
        sigmas = self.adapter.sigmas(args.num_inference_steps)
        noise_std = self.schedule.std(sigmas[:-1], sigmas[1:])
        sde_steps = window(args, round_index)
        if sde_steps is None:
            generator = keyed_generator(args.seed, Stream.TIMESTEPS, round_index)
            train_steps = select_train_steps(
                noise_std, args.timestep_fraction, args.timestep_selection, generator=generator
            )
            return RoundPlan(sigmas, train_steps)
        # Inside a window every stochastic step trains (a CPS window may end on the noiseless last step).
        train_steps = [i for i in sde_steps if noise_std[i] > 0]
        return RoundPlan(sigmas, train_steps, sde_steps, {Stat.SDE_WINDOW_START: float(sde_steps[0])})

    def sample(
        self,
        prompt_embeds: PromptEmbeddings,
        negative_embeds: PromptEmbeddings | None,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        plan: RoundPlan,
    ) -> Rollout:
        return sample_sde(
            self.adapter,
            prompt_embeds,
            negative_embeds,
            latents,
            plan.sigmas,
            self.schedule,
            generators=generators,
            sde_steps=plan.sde_steps,
        )

    @torch.no_grad()
    def before_first_update(self, batches: list[TrainBatch]) -> None:
        """With `recompute_old_means`, replace each trained step's recorded mean by the policy's mean computed again in
        the training micro-batch's shape: the first pass then repeats these forwards exactly (ratio 1), however the
        round was sampled."""
        if not self.args.recompute_old_means:
            return
        for batch in batches:
            old_means = batch.rollout.old_means.clone()
            for step in batch.train_steps:
                old_means[:, step - batch.rollout.start] = self._mean(batch, step)[0].to(old_means.dtype)
            batch.rollout.old_means = old_means

    def _mean(self, batch: TrainBatch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        latents, next_latents, _, sigma, sigma_next = batch.rollout.step(step)
        return policy_mean(
            self.adapter,
            self.schedule,
            latents,
            next_latents,
            sigma,
            sigma_next,
            batch.prompt_embeds,
            batch.negative_embeds,
        )

    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        _, next_latents, old_mean, sigma, sigma_next = batch.rollout.step(unit)
        sigma, sigma_next = sigma.expand(len(batch)), sigma_next.expand(len(batch))
        mean, std = self._mean(batch, unit)
        loss, stats = self.schedule.policy_loss(
            mean,
            old_mean,
            next_latents,
            std,
            batch.advantages,
            sigma,
            sigma_next,
            loss_type=args.loss_type,
            epsilon=args.epsilon,
        )
        if args.beta > 0:
            with torch.no_grad(), self.adapter.reference_policy():
                ref_mean, _ = self._mean(batch, unit)
            kl = self.schedule.kl(mean, ref_mean, std, sigma, sigma_next, kl_type=args.kl_type)
            loss = loss + args.beta * kl
            stats[Stat.KL] = kl.detach()
        return loss, stats


@torch.no_grad()
def path_kl_to_reference(
    adapter: PipelineAdapter,
    schedule: SDESchedule,
    prompt_embeds: PromptEmbeddings,
    negative_embeds: PromptEmbeddings | None,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Per sample (B,): the exact KL between the policy's and the reference's step Gaussians, summed over the noisy
    steps of one SDE trajectory sampled from the policy. An evaluation diagnostic (`GuardConfig.eval_kl`) that reads
    the same for every algorithm family: it measures how far the weights moved, not how they were trained."""
    rollout = sample_sde(adapter, prompt_embeds, negative_embeds, latents, sigmas, schedule, generators=generators)
    total = torch.zeros(len(rollout), device=rollout.latents.device)
    with adapter.reference_policy():
        for step in rollout.steps:
            latents, next_latents, old_mean, sigma, sigma_next = rollout.step(step)
            ref_mean, std = policy_mean(
                adapter, schedule, latents, next_latents, sigma, sigma_next, prompt_embeds, negative_embeds
            )
            size = len(rollout)
            total += schedule.kl(
                old_mean, ref_mean, std, sigma.expand(size), sigma_next.expand(size), kl_type="exact", reduction="none"
            )
    return total.cpu()
