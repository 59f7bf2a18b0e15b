"""The SDE-ratio family: Flow-GRPO, GRPO-Guard, TempFlow-GRPO reweighting and the paper's ablations.

A rollout samples with the SDE and records, at every step it trains, the latents before and after the step and the
mean of the step's Gaussian under the sampling policy. Training re-predicts that mean with the current policy at one
recorded step at a time and compares the two through an importance ratio (the `loss_type` picks its form and weight;
formulas in :mod:`trl_guard.losses`). The old policy is never re-run: its means were recorded.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ..adapters import PipelineAdapter, PromptEmbeddings
from ..metrics import Stat
from ..rollout import Rollout, TrainBatch, sample_sde, select_train_steps
from ..schedule import SDESchedule
from ..seeding import Stream, keyed_generator
from .base import Algorithm, RoundPlan

if TYPE_CHECKING:
    from ..config import GuardConfig


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

    loss_types = ("flow_grpo", "temp_reweight", "mean_revised", "ratio_norm", "grpo_guard")

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
