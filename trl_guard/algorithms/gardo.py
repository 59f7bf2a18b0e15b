"""GARDO (`loss_type="gardo"` on Flow-GRPO, `loss_type="gardo_nft"` on DiffusionNFT): gated and adaptive
regularisation with diversity-aware optimisation against reward hacking.

GARDO (He et al., arXiv 2512.24138; official code tinnerhrhe/GARDO, ``scripts/train_sd3_grpo_gardo.py`` and
``scripts/train_sd3_nft_gardo.py``, ``flow_grpo/stat_tracking.py``) changes three things of the loss it is put on,
and nothing else:

- **Diversity-aware advantage.** ``A_i = (R_i - m) w_i`` with ``m`` the prompt group's mean reward, no division by a
  standard deviation, and ``w_i = d_i / mean_group(d)`` for the samples at or above the group's mean (``w_i = 1``
  below it), ``d_i`` the cosine distance from sample ``i``'s image features to its nearest neighbour in the group
  (DINOv3 ViT-L/16 features officially): a good sample unlike the others counts more.
- **Uncertainty-gated KL.** Only the samples whose main reward and auxiliary rewards disagree most carry the KL
  penalty: with descending ranks over the round (1 = best), ``U_i = rank_main_i - mean_k rank_aux_k,i``, and the
  samples with ``U`` above the ``1 - f`` quantile of the non-negative ``U`` are gated, ``f`` adapted round by round
  (0.1 to start, x1.1 when the mean non-negative ``U`` exceeds the last 20 rounds', x0.9 when it falls below them,
  kept in [0.02, 0.2]).
- **Adaptive reference.** The KL is to a copy of the trained weights, not to the base model, copied afresh at the
  start of a round when an optimizer step's KL exceeded `gardo_reset_kl_threshold` or after more than
  `gardo_reset_interval` rounds without a refresh.

The two loss types share this module's mixin and `GardoArguments`; the policy loss under them is Flow-GRPO's clipped
ratio (`SDERatioAlgorithm`) or DiffusionNFT's (`ForwardProcessAlgorithm`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..losses.advantages import compute_multi_reward_advantages
from ..losses.forward import compute_nft_loss, nft_optimality
from ..losses.sde_ratio import compute_kl, compute_policy_loss
from ..metrics import Stat
from ..rollout import CleanRollout, TrainBatch
from ..sde import _mean_per_sample
from .base import COMMON_CARD_FIELDS, field_names
from .forward import ForwardProcessAlgorithm, LaggedWeights
from .sde_ratio import SDERatioAlgorithm

if TYPE_CHECKING:
    from ..adapters import PipelineAdapter, PromptEmbeddings
    from ..config import GuardConfig

#: The official feature extractor, DINOv3 ViT-L/16 pretrained on LVD-1689M, as a transformers checkpoint (the official
#: code loads the same weights through timm, ``vit_large_patch16_dinov3.lvd1689m``). A gated Hub repository: accept
#: its licence on the Hub, or give a local copy in `gardo_feature_model`.
DEFAULT_FEATURE_MODEL = "facebook/dinov3-vitl16-pretrain-lvd1689m"
#: The images' side after preprocessing, and the ImageNet statistics they are normalised with (timm's data config of
#: the official DINOv3: 256 px, crop fraction 1, bicubic).
FEATURE_IMAGE_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The official ``RiskCompensator``'s constants: the range the gated fraction is kept in, its relative step and the
#: number of past rounds it compares with.
GATE_FRACTION_RANGE = (0.02, 0.2)
GATE_FRACTION_STEP = 0.1
GATE_WINDOW = 20
#: The reference's refresh threshold when `gardo_reset_kl_threshold` is unset (``config.kl_thres`` of the GRPO
#: configs; the NFT script's hard-coded start, which it then adapts, see `adapt_nft_threshold`).
DEFAULT_RESET_KL_THRESHOLD = {"gardo": 3e-4, "gardo_nft": 0.15}
#: The key of the uncertainty gate in `TrainBatch.extras`.
GATE = "gardo_gate"

#: Diagnostics the GARDO losses return besides the wrapped loss's own.
GATED = "gardo_gated"  # fraction of the micro-batch's samples the gate picked
GATE_FRACTION = "gardo_gate_fraction"  # the adaptive target fraction f of the round


# ---- (A) the diversity-aware advantage ------------------------------------------------------------------------------
def nearest_neighbour_distances(features: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Per sample (N,), float64: the cosine distance ``1 - clip(cos, -1, 1)`` from its features to the nearest other
    sample of its prompt group (consecutive runs of ``num_generations``).

    Features are made finite (NaN to 0, as the official ``np.nan_to_num``) and L2-normalised; an all-zero row stays
    zero (distance 1 to everything) where the official division would give NaN.
    """
    if features.ndim != 2 or features.shape[0] % num_generations != 0 or num_generations < 2:
        raise ValueError(
            f"features must be (N, D) with N a multiple of num_generations={num_generations} >= 2, got "
            f"{tuple(features.shape)}."
        )
    unit = torch.nn.functional.normalize(torch.nan_to_num(features.double()), dim=1)
    grouped = unit.view(-1, num_generations, unit.shape[1])
    distances = 1 - (grouped @ grouped.transpose(1, 2)).clamp(-1, 1)
    distances.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # the minimum is over the other samples
    return distances.min(dim=2).values.reshape(-1)


