"""GARDO (`loss_type="gardo"` on Flow-GRPO, `"gardo_nft"` on DiffusionNFT): its advantage, gate, gate fraction and
reference schedule against the official semantics, both losses against float64 references written from the
formulas, their on-policy limits, the config checks, the image features, and training, resuming and every model family
on the tiny pipelines."""

import copy
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import blueness
from helpers import launch, logged, make_trainer, one_process

from trl_guard import GuardConfig
from trl_guard.algorithms.gardo import (
    GATE,
    GardoAlgorithm,
    GardoNFTAlgorithm,
    GateFraction,
    ImageFeatures,
    compute_gardo_loss,
    compute_gardo_nft_loss,
    descending_ranks,
    gardo_advantages,
    gardo_uncertainty,
    gate_threshold,
)
from trl_guard.losses import compute_nft_loss, compute_policy_loss
from trl_guard.metrics import Stat


def redness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 0].mean() / 255) for image in images]


def greenness(prompts, images, **kwargs):
    return [float(np.asarray(image, dtype=np.float32)[..., 1].mean() / 255) for image in images]


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    """A tiny DINOv3 ViT written with `save_pretrained`, loaded by path as the official one is by Hub id."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_register_tokens=2
    )
    path = tmp_path_factory.mktemp("tiny-dinov3")
    DINOv3ViTModel(config).save_pretrained(path)
    return str(path)


# ---- (A) the diversity-aware advantage ------------------------------------------------------------------------------
def _official_advantages(rewards, features, group):
    """`PerPromptStatTracker.update(type='gardo')` for groups of consecutive samples, in numpy float64 loops."""
    rewards, features = np.asarray(rewards, dtype=np.float64), np.nan_to_num(np.asarray(features, dtype=np.float64))
    features = features / np.linalg.norm(features, ord=2, axis=1, keepdims=True)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group):
        r, f = rewards[start : start + group], features[start : start + group]
        distance = 1 - np.dot(f, f.T).clip(-1, 1)
        nearest = np.array([min(distance[i, j] for j in range(group) if j != i) for i in range(group)])
        mean = r.mean()
        weight = np.where(r - mean < 0, 1.0, nearest / nearest.mean())
        out[start : start + group] = (r - mean) * weight
    return out


def test_advantage_matches_the_official_tracker_and_keeps_below_mean_samples_unscaled():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g, dtype=torch.float64)
    features = torch.randn(12, 5, generator=g, dtype=torch.float64)
    features[3, 0] = float("nan")  # made finite, as the official np.nan_to_num
    ours = gardo_advantages(rewards, 4, features)
    torch.testing.assert_close(ours, torch.from_numpy(_official_advantages(rewards, features, 4)))
    below = rewards.view(3, 4) < rewards.view(3, 4).mean(dim=1, keepdim=True)
    centred = rewards.view(3, 4) - rewards.view(3, 4).mean(dim=1, keepdim=True)
    torch.testing.assert_close(ours.view(3, 4)[below], centred[below])  # w = 1 below the mean
    # no standard deviation: scaling every reward scales the advantages by the same factor
    torch.testing.assert_close(gardo_advantages(10 * rewards, 4, features), 10 * ours)
    # gardo_diversity=False: the centred reward
    torch.testing.assert_close(gardo_advantages(rewards, 4), centred.reshape(-1))


def test_identical_features_give_weight_one_where_the_official_gives_nan():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 6.0])
    features = torch.cat([torch.ones(4, 3), torch.randn(4, 3, generator=torch.Generator().manual_seed(1))])
    with np.errstate(invalid="ignore", divide="ignore"):
        official = _official_advantages(rewards, features, 4)
    assert np.isnan(official[2:4]).all()  # 0/0 for the group whose features are all the same
    ours = gardo_advantages(rewards, 4, features)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(ours[4:], torch.from_numpy(official[4:]))


# ---- (B) the uncertainty gate and its adaptive fraction -------------------------------------------------------------
def test_the_gate_keeps_the_official_sign_threshold_and_strict_inequality():
    # 10 samples. The main reward ranks them 1..10 in order; aux_a and aux_b rank them in reverse, except sample 0,
    # which both auxiliary rewards rank worst: high main, low aux (what "hacking" the main reward would look like).
    main = torch.arange(10, 0, -1, dtype=torch.float64)
    aux = torch.stack([torch.arange(1, 11, dtype=torch.float64)] * 2, dim=1)
    aux[0] = -1.0
    uncertainty = gardo_uncertainty(main, aux)
    torch.testing.assert_close(descending_ranks(main), torch.arange(1, 11, dtype=torch.float64))
    # main rank i + 1; auxiliary rank 10 - i for i >= 1 and 10 for sample 0: U = 2 i - 9, and 1 - 10 = -9
    expected = torch.tensor([-9.0, -7.0, -5.0, -3.0, -1.0, 1.0, 3.0, 5.0, 7.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(uncertainty, expected)
    # f = 0.2: numpy's percentile 80 of the non-negative U [1, 3, 5, 7, 9] is 7.4; the gate is U > 7.4
    threshold = gate_threshold(uncertainty, 0.2)
    assert threshold == pytest.approx(np.percentile([1.0, 3.0, 5.0, 7.0, 9.0], 80)) == pytest.approx(7.4)
    gate = uncertainty > threshold
    # the official sign: the gate picks the sample the main reward ranks worst relative to the auxiliary rewards
    # (sample 9), never the one the main reward likes and the auxiliary rewards do not (sample 0, U = -9)
    assert gate.tolist() == [False] * 9 + [True]
    # strict: a threshold equal to the largest value gates nothing
    assert not (uncertainty > gate_threshold(uncertainty, 0.0)).any()


def test_ties_are_ranked_in_order_of_appearance():
    assert descending_ranks(torch.tensor([0.5, 1.0, 0.5, 1.0])).tolist() == [3.0, 1.0, 4.0, 2.0]
    # a round of many ties (an unstable sort reorders these)
    ranks = descending_ranks(torch.tensor([0.5, 1.0] * 2000))
    assert ranks[1::2].tolist() == list(range(1, 2001)) and ranks[::2].tolist() == list(range(2001, 4001))


def test_the_gate_fraction_follows_the_official_risk_compensator():
    gate = GateFraction(0.1)
    fractions = [gate.update(u) for u in (5.0, 6.0, 7.0, 6.5, 1.0)]
    assert fractions == pytest.approx([0.1, 0.11, 0.121, 0.121, 0.1089])
    for _ in range(30):  # rising every round: x1.1 until the 0.2 cap
        gate.update(max(gate.window) + 1)
    assert gate.fraction == 0.2 and len(gate.window) == 20
    for _ in range(40):  # falling: x0.9 down to the 0.02 floor
        gate.update(min(gate.window) - 1)
    assert gate.fraction == pytest.approx(0.02)
    # only the last 20 rounds count: 5 is below all of them (ten times 10) though above the dropped 0
    gate = GateFraction(0.1)
    for u in [0.0] + [10.0] * 20:
        gate.update(u)
    assert gate.fraction == pytest.approx(0.11) and gate.window == [10.0] * 20
    assert gate.update(5.0) == pytest.approx(0.099)


# ---- the losses against float64 references --------------------------------------------------------------------------
def _sde_step(seed=0, size=6):
    g = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(size, 3, 4, 4, generator=g, dtype=torch.float64)
    std = torch.full((size, 1, 1, 1), 0.3, dtype=torch.float64)
    x = old_mean + std * torch.randn(old_mean.shape, generator=g, dtype=torch.float64)
    mean = old_mean + 1e-2 * torch.randn(old_mean.shape, generator=g, dtype=torch.float64)
    ref_mean = old_mean + 5e-2 * torch.randn(old_mean.shape, generator=g, dtype=torch.float64)
    adv = torch.randn(size, generator=g, dtype=torch.float64)
    sigma, sigma_next = torch.full((size,), 0.7, dtype=torch.float64), torch.full((size,), 0.6, dtype=torch.float64)
    return mean, old_mean, x, std, adv, ref_mean, sigma, sigma_next


def _gardo_reference(mean, old_mean, x, std, adv, ref_mean, sigma, sigma_next, gate, epsilon, beta):
    """train_sd3_grpo_gardo.py's loss, sample by sample: Gaussian log-densities with their constants, the clipped
    ratio, and the KL `MEAN((mean - ref)**2) / (2 s**2)` (s = std / sqrt(-dt)) averaged over the gated samples."""
    policy, kls = [], []
    for i in range(len(adv)):
        s = std[i].flatten()[0]

        def log_p(m, i=i, s=s):
            return (-((x[i] - m) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).mean()

        ratio = torch.exp(log_p(mean[i]) - log_p(old_mean[i]))
        policy.append(torch.maximum(-adv[i] * ratio, -adv[i] * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)))
        diffusion = s / torch.sqrt(sigma[i] - sigma_next[i])
        kls.append(((mean[i] - ref_mean[i]) ** 2 / (2 * diffusion**2)).mean())
    loss = torch.stack(policy).mean()
    gated = [kls[i] for i in range(len(adv)) if gate[i]]
    return loss + beta * torch.stack(gated).mean() if gated else loss


@pytest.mark.parametrize("gate", [[True, False, True, False, False, False], [False] * 6])
def test_gardo_loss_and_gradient_match_a_float64_reference(gate):
    mean, old_mean, x, std, adv, ref_mean, sigma, sigma_next = _sde_step()
    gate = torch.tensor(gate)
    ours_mean, ref_input = mean.clone().requires_grad_(True), mean.clone().requires_grad_(True)
    loss, stats = compute_gardo_loss(
        ours_mean, old_mean, x, std, adv, sigma, sigma_next, gate, epsilon=1e-3, beta=0.5, ref_mean=ref_mean
    )
    loss.backward()
    expected = _gardo_reference(ref_input, old_mean, x, std, adv, ref_mean, sigma, sigma_next, gate, 1e-3, 0.5)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours_mean.grad, ref_input.grad)
    assert stats["gardo_gated"] == gate.double().mean()
    assert (stats[Stat.KL] == 0) == (not gate.any())  # no gated sample: no KL at all (GRPO)


def _nft_reference(v, v_old, x_t, x0, t, adv, v_ref, gate, nft_beta, beta, clip=5.0):
    """train_sd3_nft_gardo.py's loss, sample by sample, from its formula."""
    losses, kls = [], []
    for i in range(len(adv)):
        r = min(max(min(max(float(adv[i]), -clip), clip) / clip / 2 + 0.5, 0.0), 1.0)
        plus = nft_beta * v[i] + (1 - nft_beta) * v_old[i]
        minus = (1 + nft_beta) * v_old[i] - nft_beta * v[i]

        def x0_loss(velocity, i=i):
            error = x_t[i] - t[i] * velocity - x0[i]
            return (error**2).mean() / error.detach().abs().mean().clamp(min=1e-5)

        losses.append(clip * (r * x0_loss(plus) + (1 - r) * x0_loss(minus)) / nft_beta)
        kls.append(((v[i] - v_ref[i]) ** 2).mean())
    chosen = [kls[i] for i in range(len(adv)) if gate[i]] or kls  # the NFT script's rule: all when none is gated
    return torch.stack(losses).mean() + beta * torch.stack(chosen).mean()


