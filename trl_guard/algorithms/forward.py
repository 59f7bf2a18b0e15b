"""The forward-process family: DiffusionNFT (`loss_type="nft"`) and Advantage Weighted Matching (`loss_type="awm"`).

Neither needs the sampler's log-probabilities, so a rollout samples with the deterministic ODE and keeps only the
clean latents. Training noises each clean sample again at noise levels drawn from the rollout's grid (a permutation
per sample, its first `max(1, int(T * timestep_fraction))`), with fresh noise, and fits the flow-matching regression
there; the reward enters as a weight (formulas in :mod:`trl_guard.losses.forward`).

Both keep a *lagged copy* of the trained weights, pulled towards them once per round by `lagged_decay`: NFT's "old"
policy, which samples the rounds and gives `v_old`, and AWM's regulariser target. For LoRA the copy is of the adapter
weights only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..adapters import PipelineAdapter, PromptEmbeddings
from ..ema import EMAWeights, full, like
from ..losses.forward import (
    AWM_WEIGHTINGS,
    FORWARD_LOSS_TYPES,
    LAGGED_DECAY_SCHEDULES,
    awm_log_likelihood,
    compute_awm_loss,
    compute_awm_regularizer,
    compute_nft_loss,
    lagged_decay,
    nft_optimality,
)
from ..rollout import CleanRollout, TrainBatch, sample_ode
from .base import COMMON_CARD_FIELDS, Algorithm, RoundPlan, field_names

if TYPE_CHECKING:
    from ..config import GuardConfig

#: The lagged copy's decay schedule for each loss type when `lagged_decay_schedule` is unset (the official defaults).
DEFAULT_LAGGED_DECAY = {"nft": "nft", "awm": "awm"}


@dataclass
class ForwardProcessArguments:
    r"""
    The `GuardConfig` fields only the forward-process family reads (`loss_type` `"nft"` or `"awm"`; the `awm_*` fields
    only `"awm"`); every other loss type refuses them when they are set away from their defaults.

    Parameters:
        nft_beta (`float`, *optional*, defaults to `1.0`):
            DiffusionNFT's strength of the implicit policies, `v_plus = nft_beta v + (1 - nft_beta) v_old` and
            `v_minus = (1 + nft_beta) v_old - nft_beta v` (`config.beta` in its code: 1.0, 0.1 for OCR and
            multi-reward). `nft` only.
        lagged_decay_schedule (`str`, *optional*):
            How the lagged copy of the weights (NFT's old policy, which samples; AWM's regulariser target) follows the
            trained weights after each round, `copy <- d copy + (1 - d) weights`: `"nft"` (`d = min(0.001 step,
            0.5)`, NFT's default), `"nft_ocr"` (0 until step 75, then `min(0.0075 (step - 75), 0.999)`), `"awm"`
            (`min(0.001 step, 0.3)`) or `"none"` (`d = 0`: the copy is the policy just trained). Defaults to the
            loss type's official schedule. `nft`/`awm` only; under `awm`, only with `awm_lagged_weight > 0`.
        awm_weighting (`str`, *optional*, defaults to `"ghuber"`):
            AWM's surrogate log-likelihood `-w(l, t)` of the flow-matching error `l = MEAN((v - v*)**2)` at noise level
            `t`: `"uniform"` (`l`), `"t"`, `"t_squared"`, `"huber"` or `"ghuber"` (`(t / p)((l + 1e-10)**p - 1e-10**p)`,
            every released config). `awm` only.
        awm_ghuber_power (`float`, *optional*, defaults to `0.25`):
            `p` of the `"ghuber"` weighting. `awm` with `awm_weighting="ghuber"` only.
        awm_lagged_weight (`float`, *optional*, defaults to `1.0`):
            Weight of AWM's penalty `MEAN((v - v_lagged)**2)` towards the lagged copy (`0` skips its forward). `awm`
            only.
    """

    nft_beta: float = 1.0
    lagged_decay_schedule: str | None = field(default=None, metadata={"choices": list(LAGGED_DECAY_SCHEDULES)})
    awm_weighting: str = field(default="ghuber", metadata={"choices": list(AWM_WEIGHTINGS)})
    awm_ghuber_power: float = 0.25
    awm_lagged_weight: float = 1.0


#: The fields of `ForwardProcessArguments` that only AWM reads.
_AWM_ONLY_FIELDS = ("awm_weighting", "awm_ghuber_power", "awm_lagged_weight")


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

    loss_types = FORWARD_LOSS_TYPES
    description = "a forward-process loss, sampled with the ODE"
    method_names = {"nft": "DiffusionNFT", "awm": "AWM"}
    arguments = ForwardProcessArguments
    config_fields = field_names(ForwardProcessArguments)
    rollout_type = CleanRollout
    card_fields = ("loss_type", "nft_beta", "lagged_decay_schedule", "awm_weighting", *COMMON_CARD_FIELDS)
    citation = """@inproceedings{zheng2026diffusionnft,
  title     = {DiffusionNFT: Online Diffusion Reinforcement with Forward Process},
  author    = {Zheng, Kaiwen and Chen, Huayu and Ye, Haotian and others},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  note      = {arXiv:2509.16117}
}
@article{xue2025awm,
  title   = {Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models},
  author  = {Xue, Shuchen and Ge, Chongjian and Zhang, Shilong and Li, Yichen and Ma, Zhi-Ming},
  journal = {arXiv preprint arXiv:2509.25050},
  year    = {2025}
}"""

    @classmethod
    def fields_read(cls, loss_type: str) -> tuple[str, ...]:
        if loss_type == "awm":
            return cls.config_fields
        return tuple(name for name in cls.config_fields if name not in _AWM_ONLY_FIELDS)

    @classmethod
    def unread_settings(cls, args: GuardConfig) -> list[str]:
        # NFT's loss has no ratio, so nothing to clip
        return [f"epsilon={args.epsilon!r}"] if args.loss_type == "nft" and args.epsilon is not None else []

    @classmethod
    def default_epsilon(cls, loss_type: str) -> float | None:
        # AWM's released configs (its ratio is 1 on-policy, so the clip rarely acts); NFT has no ratio
        return 1.0 if loss_type == "awm" else None

    @classmethod
    def validate(cls, args: GuardConfig) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(ForwardProcessArguments)}
        if args.loss_type == "awm":
            # options AWM reads only under another of its settings, refused as the other family's are
            if args.awm_weighting != "ghuber" and args.awm_ghuber_power != defaults["awm_ghuber_power"]:
                raise ValueError(
                    f"awm_weighting={args.awm_weighting!r} does not read awm_ghuber_power={args.awm_ghuber_power!r}: "
                    "only the 'ghuber' weighting has a power. Leave awm_ghuber_power at its default, or set "
                    "awm_weighting='ghuber'."
                )
            if args.awm_lagged_weight == 0 and args.lagged_decay_schedule is not None:
                raise ValueError(
                    f"awm_lagged_weight=0 does not read lagged_decay_schedule={args.lagged_decay_schedule!r}: without "
                    "the penalty towards the lagged copy, AWM never uses the copy. Leave lagged_decay_schedule unset, "
                    "or set awm_lagged_weight > 0."
                )
        if args.nft_beta <= 0:
            raise ValueError(f"nft_beta={args.nft_beta} must be > 0 (DiffusionNFT uses 1.0, or 0.1 for OCR).")
        if args.awm_ghuber_power <= 0 or args.awm_lagged_weight < 0:
            raise ValueError(
                f"awm_ghuber_power={args.awm_ghuber_power} must be > 0 and awm_lagged_weight="
                f"{args.awm_lagged_weight} >= 0."
            )

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