def gardo_advantages(
    rewards: torch.Tensor, num_generations: int, features: torch.Tensor | None = None
) -> torch.Tensor:
    """GARDO's diversity-aware advantages (N,), float64, for rewards laid out as consecutive groups.

    With ``m`` the group's mean reward and ``d`` the nearest-neighbour distances of
    :func:`nearest_neighbour_distances`::

        w_i = 1                        if R_i - m < 0
              d_i / mean_group(d)      otherwise
        A_i = (R_i - m) w_i            no division by a standard deviation

    as the official ``PerPromptStatTracker.update(type='gardo')``. Without ``features`` (`gardo_diversity=False`)
    ``A_i = R_i - m``. When every sample of a group has the same features, ``mean_group(d) = 0`` and the official
    gives NaN to the samples at or above the mean; here ``w = 1`` for that group. The caller clips ``A``.

    Example:
        >>> import torch
        >>> # sample 2 looks like sample 0 (distance 0); sample 3 is at distance 1 from its nearest, twice the mean
        >>> rewards = torch.tensor([1.0, 2.0, 4.0, 5.0])
        >>> features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
        >>> gardo_advantages(rewards, 4, features).tolist()
        [-2.0, -1.0, 0.0, 4.0]
    """
    if rewards.ndim != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(f"rewards must be (N,) with N a multiple of num_generations={num_generations}.")
    grouped = rewards.double().view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if features is None:
        return centred.reshape(-1)
    distances = nearest_neighbour_distances(features, num_generations).view(-1, num_generations)
    mean = distances.mean(dim=1, keepdim=True)
    scaled = distances / torch.where(mean > 0, mean, torch.ones_like(mean))
    weights = torch.where((centred < 0) | (mean <= 0), torch.ones_like(scaled), scaled)
    return (centred * weights).reshape(-1)


# ---- (B) the uncertainty gate ---------------------------------------------------------------------------------------
def descending_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (N,), float64: 1 for the highest value, N for the lowest; ties in order of appearance (a stable sort,
    where the official's unstable sort breaks them arbitrarily)."""
    order = torch.sort(values.double(), descending=True, stable=True).indices
    ranks = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=values.device)
    return ranks