@pytest.mark.parametrize("gate", [[False, True, False, False, True], [False] * 5])
def test_gardo_nft_loss_and_gradient_match_a_float64_reference(gate):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.8 + 0.1
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise.double()
    v_old = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = v_old + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v_ref = v_old + 0.2 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    adv = torch.tensor([-7.0, -1.0, 0.0, 2.5, 6.0], dtype=torch.float64)
    gate = torch.tensor(gate)
    ours_v, ref_v = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    optimality = torch.clamp(adv.clamp(-5, 5) / 10 + 0.5, 0, 1)
    loss, stats = compute_gardo_nft_loss(
        ours_v, v_old, x_t, x0, t, optimality, gate, nft_beta=0.1, beta=0.04, ref_velocity=v_ref
    )
    loss.backward()
    expected = _nft_reference(ref_v, v_old, x_t, x0, t, adv, v_ref, gate, 0.1, 0.04)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours_v.grad, ref_v.grad)
    assert stats[Stat.KL] > 0  # over the gated samples, or over all when none is


def test_on_policy_with_a_fresh_reference_the_losses_reduce_to_their_base_gradients():
    # GRPO: mean == old_mean == ref_mean: r = 1, the KL and its gradient are 0, the gradient is Flow-GRPO's (REINFORCE)
    mean, old_mean, x, std, adv, _, sigma, sigma_next = _sde_step(seed=2)
    gate = torch.tensor([True, True, False, True, False, True])
    ours, base = old_mean.clone().requires_grad_(True), old_mean.clone().requires_grad_(True)
    loss, stats = compute_gardo_loss(
        ours, old_mean, x, std, adv, sigma, sigma_next, gate, epsilon=1e-4, beta=10.0, ref_mean=old_mean
    )
    loss.backward()
    policy, _ = compute_policy_loss(
        base, old_mean, x, std, adv, sigma, sigma_next, loss_type="flow_grpo", epsilon=1e-4, noise_level=0.7
    )
    policy.backward()
    assert stats[Stat.KL] == 0 and loss == policy == -adv.mean()
    torch.testing.assert_close(ours.grad, base.grad)
    # the gradient is -E_B[A grad log p]: d log p_i / d mean_i = (x_i - mean_i) / (std**2 D)
    elements = old_mean[0].numel()
    reinforce = -adv.view(-1, 1, 1, 1) * (x - old_mean) / (std**2 * elements) / len(adv)
    torch.testing.assert_close(ours.grad, reinforce)

    # NFT: v == v_old == v_ref: the KL adds nothing, the gradient is NFT's advantage-weighted regression
    g = torch.Generator().manual_seed(3)
    x0, x_t = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    v, t, r_hat = torch.randn(4, 2, 3, 3, generator=g), torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.rand(4, generator=g)
    ours, base = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    loss, stats = compute_gardo_nft_loss(
        ours, v, x_t, x0, t, r_hat, torch.tensor([True, False, False, True]), nft_beta=1.0, beta=1.0, ref_velocity=v
    )
    loss.backward()
    nft, _ = compute_nft_loss(base, v, x_t, x0, t, r_hat, nft_beta=1.0)
    nft.backward()
    assert stats[Stat.KL] == 0
    torch.testing.assert_close(loss, nft)
    torch.testing.assert_close(ours.grad, base.grad)


