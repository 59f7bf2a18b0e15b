"""The forward-process family: DiffusionNFT (`loss_type="nft"`) and Advantage Weighted Matching (`loss_type="awm"`).

Neither needs the sampler's log-probabilities, so a rollout samples with the deterministic ODE and keeps only the
clean latents. Training noises each clean sample again at noise levels drawn from the rollout's grid (a permutation
per sample, its first `max(1, int(T * timestep_fraction))`), with fresh noise, and fits the flow-matching regression
there; the reward enters as a weight (formulas in :mod:`trl_guard.losses`).

Both keep a *lagged copy* of the trained weights, pulled towards them once per round by `lagged_decay`: NFT's "old"
policy, which samples the rounds and gives `v_old`, and AWM's regulariser target. For LoRA the copy is of the adapter
weights only.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from ..adapters import PipelineAdapter, PromptEmbeddings
from ..ema import EMAWeights, full, like
from ..losses import (
    awm_log_likelihood,
    compute_awm_loss,
    compute_awm_regularizer,
    compute_nft_loss,
    lagged_decay,
    nft_optimality,
)
from ..rollout import CleanRollout, TrainBatch, sample_ode
from .base import Algorithm, RoundPlan

if TYPE_CHECKING:
    from ..config import GuardConfig

#: The lagged copy's decay schedule for each loss type when `lagged_decay_schedule` is unset (the official defaults).
DEFAULT_LAGGED_DECAY = {"nft": "nft", "awm": "awm"}


class LaggedWeights(EMAWeights):
    """A copy of the trainable weights pulled towards them by an explicit decay, ``copy <- d copy + (1 - d) weights``,
    and swapped into the model for the forwards that need it (`swapped_in`, from `EMAWeights`)."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter]):
        super().__init__(parameters, decay=0.0)

    @torch.no_grad()
    def pull(self, decay: float) -> None:
        for name, parameter in self.parameters.items():
            self.averages[name].lerp_(parameter.detach().to(self.averages[name].dtype), 1 - decay)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + name: full(t.detach()).cpu().clone() for name, t in self.averages.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        missing = [name for name in self.averages if prefix + name not in state]
        if missing:
            raise ValueError(f"The saved algorithm state has no {prefix!r} entry for {missing[0]!r}.")
        for name, tensor in self.averages.items():
            tensor.copy_(like(state[prefix + name], tensor))