def gardo_uncertainty(main: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """GARDO's uncertainty (N,) over a round: ``U_i = rank_main_i - mean_k rank_aux_k,i`` with the descending ranks
    of :func:`descending_ranks` (the official "uncertainty estimation", with its two auxiliary rewards averaged).

    Sign: rank 1 is the best, so ``U_i > 0`` when the main reward ranks sample ``i`` *worse* than the auxiliary
    rewards do, and ``U_i < 0`` when the main reward ranks it better (a sample the main reward likes and the others do
    not). The gate picks the largest ``U``: the official code does so, and this function keeps its sign.

    Example:
        >>> import torch
        >>> main, aux = torch.tensor([3.0, 2.0, 1.0]), torch.tensor([[1.0], [2.0], [3.0]])
        >>> gardo_uncertainty(main, aux).tolist()  # main ranks sample 2 last, the auxiliary reward first
        [-2.0, 0.0, 2.0]
    """
    if aux.ndim == 1:
        aux = aux.unsqueeze(1)
    if aux.shape[0] != main.numel() or aux.shape[1] < 1:
        raise ValueError(f"aux must be (N, K >= 1) for N={main.numel()} samples, got {tuple(aux.shape)}.")
    aux_ranks = torch.stack([descending_ranks(aux[:, k]) for k in range(aux.shape[1])], dim=1)
    return descending_ranks(main) - aux_ranks.mean(dim=1)


def gate_threshold(uncertainty: torch.Tensor, fraction: float) -> float:
    """The gate's threshold: numpy's ``percentile(U[U >= 0], 100 - 100 fraction)`` (linear interpolation). The gate
    is ``U > threshold`` (strict), so about the top ``fraction`` of the non-negative ``U``. ``U`` sums to 0 over a
    round (both rank sets sum to ``N (N + 1) / 2``), so some ``U`` is always non-negative."""
    values = uncertainty.detach().double().cpu().numpy()
    return float(np.percentile(values[values >= 0], 100 - fraction * 100))


class GateFraction:
    """The official ``RiskCompensator``: the fraction of the non-negative uncertainties gated each round.

    Each round, with ``u`` the mean non-negative uncertainty: the first round sets ``f = base``; later ones multiply
    ``f`` by 1.1 when ``u`` exceeds every ``u`` of the last 20 rounds, by 0.9 when it is below all of them; ``f`` is
    then kept in [0.02, 0.2] and ``u`` joins the window.

    Example:
        >>> gate = GateFraction(0.1)
        >>> [round(gate.update(u), 4) for u in (5.0, 6.0, 5.5, 4.0)]
        [0.1, 0.11, 0.11, 0.099]
    """

    def __init__(self, base: float):
        self.base = base
        self.fraction = base
        self.window: list[float] = []

    def update(self, mean_uncertainty: float) -> float:
        if not self.window:
            self.fraction = self.base
        elif mean_uncertainty > max(self.window):
            self.fraction *= 1 + GATE_FRACTION_STEP
        elif mean_uncertainty < min(self.window):
            self.fraction *= 1 - GATE_FRACTION_STEP
        self.fraction = float(np.clip(self.fraction, *GATE_FRACTION_RANGE))
        self.window = [*self.window, float(mean_uncertainty)][-GATE_WINDOW:]
        return self.fraction


def gated_mean(values: torch.Tensor, gate: torch.Tensor, *, when_none_gated: str) -> torch.Tensor:
    """The mean of ``values`` (B,) over the gated samples; when none of them is gated, 0 (``"zero"``, GARDO on
    Flow-GRPO: no KL) or the mean over all (``"all"``, GARDO on NFT). Division-safe: no NaN in value or gradient."""
    weights = gate.to(device=values.device, dtype=values.dtype)
    if when_none_gated == "all":
        weights = torch.where(weights.sum() > 0, weights, torch.ones_like(weights))
    elif when_none_gated != "zero":
        raise ValueError(f"when_none_gated must be 'zero' or 'all', got {when_none_gated!r}.")
    return (values * weights).sum() / weights.sum().clamp(min=1)


# ---- the losses -----------------------------------------------------------------------------------------------------
def compute_gardo_loss(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    prev_sample: torch.Tensor,
    std: torch.Tensor,
    advantages: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    gate: torch.Tensor,
    *,
    epsilon: float,
    beta: float = 0.0,
    ref_mean: torch.Tensor | None = None,
    kl_type: str = "flow_grpo",
    noise_level: float = 0.7,
    noise_schedule: str = "flow_grpo",
    cps_log_prob: str = "official",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GARDO on Flow-GRPO: the loss of one sampling step, as ``train_sd3_grpo_gardo.py`` computes it.

    With ``r`` Flow-GRPO's ratio (:func:`trl_guard.losses.compute_policy_loss`, ``loss_type="flow_grpo"``), ``A``
    the (already clipped) GARDO advantages and ``G`` the gated samples of the micro-batch::

        loss = E_B[max(-A r, -A clip(r, 1 - epsilon, 1 + epsilon))]
               + beta (1/|G|) sum_{i in G} MEAN_d (mean_i - ref_mean_i)**2 / (2 s**2)      (only when G is not empty)

    ``s`` the step's diffusion coefficient (``std = s sqrt(-dt)``): the KL is `compute_kl`'s per-sample
    ``kl_type="flow_grpo"`` form (``"exact"`` divides by ``std**2`` instead), averaged over the gated samples only, so
    each carries ``beta / |G|``, and absent from a micro-batch without one. ``ref_mean`` is the adaptive reference's
    mean. The official's per-sample weight ``std_dev_t / mean_batch(std_dev_t)`` is 1 (every sample of a micro-batch
    is at the same step) and left out.

    On-policy with the reference just refreshed (``mean == old_mean == ref_mean``): the KL and its gradient are 0,
    ``r = 1``, and the gradient is ``-E_B[A grad log p]``: REINFORCE with the diversity-shaped advantage.

    Returns:
        ``(loss, stats)``: the policy loss's statistics, ``gardo_gated`` (the gated fraction of the micro-batch) and,
        with ``ref_mean``, ``kl`` (the gated mean above, 0 when nothing is gated).
    """
    loss, stats = compute_policy_loss(
        mean,
        old_mean,
        prev_sample,
        std,
        advantages,
        sigma,
        sigma_next,
        loss_type="flow_grpo",
        epsilon=epsilon,
        noise_level=noise_level,
        noise_schedule=noise_schedule,
        cps_log_prob=cps_log_prob,
    )
    gate = gate.to(device=mean.device, dtype=torch.bool)
    stats[GATED] = gate.to(mean.dtype).mean()
    if ref_mean is not None:
        per_sample = compute_kl(
            mean,
            ref_mean.detach(),
            std,
            sigma,
            sigma_next,
            kl_type=kl_type,
            noise_schedule=noise_schedule,
            reduction="none",
        )
        kl = gated_mean(per_sample, gate, when_none_gated="zero")
        loss = loss + beta * kl
        stats[Stat.KL] = kl.detach()
    return loss, stats


def compute_gardo_nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    noisy_latents: torch.Tensor,
    clean_latents: torch.Tensor,
    sigma: torch.Tensor,
    optimality: torch.Tensor,
    gate: torch.Tensor,
    *,
    nft_beta: float,
    adv_clip_max: float = 5.0,
    beta: float = 0.0,
    ref_velocity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GARDO on DiffusionNFT: the loss at one noise level, as ``train_sd3_nft_gardo.py`` computes it.

    DiffusionNFT's loss (:func:`trl_guard.losses.compute_nft_loss`, with ``r_hat`` from the GARDO advantages) plus the
    velocity-space KL to the adaptive reference over the gated samples ``G`` of the micro-batch::

        loss = nft_loss + beta (1/|G|) sum_{i in G} MEAN_d (v_i - v_ref_i)**2

    and, when no sample of the micro-batch is gated, the mean over **all** its samples instead (the official NFT
    script's rule, where its Flow-GRPO script drops the KL). In float64, as the NFT loss.

    On-policy with the reference just refreshed (``v == v_old == v_ref``): the KL and its gradient are 0 and the
    gradient is NFT's, ``(1/B) sum_i clip(A_i, -M, M) grad L_i``.
    """
    loss, stats = compute_nft_loss(
        velocity,
        old_velocity,
        noisy_latents,
        clean_latents,
        sigma,
        optimality,
        nft_beta=nft_beta,
        adv_clip_max=adv_clip_max,
    )
    gate = gate.to(device=velocity.device, dtype=torch.bool)
    stats[GATED] = gate.to(torch.float64).mean()
    if ref_velocity is not None:
        per_sample = _mean_per_sample((velocity.to(torch.float64) - ref_velocity.detach().to(torch.float64)) ** 2)
        kl = gated_mean(per_sample, gate, when_none_gated="all")
        loss = loss + beta * kl
        stats[Stat.KL] = kl.detach()
    return loss, stats


# ---- the image features ---------------------------------------------------------------------------------------------
class ImageFeatures:
    """Feature vectors of images from a transformers vision backbone (`gardo_feature_model`), loaded on first use.

    Each image is resized (shorter side to 256 px, bicubic), centre-cropped to 256 x 256 and normalised with ImageNet's
    statistics, as timm's data config of the official DINOv3 does; the feature is the mean of the last layer's patch
    tokens (class and register tokens left out), timm's default pooling of that model (a backbone without patch tokens
    gives its `pooler_output`). A video (a list of frames) gives the mean of its frames' features. Float32, no
    gradients.
    """

    def __init__(self, model_name_or_path: str, device: torch.device | str):
        self.model_name_or_path = model_name_or_path
        self.device = torch.device(device)
        self.model: Any = None

    def _load(self) -> Any:
        if self.model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.model_name_or_path, dtype=torch.float32)
            self.model = model.eval().requires_grad_(False).to(self.device)
        return self.model

    @staticmethod
    def preprocess(images: Sequence[Any]) -> torch.Tensor:
        """PIL images to a normalised (B, 3, 256, 256) float32 batch."""
        from PIL import Image

        size, tensors = FEATURE_IMAGE_SIZE, []
        for image in images:
            image = image.convert("RGB")
            scale = size / min(image.size)
            width, height = max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))
            image = image.resize((width, height), Image.BICUBIC)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            tensors.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (torch.stack(tensors) - mean) / std

    @torch.no_grad()
    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        model = self._load()
        frames, owners = [], []
        for index, image in enumerate(images):
            items = list(image) if isinstance(image, (list, tuple)) else [image]
            frames.extend(items)
            owners.extend([index] * len(items))
        output = model(pixel_values=self.preprocess(frames).to(self.device))
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is not None and hidden.ndim == 3:
            prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
            features = hidden[:, prefix:].mean(dim=1)
        else:
            features = output.pooler_output.flatten(1)
        owner = torch.tensor(owners, device=features.device)
        summed = torch.zeros(len(images), features.shape[1], device=features.device).index_add_(0, owner, features)
        counts = torch.bincount(owner, minlength=len(images)).clamp(min=1).unsqueeze(1)
        return (summed / counts).float()