# ---- the training signal, the reference schedule and the state ------------------------------------------------------
def _config(tmp_path, loss_type="gardo", **overrides):
    return GuardConfig(output_dir=str(tmp_path), report_to="none", loss_type=loss_type, **overrides)


def _algorithm(cls, args):
    """The GARDO part of an algorithm over a one-layer model (its reference copies the layer's weights)."""
    algorithm = cls.__new__(cls)
    algorithm.args = args
    algorithm.adapter = SimpleNamespace(denoiser=torch.nn.Linear(2, 2))
    algorithm._init_gardo(args, algorithm.adapter)
    return algorithm


def test_training_signal_trains_on_the_main_rewards_and_gates_with_the_auxiliary_ones(tmp_path):
    args = _config(tmp_path, beta=0.04, gardo_aux_rewards=["aux_a", "aux_b"], num_generations=4, gardo_diversity=False)
    algorithm = _algorithm(GardoAlgorithm, args)
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(16, 4, generator=g)
    weights = torch.tensor([0.8, 0.1, 0.1, 2.0])
    names = ["ocr", "aux_a", "aux_b", "other"]
    advantages, per_reward, extras = algorithm.training_signal(rewards, weights, args, reward_names=names)
    main = 0.8 * rewards[:, 0] + 2.0 * rewards[:, 3]  # the aux rewards' weights do not count, as officially
    torch.testing.assert_close(advantages, gardo_advantages(main, 4).float())
    torch.testing.assert_close(
        per_reward[:, 1], (rewards[:, 1].view(4, 4) - rewards[:, 1].view(4, 4).mean(1, True)).view(-1)
    )
    uncertainty = gardo_uncertainty(main, rewards[:, 1:3])
    assert extras[GATE].tolist() == (uncertainty > gate_threshold(uncertainty, 0.1)).tolist()
    assert algorithm.gate_fraction.window == [pytest.approx(float(uncertainty[uncertainty >= 0].mean()))]
    # advantages are clipped to adv_clip_max (no std: large rewards give large advantages)
    big, _, _ = algorithm.training_signal(rewards * 100, weights, args, reward_names=names)
    assert big.abs().max() == 5.0


