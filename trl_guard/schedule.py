"""`SDESchedule`: the settings of the sampling SDE, frozen together the way a diffusers scheduler carries its own.

Sampling, the policy loss, the KL penalty and the evaluation KL all need the same three choices (the noise level,
the noise schedule and the form of the log-probability) and must never disagree about them. One immutable object
holds them and offers the step, its noise std, and the per-step weight of each loss, so call sites pass one value
instead of three loose arguments. The math itself stays in the pure functions of `sde.py` and `losses/sde_ratio.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .losses import DANCE_WEIGHTINGS, compute_kl, compute_policy_loss, timestep_weight
from .sde import CPS_LOG_PROBS, NOISE_SCHEDULES, SDEStepOutput, sde_std, sde_step_with_logprob


@dataclass(frozen=True)
class SDESchedule:
    """The reverse-time SDE that samples a flow-matching model (formulas in :mod:`trl_guard.sde`).

    Args:
        noise_level: The noise multiplier (``a`` in Flow-GRPO, ``eta`` in DanceGRPO).
        noise_schedule: ``"flow_grpo"``, ``"dance_grpo"``, ``"linear"`` or ``"cps"``.
        cps_log_prob: Under ``"cps"``, ``"official"`` (Flow-GRPO's variance-free form) or ``"gaussian"``.
        dance_weighting: GRPO-Guard's per-step weight under ``"dance_grpo"``, ``"inverse"`` or ``"paper"``.

    Example:
        >>> import torch
        >>> schedule = SDESchedule(noise_level=0.7)
        >>> sigmas = torch.tensor([1.0, 0.5, 0.0])
        >>> schedule.std(sigmas[:-1], sigmas[1:]).shape
        torch.Size([2])
        >>> float(schedule.timestep_weight(sigmas[:1], sigmas[1:2], "grpo_guard")[0])  # 1 / (-dt)
        2.0
    """

    noise_level: float = 0.7
    noise_schedule: str = "flow_grpo"
    cps_log_prob: str = "official"
    dance_weighting: str = "inverse"

    def __post_init__(self):
        for name, value, allowed in (
            ("noise_schedule", self.noise_schedule, NOISE_SCHEDULES),
            ("cps_log_prob", self.cps_log_prob, CPS_LOG_PROBS),
            ("dance_weighting", self.dance_weighting, DANCE_WEIGHTINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is unknown; use one of {allowed}.")
        if self.noise_level <= 0:
            raise ValueError(f"noise_level={self.noise_level} must be > 0 for a stochastic policy.")

    @classmethod
    def from_config(cls, args: Any) -> SDESchedule:
        """The schedule a `GuardConfig` describes."""
        return cls(args.noise_level, args.noise_schedule, args.cps_log_prob, args.dance_weighting)

    def step(
        self,
        velocity: torch.Tensor,
        sample: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        *,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> SDEStepOutput:
        """One SDE step (sampled, or scoring ``prev_sample``); see :func:`trl_guard.sde.sde_step_with_logprob`."""
        return sde_step_with_logprob(
            velocity,
            sample,
            sigma,
            sigma_next,
            noise_level=self.noise_level,
            noise_schedule=self.noise_schedule,
            cps_log_prob=self.cps_log_prob,
            prev_sample=prev_sample,
            generator=generator,
        )

    def std(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The noise std each step adds (shape of ``sigma``); 0 only at CPS's last step."""
        return sde_std(sigma, sigma_next, noise_level=self.noise_level, noise_schedule=self.noise_schedule)

    def timestep_weight(self, sigma: torch.Tensor, sigma_next: torch.Tensor, loss_type: str) -> torch.Tensor:
        """The per-step loss weight of ``loss_type``; see :func:`trl_guard.losses.timestep_weight`."""
        return timestep_weight(
            sigma,
            sigma_next,
            loss_type=loss_type,
            noise_level=self.noise_level,
            noise_schedule=self.noise_schedule,
            dance_weighting=self.dance_weighting,
        )

    def policy_loss(
        self,
        mean: torch.Tensor,
        old_mean: torch.Tensor,
        prev_sample: torch.Tensor,
        std: torch.Tensor,
        advantages: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        *,
        loss_type: str,
        epsilon: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped policy loss of one step under this schedule; see :func:`trl_guard.losses.compute_policy_loss`."""
        return compute_policy_loss(
            mean,
            old_mean,
            prev_sample,
            std,
            advantages,
            sigma,
            sigma_next,
            loss_type=loss_type,
            epsilon=epsilon,
            noise_level=self.noise_level,
            noise_schedule=self.noise_schedule,
            dance_weighting=self.dance_weighting,
            cps_log_prob=self.cps_log_prob,
        )

    def kl(
        self,
        mean: torch.Tensor,
        ref_mean: torch.Tensor,
        std: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        *,
        kl_type: str,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The KL of one step to the reference policy; see :func:`trl_guard.losses.compute_kl`."""
        return compute_kl(
            mean,
            ref_mean,
            std,
            sigma,
            sigma_next,
            kl_type=kl_type,
            noise_schedule=self.noise_schedule,
            reduction=reduction,
        )
