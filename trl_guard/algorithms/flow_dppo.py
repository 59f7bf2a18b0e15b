"""Flow-DPPO (`loss_type="flow_dppo"`): the SDE-ratio policy gradient with a divergence mask instead of a ratio clip.

PPO's ratio clip barely binds on a diffusion SDE step (the ratio is a per-element mean, shifted below 1 by an amount
that depends on the step; :mod:`trl_guard.losses.sde_ratio`). Flow-DPPO (Divergence Proximal Policy Optimization,
Ping et al., arXiv 2606.11025; official code Tencent-Hunyuan/UniRL ``unirl/algorithms/flowdppo.py``) drops the clip and
bounds the update with the exact KL between the old and the new step Gaussians instead: a sample whose step moved
further than a threshold stops pushing in the direction its advantage pushes, while a corrective update keeps its full
gradient. It shares everything else with the SDE family (rollouts, recorded old means, the Flow-GRPO log-ratio, steps
and windows), so it subclasses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..losses.sde_ratio import policy_log_ratio
from ..metrics import Stat
from ..rollout import TrainBatch
from ..sde import _mean_per_sample, _safe_divide
from .base import COMMON_CARD_FIELDS, field_names
from .sde_ratio import SDERatioAlgorithm

if TYPE_CHECKING:
    from ..config import GuardConfig


def flow_dppo_kl_score(
    mean: torch.Tensor, old_mean: torch.Tensor, std: torch.Tensor, *, normalize: bool = True
) -> torch.Tensor:
    """Flow-DPPO's per-sample divergence score (B,) of one step, which its mask compares with the threshold.

    ``normalize=True`` (UniRL's ``add_kl_coefficient``): ``MEAN((mean - old_mean)**2 / (2 std**2))``, the exact KL
    between the old and new step Gaussians (which share ``std``) divided by the number of latent elements: a mean,
    not a sum, so that one threshold serves every resolution. ``normalize=False``: ``MEAN((mean - old_mean)**2) / 2``.
    A noiseless step (CPS's last) scores 0.
    """
    squared = (mean - old_mean) ** 2
    denominator = 2 * std**2 if normalize else torch.full_like(std, 2.0)
    return _mean_per_sample(_safe_divide(squared, denominator.to(squared.dtype)))


def compute_flow_dppo_loss(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    prev_sample: torch.Tensor,
    std: torch.Tensor,
    advantages: torch.Tensor,
    *,
    kl_threshold: float,
    kl_normalize: bool = True,
    noise_schedule: str = "flow_grpo",
    cps_log_prob: str = "official",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPPO's masked policy loss of one sampling step, averaged over the batch.

    Per sample ``i``, with ``r = exp(log r)`` Flow-GRPO's ratio (the Gaussian log-density as a per-element MEAN, see
    :func:`trl_guard.losses.policy_log_ratio`) and ``kl`` the score of :func:`flow_dppo_kl_score`::

        high  = kl >= kl_threshold
        mask  = high & ((r > 1) & (A > 0)  |  (r < 1) & (A < 0))     # detached
        loss  = MEAN_i where(mask, 0, -A r)

    as UniRL's ``_flowdppo_kl_adv_loss``: no ratio clip at all. A step that moved further than the threshold stops
    pushing in the direction its advantage pushes (the ratio already moved that way), while a high-divergence update
    that corrects (``A > 0`` with ``r < 1``, ``A < 0`` with ``r > 1``) keeps its whole gradient; ``r == 1`` or
    ``A == 0`` is never masked. Masked samples count in the mean as zeros (the mask dilutes the gradient, it is not
    renormalised). The gradient flows through ``mean`` into ``r`` only: ``old_mean``, ``std``, the mask and ``A`` are
    constants. `torch.where` rather than a product, so an overflowing ratio cannot turn into ``inf * 0``.

    On-policy (``mean == old_mean``): ``kl = 0``, ``r = 1``, nothing is masked, and the gradient is
    ``-MEAN_i A_i grad log p_i``, Flow-GRPO's on-policy gradient.

    Args:
        mean: Current policy's mean of ``prev_sample`` (B, ...); carries the gradient.
        old_mean: Mean under the policy that sampled ``prev_sample`` (B, ...).
        prev_sample: The recorded next latents (B, ...).
        std: The step's noise std, broadcastable to the sample.
        advantages: Per-sample advantages (B,).
        kl_threshold: ``tau``, > 0: a score at or above it arms the mask (UniRL's ``kl_mask_threshold``, 1e-5).
        kl_normalize: Divide the mean shift by the step's noise std (the exact KL); see :func:`flow_dppo_kl_score`.
        noise_schedule: The SDE's noise schedule (for the log-density's form under ``"cps"``).
        cps_log_prob: Under ``"cps"``, ``"official"`` or ``"gaussian"``.

    Returns:
        ``(loss, stats)``: the scalar loss and detached diagnostics: ``log_ratio_mean``, ``log_ratio_std``,
        ``mask_frac_pos`` / ``mask_frac_neg`` (fraction of samples masked with ``A > 0`` / ``A < 0``) and
        ``kl_score`` (the batch's mean score).

    Example:
        >>> import torch
        >>> x_next, mean, std = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.full((4, 1, 1, 1), 0.3)
        >>> loss, stats = compute_flow_dppo_loss(mean, mean, x_next, std, torch.tensor([1.0, -1.0, 0.5, -0.5]),
        ...     kl_threshold=1e-5)
        >>> float(loss), float(stats["kl_score"]), float(stats["mask_frac_pos"])  # on-policy: -MEAN(A), no mask
        (0.0, 0.0, 0.0)
    """
    if kl_threshold <= 0:
        raise ValueError(f"kl_threshold must be > 0, got {kl_threshold}.")
    advantages = advantages.to(device=mean.device, dtype=mean.dtype)
    std = std.to(device=mean.device, dtype=mean.dtype)
    log_ratio = policy_log_ratio(
        mean,
        old_mean,
        prev_sample,
        std,
        loss_type="flow_grpo",
        noise_schedule=noise_schedule,
        cps_log_prob=cps_log_prob,
    )
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        kl = flow_dppo_kl_score(mean.detach(), old_mean, std, normalize=kl_normalize)
        high = kl >= kl_threshold
        masked_pos = high & (ratio > 1) & (advantages > 0)
        masked_neg = high & (ratio < 1) & (advantages < 0)
        keep = ~(masked_pos | masked_neg)
    loss = torch.where(keep, -advantages * ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device)).mean()
    with torch.no_grad():
        stats = {
            Stat.LOG_RATIO_MEAN: log_ratio.mean(),
            Stat.LOG_RATIO_STD: log_ratio.std(unbiased=False),
            Stat.MASK_FRAC_POS: masked_pos.to(ratio.dtype).mean(),
            Stat.MASK_FRAC_NEG: masked_neg.to(ratio.dtype).mean(),
            Stat.KL_SCORE: kl.mean(),
        }
    return loss, stats


@dataclass
class FlowDPPOArguments:
    r"""
    The `GuardConfig` fields only Flow-DPPO reads (`loss_type="flow_dppo"`); every other loss type refuses them when
    they are set away from their defaults. Flow-DPPO also reads the SDE family's fields (noise schedule, steps, window,
    `recompute_old_means`; not `dance_weighting`), and refuses `epsilon`: it has no ratio clip.

    Parameters:
        dppo_kl_threshold (`float`, *optional*, defaults to `1e-5`):
            Flow-DPPO's mask threshold `tau` (UniRL's `kl_mask_threshold`, its SD3.5 value): a sample whose step's KL
            score (below) is at or above it stops pushing in the direction of its advantage (`A > 0` with ratio
            `> 1`, `A < 0` with ratio `< 1`). The score is a mean over latent elements, so the threshold does not
            depend on the resolution. Must be > 0.
        dppo_kl_normalize (`bool`, *optional*, defaults to `True`):
            The KL score: `True` (UniRL's `add_kl_coefficient`) divides the mean shift by the step's noise std,
            `MEAN((mean - old_mean)**2 / (2 std**2))`, the exact Gaussian KL averaged over elements; `False` uses
            `MEAN((mean - old_mean)**2) / 2`.
    """

    dppo_kl_threshold: float = 1e-5
    dppo_kl_normalize: bool = True


class FlowDPPOAlgorithm(SDERatioAlgorithm):
    """Flow-DPPO on recorded SDE steps: the unclipped ratio loss, masked where the step's KL to the old policy is
    high and the ratio moved the way the advantage pushes."""

    loss_types = ("flow_dppo",)
    description = "Flow-DPPO's KL-masked SDE-ratio loss"
    method_names = {"flow_dppo": "Flow-DPPO"}
    arguments = FlowDPPOArguments
    config_fields = field_names(FlowDPPOArguments)
    card_fields = (
        "loss_type",
        *COMMON_CARD_FIELDS,
        "dppo_kl_threshold",
        "dppo_kl_normalize",
        "noise_schedule",
        "noise_level",
        "init_same_noise",
        "sde_window_size",
        "recompute_old_means",
    )
    citation = """@article{ping2026flowdppo,
  title   = {Flow-DPPO: Divergence Proximal Policy Optimization for Flow Matching Models},
  author  = {Ping, Bowen and Zhou, Xiangxin and Qi, Penghui and Luo, Minnan and Bo, Liefeng and Pang, Tianyu},
  journal = {arXiv preprint arXiv:2606.11025},
  year    = {2026}
}
@article{liu2025flowgrpo,
  title   = {Flow-GRPO: Training Flow Matching Models via Online RL},
  author  = {Liu, Jie and others},
  journal = {arXiv preprint arXiv:2505.05470},
  year    = {2025}
}"""

    @classmethod
    def fields_read(cls, loss_type: str) -> tuple[str, ...]:
        # the SDE family's rollout and step fields, but not GRPO-Guard's per-step weight (Flow-DPPO weighs steps alike)
        sde_fields = tuple(name for name in SDERatioAlgorithm.config_fields if name != "dance_weighting")
        return (*sde_fields, *cls.config_fields)

    @classmethod
    def unread_settings(cls, args: GuardConfig) -> list[str]:
        # the mask replaces the clip: a clip range would be silently ignored
        return [f"epsilon={args.epsilon!r}"] if args.epsilon is not None else []

    @classmethod
    def default_epsilon(cls, loss_type: str) -> float | None:
        return None

    @classmethod
    def validate(cls, args: GuardConfig) -> None:
        super().validate(args)
        if not args.dppo_kl_threshold > 0:
            raise ValueError(
                f"dppo_kl_threshold={args.dppo_kl_threshold} must be > 0: it is the KL score at which Flow-DPPO's "
                "mask starts to act (UniRL's kl_mask_threshold, 1e-5 in its SD3.5 recipe)."
            )

    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        _, next_latents, old_mean, sigma, sigma_next = batch.rollout.step(unit)
        mean, std = self._mean(batch, unit)
        loss, stats = compute_flow_dppo_loss(
            mean,
            old_mean,
            next_latents,
            std,
            batch.advantages,
            kl_threshold=args.dppo_kl_threshold,
            kl_normalize=args.dppo_kl_normalize,
            noise_schedule=args.noise_schedule,
            cps_log_prob=args.cps_log_prob,
        )
        if args.beta > 0:
            # an optional penalty to the frozen reference (another UniRL commit's `beta` is kl_type="exact")
            size = len(batch)
            with torch.no_grad(), self.adapter.reference_policy():
                ref_mean, _ = self._mean(batch, unit)
            kl = self.schedule.kl(
                mean, ref_mean, std, sigma.expand(size), sigma_next.expand(size), kl_type=args.kl_type
            )
            loss = loss + args.beta * kl
            stats[Stat.KL] = kl.detach()
        return loss, stats


__all__ = ["FlowDPPOAlgorithm", "FlowDPPOArguments", "compute_flow_dppo_loss", "flow_dppo_kl_score"]