def test_the_reference_is_refreshed_after_a_high_kl_step_or_after_the_interval(tmp_path):
    algorithm = _algorithm(GardoAlgorithm, _config(tmp_path, beta=0.04, gardo_aux_rewards=["a"]))
    layer = algorithm.adapter.denoiser

    def move():
        with torch.no_grad():
            layer.weight.add_(1.0)

    def reference_is_current():
        return torch.equal(algorithm.reference.averages["weight"], layer.weight.detach())

    algorithm._refresh_reference(0)
    move()
    # a step whose KL (the mean of its units') is below the threshold 3e-4 does not flag; one above does
    algorithm._step_kl = [torch.tensor(1e-4), torch.tensor(3e-4)]
    algorithm.on_optimizer_step(1, lambda t: t)
    assert not algorithm.reset and algorithm._step_kl == []
    algorithm._refresh_reference(1)
    assert not reference_is_current()
    algorithm._step_kl = [torch.tensor(1e-4), torch.tensor(7e-4)]
    algorithm.on_optimizer_step(2, lambda t: t * 0.5)  # the mean over processes decides: 2e-4 here, below
    assert not algorithm.reset
    algorithm._step_kl = [torch.tensor(1e-3)]
    algorithm.on_optimizer_step(3, lambda t: t)
    assert algorithm.reset and not reference_is_current()  # flagged; the copy waits for the next round's start
    algorithm._refresh_reference(2)
    assert reference_is_current() and not algorithm.reset and algorithm.last_refresh == 2
    # more than gardo_reset_interval (15) rounds without a refresh
    move()
    algorithm._refresh_reference(17)
    assert not reference_is_current()
    algorithm._refresh_reference(18)
    assert reference_is_current() and algorithm.last_refresh == 18
    # without a KL the reference is never used nor refreshed
    idle = _algorithm(GardoAlgorithm, _config(tmp_path, beta=0.0))
    idle.reset = True
    idle._refresh_reference(40)
    assert idle.last_refresh == 0