# ---- the arguments --------------------------------------------------------------------------------------------------
@dataclass
class GardoArguments:
    r"""
    The `GuardConfig` fields only GARDO reads (`loss_type` `"gardo"`, on Flow-GRPO's clipped ratio, and
    `"gardo_nft"`, on DiffusionNFT); every other loss type refuses them when they are set away from their defaults.
    GARDO's KL weight is `beta` (0.04 in its SD3.5 configs), to an adaptive copy of the trained weights, not to the
    base model; its advantages are never divided by a standard deviation, so `scale_rewards` and
    `multi_reward_normalization` are refused.

    Parameters:
        gardo_aux_rewards (`list[str]`, *optional*):
            Names of reward functions (as the trainer logs them: a built-in's name, a function's `__name__`) that only
            feed the uncertainty gate: their ranks over the round are compared with the main reward's, and the
            samples ranked most differently carry the KL. The main reward is the weighted sum of the other reward
            functions. The official runs use two, `aesthetic` and ImageReward (`image_reward` here). Needed when
            `beta > 0`.
        gardo_gate_fraction (`float`, *optional*, defaults to `0.1`):
            The gated fraction of the non-negative uncertainties in the first round (the official `RiskCompensator`'s
            base); later rounds adapt it (x1.1 / x0.9, within [0.02, 0.2], against the last 20 rounds). In [0.02,
            0.2].
        gardo_reset_kl_threshold (`float`, *optional*):
            The reference is refreshed (a copy of the trained weights) at the start of the next round once an
            optimizer step's KL, averaged over its units and processes, exceeds this. Defaults to `3e-4` for
            `"gardo"` (the SD3.5 configs' `kl_thres`, which they say to tune per task) and `0.15` for `"gardo_nft"`,
            which then adapts it at each refresh as the official NFT script does.
        gardo_reset_interval (`int`, *optional*, defaults to `15`):
            The reference is also refreshed when more than this many rounds passed since its last refresh.
        gardo_diversity (`bool`, *optional*, defaults to `True`):
            Scale the advantages of the samples at or above their group's mean by their nearest-neighbour feature
            distance in the group, relative to the group's mean distance. `False`: plain `R - mean_group(R)`, and no
            feature model is loaded.
        gardo_feature_model (`str`, *optional*, defaults to `"facebook/dinov3-vitl16-pretrain-lvd1689m"`):
            The vision backbone whose features measure diversity: a Hub id or local folder loaded with
            `transformers.AutoModel.from_pretrained` (the default, the official DINOv3 ViT-L/16, is a gated Hub
            repository). Its mean patch token, on 256 px crops, is each image's feature.
    """

    gardo_aux_rewards: list[str] | None = None
    gardo_gate_fraction: float = 0.1
    gardo_reset_kl_threshold: float | None = None
    gardo_reset_interval: int = 15
    gardo_diversity: bool = True
    gardo_feature_model: str = DEFAULT_FEATURE_MODEL