class ForwardProcessAlgorithm(Algorithm):
    """DiffusionNFT and AWM on ODE rollouts of the clean samples."""

    loss_types = ("nft", "awm")

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        super().__init__(args, adapter)
        trainable = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
        self.lagged = LaggedWeights(trainable)
        self.decay_schedule = args.lagged_decay_schedule or DEFAULT_LAGGED_DECAY[args.loss_type]
        # AWM's ratio compares with the policy that sampled the round. When a round serves a single optimizer step
        # that is the current policy, detached (exactly on-policy, as the official scripts run); otherwise the
        # weights at the round's start are kept and re-run.
        off_policy = args.steps_per_generation > args.gradient_accumulation_steps or args.num_iterations > 1
        self.round_start = LaggedWeights(trainable) if args.loss_type == "awm" and off_policy else None

    def on_round_start(self, round_index: int, global_step: int) -> None:
        if round_index > 0:
            self.lagged.pull(lagged_decay(global_step, self.decay_schedule))
        if self.round_start is not None:
            self.round_start.pull(0.0)

    def plan(self, round_index: int) -> RoundPlan:
        sigmas = self.adapter.sigmas(self.args.num_inference_steps)
        units = max(1, int((len(sigmas) - 1) * self.args.timestep_fraction))
        return RoundPlan(sigmas, list(range(units)))

    def sample(
        self,
        prompt_embeds: PromptEmbeddings,
        negative_embeds: PromptEmbeddings | None,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        plan: RoundPlan,
    ) -> CleanRollout:
        sampler = self.lagged.swapped_in() if self.args.loss_type == "nft" else contextlib.nullcontext()
        with sampler:  # NFT samples with its old policy
            clean = sample_ode(self.adapter, prompt_embeds, negative_embeds, latents, plan.sigmas)
        # Training points per sample: a permutation of the grid's noisy levels (the last sigma, 0, is data) and fresh
        # noise, drawn from the sample's own SDE-noise generator, so they do not depend on batching.
        grid = plan.sigmas[:-1].float().cpu()
        units = len(plan.train_steps)
        train_sigmas, train_noise = [], []
        for generator in generators:
            order = torch.randperm(len(grid), generator=generator)[:units]
            train_sigmas.append(grid[order])
            train_noise.append(torch.randn((units, *clean.shape[1:]), generator=generator))
        device = clean.device
        return CleanRollout(clean, torch.stack(train_sigmas).to(device), torch.stack(train_noise).to(device))

    def _velocity(self, batch: TrainBatch, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.adapter.predict_velocity(noisy, sigma, batch.prompt_embeds, batch.negative_embeds)

    @torch.no_grad()
    def _velocity_under(self, weights, batch: TrainBatch, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with weights:
            return self._velocity(batch, noisy, sigma)

    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        noisy, sigma, target = batch.rollout.noised(unit)
        # The no-grad forwards under other weights run first: swapping weights in place after the forward with
        # gradients would change tensors its backward still needs.
        ref_velocity = lagged_velocity = old_velocity = None
        if args.beta > 0:
            ref_velocity = self._velocity_under(self.adapter.reference_policy(), batch, noisy, sigma)
        if args.loss_type == "nft" or args.awm_lagged_weight > 0:
            lagged_velocity = self._velocity_under(self.lagged.swapped_in(), batch, noisy, sigma)
        if self.round_start is not None:
            old_velocity = self._velocity_under(self.round_start.swapped_in(), batch, noisy, sigma)
        velocity = self._velocity(batch, noisy, sigma)

        if args.loss_type == "nft":
            return compute_nft_loss(
                velocity,
                lagged_velocity,  # NFT's old policy
                noisy,
                batch.rollout.final,
                sigma,
                nft_optimality(batch.advantages, args.adv_clip_max),
                nft_beta=args.nft_beta,
                adv_clip_max=args.adv_clip_max,
                ref_velocity=ref_velocity,
                kl_beta=args.beta,
            )

        weighting = dict(weighting=args.awm_weighting, ghuber_power=args.awm_ghuber_power)
        log_likelihood = awm_log_likelihood(velocity, target, sigma, **weighting)
        if old_velocity is None:
            old_log_likelihood = log_likelihood.detach()
        else:
            old_log_likelihood = awm_log_likelihood(old_velocity, target, sigma, **weighting)
        loss, stats = compute_awm_loss(
            log_likelihood, old_log_likelihood, batch.advantages, epsilon=args.epsilon, adv_clip_max=args.adv_clip_max
        )
        penalty, penalty_stats = compute_awm_regularizer(
            velocity,
            ref_velocity=ref_velocity,
            ref_weight=args.beta,
            lagged_velocity=lagged_velocity,
            lagged_weight=args.awm_lagged_weight,
        )
        return loss + penalty, {**stats, **penalty_stats}

    def bind_parameters(self, parameters: dict[str, torch.nn.Parameter], sharded_module: torch.nn.Module) -> None:
        for copy in (self.lagged, self.round_start):
            if copy is not None:
                copy.rebind(parameters, sharded_module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.lagged.state("lagged/")
        if self.round_start is not None:
            state.update(self.round_start.state("round_start/"))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.lagged.load(state, "lagged/")
        if self.round_start is not None:
            self.round_start.load(state, "round_start/")

    def describe(self) -> dict[str, object]:
        return {"loss_type": self.args.loss_type, "lagged_decay_schedule": self.decay_schedule}