def test_gardo_nft_adapts_its_threshold_at_each_refresh_as_the_official_script(tmp_path):
    algorithm = _algorithm(GardoNFTAlgorithm, _config(tmp_path, "gardo_nft", beta=0.04, gardo_aux_rewards=["a"]))
    assert algorithm.reset_threshold == 0.15
    algorithm._refresh_reference(16)  # a slow refresh (16 > 15 rounds): -0.01
    assert algorithm.reset_threshold == pytest.approx(0.14)
    algorithm.reset = True
    algorithm._refresh_reference(18)  # a quick one (2 < 5 rounds): +0.01, capped at 0.05 (sic)
    assert algorithm.reset_threshold == pytest.approx(0.05) and algorithm.last_refresh == 18
    algorithm._refresh_reference(34)  # slow again: max(0.04, 0.1)
    assert algorithm.reset_threshold == pytest.approx(0.1)


def test_the_state_round_trips(tmp_path):
    args = _config(tmp_path, "gardo_nft", beta=0.04, gardo_aux_rewards=["a"])
    saved = _algorithm(GardoNFTAlgorithm, args)
    for u in (3.0, 4.0, 2.0):
        saved.gate_fraction.update(u)
    saved.reset, saved.last_refresh, saved.reset_threshold = True, 7, 0.05
    with torch.no_grad():
        saved.reference.averages["weight"].add_(2.0)
    loaded = _algorithm(GardoNFTAlgorithm, args)
    loaded._load_gardo_state(saved._gardo_state())
    assert loaded.gate_fraction.fraction == saved.gate_fraction.fraction
    assert loaded.gate_fraction.window == saved.gate_fraction.window == [3.0, 4.0, 2.0]
    assert (loaded.reset, loaded.last_refresh, loaded.reset_threshold) == (True, 7, 0.05)
    torch.testing.assert_close(loaded.reference.averages["weight"], saved.reference.averages["weight"])