def adapt_nft_threshold(threshold: float, rounds_since_refresh: int, interval: int) -> float:
    """The official NFT script's adaptation of the refresh threshold at each refresh: ``-0.01`` (floor 0.1) after
    more than ``interval`` rounds, ``+0.01`` (capped at 0.05) after fewer than 5. The cap is below the floor, as
    written there: one quick refresh sets it to 0.05, a slow one then to 0.1."""
    if rounds_since_refresh > interval:
        threshold = max(threshold - 0.01, 0.1)
    if rounds_since_refresh < 5:
        threshold = min(threshold + 0.01, 0.05)
    return threshold


# ---- the algorithms -------------------------------------------------------------------------------------------------
class _Gardo:
    """What GARDO adds to the loss family it is mixed into: the training signal (diversity-aware advantages and the
    gate), the adaptive reference with its refresh schedule, and their state."""

    arguments = GardoArguments
    config_fields = field_names(GardoArguments)
    citation = """@misc{he2025gardo,
  title         = {GARDO: Reinforcing Diffusion Models without Reward Hacking},
  author        = {He, Haoran and Ye, Yuxiao and Liu, Jie and Liang, Jiajun and Wang, Zhiyong and Yuan, Ziyang and
                   Wang, Xintao and Mao, Hangyu and Wan, Pengfei and Pan, Ling},
  year          = {2025},
  eprint        = {2512.24138},
  archivePrefix = {arXiv}
}"""

    #: Whether the refresh threshold adapts at each refresh (the official NFT script's rule).
    _adapts_threshold = False
    #: Shared settings GARDO does not read, and why (refused when set away from their defaults).
    _UNREAD = {
        "scale_rewards": ("group", "GARDO's advantages are never divided by a standard deviation"),
        "multi_reward_normalization": ("sum", "GARDO's main reward is the weighted sum of the non-auxiliary rewards"),
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
        super().validate(args)  # the wrapped family's checks
        low, high = GATE_FRACTION_RANGE
        if not low <= args.gardo_gate_fraction <= high:
            raise ValueError(
                f"gardo_gate_fraction={args.gardo_gate_fraction} must be in [{low}, {high}], the range the official "
                "code keeps the gated fraction in (it starts at 0.1)."
            )
        if args.gardo_reset_kl_threshold is not None and not args.gardo_reset_kl_threshold > 0:
            raise ValueError(
                f"gardo_reset_kl_threshold={args.gardo_reset_kl_threshold} must be > 0, or unset for the official "
                f"default ({DEFAULT_RESET_KL_THRESHOLD[args.loss_type]} for loss_type={args.loss_type!r})."
            )
        if args.gardo_reset_interval < 1:
            raise ValueError(f"gardo_reset_interval={args.gardo_reset_interval} must be >= 1 (the official uses 15).")
        aux = args.gardo_aux_rewards or []
        if not all(isinstance(name, str) and name for name in aux) or len(set(aux)) != len(aux):
            raise ValueError(f"gardo_aux_rewards={aux!r} must be distinct reward function names.")
        if args.beta > 0 and not aux:
            raise ValueError(
                f"beta={args.beta} with loss_type={args.loss_type!r} needs gardo_aux_rewards: GARDO's KL acts on the "
                "samples its uncertainty gate picks, which compares the main reward's ranks with auxiliary rewards'. "
                "Name at least one reward function there (the official runs use aesthetic and image_reward), or set "
                "beta=0."
            )
        if args.gardo_diversity:
            from ..preflight import check_model_path

            try:
                check_model_path(args.gardo_feature_model)
            except FileNotFoundError:
                raise ValueError(
                    f"gardo_feature_model={args.gardo_feature_model!r} looks like a local path, and it does not exist. "
                    f"Give a folder written by `save_pretrained`, a Hub id (default {DEFAULT_FEATURE_MODEL!r}), or "
                    "set gardo_diversity=False."
                ) from None

    @classmethod
    def check_setup(cls, args: GuardConfig, reward_names: Sequence[str]) -> None:
        aux = list(args.gardo_aux_rewards or [])
        unknown = [name for name in aux if name not in reward_names]
        if unknown:
            raise ValueError(
                f"gardo_aux_rewards names {unknown}, which are not among the reward functions {list(reward_names)}: "
                "use the names the rewards are logged under (rewards/<name>)."
            )
        if len(aux) == len(reward_names):
            raise ValueError(
                f"gardo_aux_rewards={aux} lists every reward function, which leaves no main reward to train on: keep "
                "at least one reward out of it."
            )

    @classmethod
    def signal_inputs(cls, args: GuardConfig) -> tuple[str, ...]:
        return ("reward_names", "image_features") if args.gardo_diversity else ("reward_names",)

    @classmethod
    def needs_reference(cls, args: GuardConfig) -> bool:
        return False  # the KL is to the adaptive copy, never to the base model

    @classmethod
    def default_epsilon(cls, loss_type: str) -> float | None:
        return 1e-4 if loss_type == "gardo" else None

    def _init_gardo(self, args: GuardConfig, adapter: PipelineAdapter) -> None:
        trainable = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
        # the starting weights (with LoRA, the base model): the official copies the trained adapter at start
        self.reference = LaggedWeights(trainable)
        self.gate_fraction = GateFraction(args.gardo_gate_fraction)
        self.reset = False
        self.last_refresh = 0
        threshold = args.gardo_reset_kl_threshold
        self.reset_threshold = DEFAULT_RESET_KL_THRESHOLD[args.loss_type] if threshold is None else threshold
        self._step_kl: list[torch.Tensor] = []
        self._features: ImageFeatures | None = None

    # the training signal
    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        if self._features is None:
            device = next(self.adapter.denoiser.parameters()).device
            self._features = ImageFeatures(self.args.gardo_feature_model, device)
        return self._features(images)

    def training_signal(
        self,
        rewards: torch.Tensor,
        weights: torch.Tensor,
        args: GuardConfig,
        *,
        reward_names: Sequence[str],
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """GARDO's advantages (:func:`gardo_advantages` on the main reward, clipped to `adv_clip_max`) and its
        uncertainty gate (``extras["gardo_gate"]``), which advances the adaptive gated fraction by one round."""
        aux = [list(reward_names).index(name) for name in args.gardo_aux_rewards or []]
        main_columns = [j for j in range(rewards.shape[1]) if j not in aux]
        weights = weights.to(rewards.device, rewards.dtype)
        main = (rewards[:, main_columns] * weights[main_columns]).nansum(dim=1)
        features = image_features if args.gardo_diversity else None
        advantages = gardo_advantages(main, args.num_generations, features)
        advantages = advantages.clamp(-args.adv_clip_max, args.adv_clip_max).to(rewards.dtype)
        gate = torch.zeros(len(rewards), dtype=torch.bool, device=rewards.device)
        if aux:
            aux_rewards = rewards[:, aux]
            if torch.isnan(aux_rewards).any():
                missing = [reward_names[j] for j in aux if torch.isnan(rewards[:, j]).any()]
                raise ValueError(
                    f"The auxiliary rewards {missing} (gardo_aux_rewards) returned None for some samples: GARDO's gate "
                    "ranks every sample by each of them, so they must score all."
                )
            uncertainty = gardo_uncertainty(main, aux_rewards)
            fraction = self.gate_fraction.update(float(uncertainty[uncertainty >= 0].mean()))
            gate = (uncertainty > gate_threshold(uncertainty, fraction)).to(rewards.device)
        _, per_reward = compute_multi_reward_advantages(
            rewards, weights, args.num_generations, scale_rewards="none", adv_clip_max=None
        )
        return advantages, per_reward, {GATE: gate}

    # the adaptive reference
    def _refresh_reference(self, round_index: int) -> None:
        """The official schedule, checked once per round before it trains (only with a KL): a fresh copy of the
        trained weights when a step's KL exceeded the threshold since the last round, or after more than
        `gardo_reset_interval` rounds."""
        if self.args.beta <= 0:
            return
        since = round_index - self.last_refresh
        if (round_index != 0 and self.reset) or since > self.args.gardo_reset_interval:
            self.reference.pull(0.0)
            self.reset = False
            if self._adapts_threshold:
                self.reset_threshold = adapt_nft_threshold(self.reset_threshold, since, self.args.gardo_reset_interval)
            self.last_refresh = round_index

    def on_optimizer_step(self, global_step: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The step's KL (the mean of its units' gated KLs, then over processes), compared with the threshold."""
        if not self._step_kl:
            return
        kl = reduce(torch.stack(self._step_kl).to(torch.float64).mean())
        self._step_kl = []
        if float(kl) > self.reset_threshold:
            self.reset = True

    def _record(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if Stat.KL in stats:
            self._step_kl.append(stats[Stat.KL])
        stats[GATE_FRACTION] = torch.tensor(self.gate_fraction.fraction, dtype=torch.float64)
        return stats

    def _gate(self, batch: TrainBatch) -> torch.Tensor:
        if GATE not in batch.extras:
            raise ValueError(
                f"loss_type={self.args.loss_type!r} needs the uncertainty gate in each TrainBatch's extras."
            )
        return batch.extras[GATE]

    def _gardo_state(self) -> dict[str, torch.Tensor]:
        window = torch.zeros(GATE_WINDOW, dtype=torch.float64)
        window[: len(self.gate_fraction.window)] = torch.tensor(self.gate_fraction.window, dtype=torch.float64)
        return {
            **self.reference.state("gardo_reference/"),
            "gardo/gate_fraction": torch.tensor(self.gate_fraction.fraction, dtype=torch.float64),
            "gardo/window": window,
            "gardo/window_length": torch.tensor(len(self.gate_fraction.window)),
            "gardo/reset": torch.tensor(int(self.reset)),
            "gardo/last_refresh": torch.tensor(self.last_refresh),
            "gardo/reset_threshold": torch.tensor(self.reset_threshold, dtype=torch.float64),
        }

    def _load_gardo_state(self, state: dict[str, torch.Tensor]) -> None:
        if "gardo/gate_fraction" not in state:
            raise ValueError("The saved algorithm state has no GARDO state (gate, reference schedule).")
        self.reference.load(state, "gardo_reference/")
        self.gate_fraction.fraction = float(state["gardo/gate_fraction"])
        length = int(state["gardo/window_length"])
        self.gate_fraction.window = [float(v) for v in state["gardo/window"][:length].tolist()]
        self.reset = bool(int(state["gardo/reset"]))
        self.last_refresh = int(state["gardo/last_refresh"])
        self.reset_threshold = float(state["gardo/reset_threshold"])


_FLOW_GRPO_CITATION = """@article{liu2025flowgrpo,
  title   = {Flow-GRPO: Training Flow Matching Models via Online RL},
  author  = {Liu, Jie and others},
  journal = {arXiv preprint arXiv:2505.05470},
  year    = {2025}
}"""
_NFT_CITATION = """@inproceedings{zheng2026diffusionnft,
  title     = {DiffusionNFT: Online Diffusion Reinforcement with Forward Process},
  author    = {Zheng, Kaiwen and Chen, Huayu and Ye, Haotian and others},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  note      = {arXiv:2509.16117}
}"""

_GARDO_CARD_FIELDS = (
    "gardo_aux_rewards",
    "gardo_gate_fraction",
    "gardo_reset_kl_threshold",
    "gardo_reset_interval",
    "gardo_diversity",
    "gardo_feature_model",
)


class GardoAlgorithm(_Gardo, SDERatioAlgorithm):
    """GARDO on Flow-GRPO's clipped ratio loss over recorded SDE steps."""

    loss_types = ("gardo",)
    description = "GARDO on Flow-GRPO's SDE-ratio loss"
    method_names = {"gardo": "GARDO on Flow-GRPO"}
    card_fields = (
        "loss_type",
        *COMMON_CARD_FIELDS,
        *_GARDO_CARD_FIELDS,
        "kl_type",
        "noise_schedule",
        "noise_level",
        "init_same_noise",
    )
    citation = _Gardo.citation + "\n" + _FLOW_GRPO_CITATION

    @classmethod
    def fields_read(cls, loss_type: str) -> tuple[str, ...]:
        # the SDE family's rollout and step fields, not GRPO-Guard's per-step weight (the loss is Flow-GRPO's)
        sde_fields = tuple(name for name in SDERatioAlgorithm.config_fields if name != "dance_weighting")
        return (*sde_fields, *cls.config_fields)

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        super().__init__(args, adapter)
        self._init_gardo(args, adapter)

    def on_round_start(self, round_index: int, global_step: int) -> None:
        super().on_round_start(round_index, global_step)
        self._refresh_reference(round_index)

    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        _, next_latents, old_mean, sigma, sigma_next = batch.rollout.step(unit)
        sigma, sigma_next = sigma.expand(len(batch)), sigma_next.expand(len(batch))
        ref_mean = None
        if args.beta > 0:
            # before the forward with gradients: swapping weights in place after it would change tensors its
            # backward still needs (every micro-batch runs it, as the official does, so sharded processes stay in step)
            with torch.no_grad(), self.reference.swapped_in():
                ref_mean, _ = self._mean(batch, unit)
        mean, std = self._mean(batch, unit)
        loss, stats = compute_gardo_loss(
            mean,
            old_mean,
            next_latents,
            std,
            batch.advantages,
            sigma,
            sigma_next,
            self._gate(batch),
            epsilon=args.epsilon,
            beta=args.beta,
            ref_mean=ref_mean,
            kl_type=args.kl_type,
            noise_level=args.noise_level,
            noise_schedule=args.noise_schedule,
            cps_log_prob=args.cps_log_prob,
        )
        return loss, self._record(stats)

    def bind_parameters(self, parameters: dict[str, torch.nn.Parameter], sharded_module: torch.nn.Module) -> None:
        super().bind_parameters(parameters, sharded_module)
        self.reference.rebind(parameters, sharded_module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self._gardo_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self._load_gardo_state(state)


class GardoNFTAlgorithm(_Gardo, ForwardProcessAlgorithm):
    """GARDO on DiffusionNFT, sampled with the ODE by NFT's old (lagged) policy."""

    loss_types = ("gardo_nft",)
    description = "GARDO on DiffusionNFT's forward-process loss"
    method_names = {"gardo_nft": "GARDO on DiffusionNFT"}
    rollout_type = CleanRollout
    card_fields = ("loss_type", "nft_beta", "lagged_decay_schedule", *COMMON_CARD_FIELDS, *_GARDO_CARD_FIELDS)
    citation = _Gardo.citation + "\n" + _NFT_CITATION
    _adapts_threshold = True

    @classmethod
    def fields_read(cls, loss_type: str) -> tuple[str, ...]:
        return (*ForwardProcessAlgorithm.fields_read("nft"), *cls.config_fields)

    @classmethod
    def unread_settings(cls, args: GuardConfig) -> list[str]:
        # NFT's loss has no ratio, so nothing to clip
        epsilon = [f"epsilon={args.epsilon!r} (NFT has no ratio to clip)"] if args.epsilon is not None else []
        return epsilon + super().unread_settings(args)

    @classmethod
    def validate(cls, args: GuardConfig) -> None:
        super().validate(args)
        if args.lagged_decay_schedule is None:
            args.lagged_decay_schedule = "nft"  # NFT's old policy follows its default schedule (decay_type 1)

    def __init__(self, args: GuardConfig, adapter: PipelineAdapter):
        super().__init__(args, adapter)
        self._init_gardo(args, adapter)

    def on_round_start(self, round_index: int, global_step: int) -> None:
        super().on_round_start(round_index, global_step)  # NFT's old policy follows the weights
        self._refresh_reference(round_index)

    def sample(
        self,
        prompt_embeds: PromptEmbeddings,
        negative_embeds: PromptEmbeddings | None,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        plan: Any,
    ) -> CleanRollout:
        with self.lagged.swapped_in():  # NFT samples with its old policy
            return super().sample(prompt_embeds, negative_embeds, latents, generators, plan)

    def loss(self, batch: TrainBatch, unit: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        noisy, sigma, _ = batch.rollout.noised(unit)
        # the no-grad forwards under other weights first (see ForwardProcessAlgorithm.loss)
        ref_velocity = None
        if args.beta > 0:
            ref_velocity = self._velocity_under(self.reference.swapped_in(), batch, noisy, sigma)
        old_velocity = self._velocity_under(self.lagged.swapped_in(), batch, noisy, sigma)
        velocity = self._velocity(batch, noisy, sigma)
        loss, stats = compute_gardo_nft_loss(
            velocity,
            old_velocity,
            noisy,
            batch.rollout.final,
            sigma,
            nft_optimality(batch.advantages, args.adv_clip_max),
            self._gate(batch),
            nft_beta=args.nft_beta,
            adv_clip_max=args.adv_clip_max,
            beta=args.beta,
            ref_velocity=ref_velocity,
        )
        return loss, self._record(stats)

    def bind_parameters(self, parameters: dict[str, torch.nn.Parameter], sharded_module: torch.nn.Module) -> None:
        super().bind_parameters(parameters, sharded_module)
        self.reference.rebind(parameters, sharded_module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self._gardo_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self._load_gardo_state(state)


__all__ = [
    "DEFAULT_FEATURE_MODEL",
    "GATE",
    "GardoAlgorithm",
    "GardoArguments",
    "GardoNFTAlgorithm",
    "GateFraction",
    "ImageFeatures",
    "adapt_nft_threshold",
    "compute_gardo_loss",
    "compute_gardo_nft_loss",
    "descending_ranks",
    "gardo_advantages",
    "gardo_uncertainty",
    "gate_threshold",
    "gated_mean",
    "nearest_neighbour_distances",
]