# ---- configuration --------------------------------------------------------------------------------------------------
def test_config_defaults_and_refusals(tmp_path):
    config = _config(tmp_path)
    assert config.epsilon == 1e-4 and config.gardo_gate_fraction == 0.1 and config.gardo_reset_interval == 15
    nft = _config(tmp_path, "gardo_nft")
    assert nft.epsilon is None and nft.lagged_decay_schedule == "nft"
    # the wrapped family's fields are read; GRPO-Guard's weight, the other family's and AWM's are refused by name
    assert _config(tmp_path, sde_window_size=2, sde_window_range=[0, 3]).sde_window_size == 2
    with pytest.raises(ValueError, match="does not read dance_weighting='paper'"):
        _config(tmp_path, dance_weighting="paper")
    with pytest.raises(ValueError, match="does not read nft_beta=0.5"):
        _config(tmp_path, nft_beta=0.5)
    with pytest.raises(ValueError, match="does not read awm_weighting='t'"):
        _config(tmp_path, "gardo_nft", awm_weighting="t")
    with pytest.raises(ValueError, match=r"does not read epsilon=0\.0001"):
        _config(tmp_path, "gardo_nft", epsilon=1e-4)
    with pytest.raises(ValueError, match="does not read scale_rewards='batch'"):
        _config(tmp_path, scale_rewards="batch")
    # GARDO's own fields under every other loss type (the registry's generic refusal)
    for loss_type in ("flow_grpo", "grpo_guard", "nft", "awm"):
        with pytest.raises(
            ValueError, match=r"does not read gardo_aux_rewards=\['aesthetic'\], gardo_diversity=False"
        ):
            _config(tmp_path, loss_type, gardo_aux_rewards=["aesthetic"], gardo_diversity=False)
    with pytest.raises(ValueError, match=r"gardo_gate_fraction=0\.5 must be in \[0\.02, 0\.2\]"):
        _config(tmp_path, gardo_gate_fraction=0.5)
    with pytest.raises(ValueError, match="needs gardo_aux_rewards"):
        _config(tmp_path, beta=0.04)
    with pytest.raises(ValueError, match="gardo_reset_kl_threshold=0.0 must be > 0"):
        _config(tmp_path, gardo_reset_kl_threshold=0.0)
    with pytest.raises(ValueError, match="gardo_feature_model='/no/such/dino' looks like a local path"):
        _config(tmp_path, gardo_feature_model="/no/such/dino")
    assert _config(tmp_path, gardo_diversity=False, gardo_feature_model="/no/such/dino").gardo_diversity is False


def test_unknown_auxiliary_rewards_are_refused_before_the_pipeline_loads(tmp_path):
    from datasets import Dataset

    from trl_guard import GuardGRPODiffusionTrainer

    dataset = Dataset.from_dict({"prompt": ["a", "b"]})
    for aux, message in ((["aesthetic"], r"names \['aesthetic'\], which are not among"), (["blueness"], "no main")):
        args = _config(tmp_path, beta=0.04, gardo_aux_rewards=aux, num_generations=2, per_device_train_batch_size=2)
        with pytest.raises(ValueError, match=message):  # the model path does not exist: nothing was loaded
            GuardGRPODiffusionTrainer("/no/such/pipeline", [blueness], args=args, train_dataset=dataset)


# ---- the image features ---------------------------------------------------------------------------------------------
def test_image_features_pool_the_patch_tokens_of_a_transformers_backbone(tiny_dino):
    from PIL import Image
    from transformers import AutoModel

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    extractor = ImageFeatures(tiny_dino, "cpu")
    features = extractor(images)
    assert features.shape == (3, 16) and features.dtype == torch.float32
    model = AutoModel.from_pretrained(tiny_dino)
    pixels = ImageFeatures.preprocess(images)
    assert pixels.shape == (3, 3, 256, 256)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(features, hidden[:, 1 + 2 :].mean(dim=1))  # class and 2 register tokens left out
    # a video's feature is the mean of its frames'
    video = extractor([[images[0], images[1]], [images[2]]])
    torch.testing.assert_close(video, torch.stack([features[:2].mean(0), features[2]]))


# ---- training on the tiny SD3 ---------------------------------------------------------------------------------------
GARDO = dict(
    beta=0.1,
    gardo_aux_rewards=["redness", "greenness"],
    per_device_train_batch_size=4,
    steps_per_generation=1,
    max_steps=2,
)


@pytest.mark.parametrize("loss_type", ["gardo", "gardo_nft"])
def test_gardo_trains_and_logs_its_gate(tiny_pipeline, prompts, tmp_path, tiny_dino, loss_type):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness, redness, greenness],
        prompts,
        tmp_path,
        loss_type=loss_type,
        gardo_feature_model=tiny_dino,
        gardo_reset_kl_threshold=1e-12,
        **GARDO,
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    start = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(logged(trainer, "loss")).all()
    assert logged(trainer, "gardo_gate_fraction")[0] == pytest.approx(0.1)
    assert len(logged(trainer, "gardo_gated")) == 2 and len(logged(trainer, Stat.KL)) == 2
    assert logged(trainer, Stat.KL)[0] == 0  # the first step: the policy is its reference (LoRA starts at B = 0)
    # the reference is the starting weights until a refresh (the resume test below sees one); step 2's KL, above the
    # threshold, flagged one for the next round
    reference = trainer.algorithm.reference.averages
    assert all(torch.equal(reference[name], start[name]) for name in start)
    assert logged(trainer, Stat.KL)[1] > 1e-12 and trainer.algorithm.reset


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["gardo", "gardo_nft"])
def test_resume_in_the_middle_of_a_generation_round_is_exact(
    tiny_pipeline, _base_pipeline, prompts, tmp_path, tiny_dino, loss_type
):
    # Rounds of two optimizer steps; the reference is refreshed at round 2's start at the latest (more than
    # gardo_reset_interval rounds after round 0, or earlier after a step's KL above the tiny threshold), and the
    # checkpoint at step 5 falls inside round 2: the resumed run needs the refreshed reference, the gate in the
    # rollout buffer and the gate fraction's state.
    settings = dict(
        GARDO,
        loss_type=loss_type,
        gardo_feature_model=tiny_dino,
        gardo_reset_kl_threshold=1e-12,
        gardo_reset_interval=1,
        max_steps=6,
        steps_per_generation=2,
        save_strategy="steps",
        save_steps=1,
    )
    rewards = [blueness, redness, greenness]
    full = make_trainer(tiny_pipeline, rewards, prompts, tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-5"
    assert (checkpoint / "rollout_buffer_0.safetensors").exists() and full.algorithm.last_refresh == 2
    resumed = make_trainer(copy.deepcopy(_base_pipeline), rewards, prompts, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final_full, final_resumed = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)
    assert logged(resumed, Stat.KL)[-1] == pytest.approx(logged(full, Stat.KL)[-1], rel=1e-5)
    full_state, resumed_state = full.algorithm.state_dict(), resumed.algorithm.state_dict()
    for key in full_state:
        torch.testing.assert_close(resumed_state[key], full_state[key], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["gardo", "gardo_nft"])
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan", "flux_kontext"])
def test_every_family_trains_under_gardo(family, loss_type, tmp_path, tiny_dino):
    from test_forward_algorithms import _family_case

    from trl_guard.rewards import video_reward

    pipeline, dataset, reward, fields = _family_case(family)
    aux = video_reward(redness, name="redness") if family == "wan" else redness
    trainer = make_trainer(
        pipeline,
        [reward, aux],
        dataset,
        tmp_path,
        loss_type=loss_type,
        beta=0.1,
        gardo_aux_rewards=["redness"],
        gardo_feature_model=tiny_dino,
        max_steps=1,
        steps_per_generation=1,
        **fields,
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(logged(trainer, "loss")).all() and logged(trainer, "gardo_gated")


@pytest.mark.slow
def test_two_processes_match_one_with_image_features(launch_recipe, tmp_path, tiny_dino):
    """test_distributed.py runs GARDO without features; here the features are computed on each process and gathered."""
    args = ["--loss_type", "gardo_nft", "--beta", "0.1", "--gardo_feature_model", tiny_dino]
    # the JPEG size moves in whole bytes: weighted 0, it gates without entering the compared reward total
    args += ["--reward_funcs", "tests_rewards.blueness", "jpeg_compressibility", "--reward_weights", "1", "0"]
    args += ["--gardo_aux_rewards", "jpeg_compressibility"]
    config = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "ddp_cpu.yaml"
    module = [sys.executable, "-m", "trl_guard.scripts.grpo", "--config", str(launch_recipe)]
    # one process in the two processes' micro-batches: the KL is a mean over each micro-batch's gated samples
    one = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--steps_per_generation", "2"]
    one_process([*module[3:], "--output_dir", "one", *one, *args], tmp_path)
    launch(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            *module[1:],
            "--output_dir",
            "two",
            "--per_device_train_batch_size",
            "8",
            *args,
        ],
        tmp_path,
    )
    from safetensors.torch import load_file

    lora_one = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    lora_two = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert (tmp_path / "two" / "checkpoint-3" / "rng_state_1.pth").exists()
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=1e-4, atol=1e-5)
