"""Flow-DPPO (`loss_type="flow_dppo"`): the loss against a float64 reference written from UniRL's formula, its
on-policy limit, its config checks, and training, resuming and every model family on the tiny pipelines."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer

from trl_guard import GuardConfig
from trl_guard.algorithms.flow_dppo import compute_flow_dppo_loss, flow_dppo_kl_score
from trl_guard.losses import compute_policy_loss
from trl_guard.metrics import Stat, timestep_key

TAU = 1e-5


def _reference64(mean, old_mean, x, std, adv, tau, normalize=True):
    """UniRL's `_flowdppo_kl_adv_loss` for one step, sample by sample in float64, from the Gaussian log-densities
    (constants included) rather than the library's factored log-ratio; the gradient with respect to `mean` by hand:
    d log p_new / d mean = (x - mean) / (std**2 D)."""
    mean, old_mean, x, std, adv = (t.double() for t in (mean, old_mean, x, std, adv))
    size, elements = mean.shape[0], mean[0].numel()
    losses, grads, kls, pos, neg = [], [], [], [], []
    for i in range(size):
        s = std[i].flatten()[0]

        def log_density(m, i=i, s=s):
            return (-((x[i] - m) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)).mean()

        r = torch.exp(log_density(mean[i]) - log_density(old_mean[i]))
        kl = (((mean[i] - old_mean[i]) ** 2) / (2 * s**2 if normalize else 2.0)).mean()
        masked_pos = bool(kl >= tau and r > 1 and adv[i] > 0)
        masked_neg = bool(kl >= tau and r < 1 and adv[i] < 0)
        kept = not (masked_pos or masked_neg)
        losses.append(-adv[i] * r if kept else torch.zeros((), dtype=torch.float64))
        grad = -adv[i] * r * (x[i] - mean[i]) / (s**2 * elements) if kept else torch.zeros_like(mean[i])
        grads.append(grad / size)
        kls.append(kl)
        pos.append(masked_pos)
        neg.append(masked_neg)
    return torch.stack(losses).mean(), torch.stack(grads), torch.stack(kls), pos, neg


def _step(seed=0, size=12):
    """A step where some samples moved far from the old mean (high KL) and some barely, advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(size, 4, 3, 3, generator=g, dtype=torch.float64)
    std = torch.rand(size, 1, 1, 1, generator=g, dtype=torch.float64) * 0.3 + 0.1
    x = old_mean + std * torch.randn(old_mean.shape, generator=g, dtype=torch.float64)
    shift = torch.tensor([1e-2, 1e-4] * (size // 2), dtype=torch.float64).view(-1, 1, 1, 1)
    mean = old_mean + shift * std * torch.randn(old_mean.shape, generator=g, dtype=torch.float64)
    adv = torch.randn(size, generator=g, dtype=torch.float64)
    adv[-1] = 0.0
    return mean, old_mean, x, std, adv


@pytest.mark.parametrize("normalize", [True, False])
def test_loss_and_gradient_match_a_float64_reference(normalize):
    mean, old_mean, x, std, adv = _step()
    tau = TAU if normalize else TAU * 1e-2  # the unnormalised score is std**2 smaller
    mean = mean.clone().requires_grad_(True)
    loss, stats = compute_flow_dppo_loss(mean, old_mean, x, std, adv, kl_threshold=tau, kl_normalize=normalize)
    loss.backward()
    ref_loss, ref_grad, ref_kl, pos, neg = _reference64(mean.detach(), old_mean, x, std, adv, tau, normalize)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(mean.grad, ref_grad, rtol=1e-10, atol=1e-16)
    torch.testing.assert_close(flow_dppo_kl_score(mean.detach(), old_mean, std, normalize=normalize), ref_kl)
    assert float(stats[Stat.KL_SCORE]) == pytest.approx(float(ref_kl.mean()), rel=1e-12)
    assert float(stats[Stat.MASK_FRAC_POS]) == pytest.approx(np.mean(pos))
    assert float(stats[Stat.MASK_FRAC_NEG]) == pytest.approx(np.mean(neg))
    # the case exercises both masks, a high-KL sample kept (corrective) and low-KL samples kept
    high = (ref_kl >= tau).tolist()
    assert any(pos) and any(neg) and sum(high) > sum(pos) + sum(neg) and not all(high)


def test_the_mask_drops_only_high_kl_samples_pushed_the_way_their_advantage_pushes():
    # One element per sample, std 1, the new mean above the old: x beyond the new mean gives r > 1, x below the old
    # mean r < 1.
    old_mean = torch.zeros(8, 1, dtype=torch.float64)
    shift = torch.tensor([0.1, 0.1, 0.1, 0.1, 1e-3, 1e-3, 1e-3, 1e-3], dtype=torch.float64).view(-1, 1)
    mean = (old_mean + shift).requires_grad_(True)
    above = torch.tensor([True, False, True, False] * 2).view(-1, 1)
    x = torch.where(above, mean.detach() + 0.05, old_mean - 0.05)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0] * 2, dtype=torch.float64)
    std = torch.ones(8, 1, dtype=torch.float64)
    tau = 0.1**2 / 2  # exactly the first four samples' KL score: a score equal to the threshold arms the mask
    loss, stats = compute_flow_dppo_loss(mean, old_mean, x, std, adv, kl_threshold=tau)
    loss.backward()
    # masked: sample 0 (A > 0, r > 1) and sample 3 (A < 0, r < 1); kept with their whole gradient: the corrective
    # samples 1 and 2 and every low-KL sample
    kept = mean.grad.flatten() != 0
    assert kept.tolist() == [False, True, True, False, True, True, True, True]
    assert float(stats[Stat.MASK_FRAC_POS]) == float(stats[Stat.MASK_FRAC_NEG]) == 1 / 8


def test_on_policy_the_loss_is_minus_the_mean_advantage_and_the_gradient_flow_grpos():
    _, old_mean, x, std, adv = _step(seed=1)
    mean = old_mean.clone().requires_grad_(True)
    loss, stats = compute_flow_dppo_loss(mean, old_mean, x, std, adv, kl_threshold=TAU)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(-adv.mean()), rel=1e-12)
    assert float(stats[Stat.KL_SCORE]) == 0 and float(stats[Stat.LOG_RATIO_MEAN]) == 0
    assert float(stats[Stat.MASK_FRAC_POS]) == float(stats[Stat.MASK_FRAC_NEG]) == 0

    reference = old_mean.clone().requires_grad_(True)
    sigma, sigma_next = torch.full((len(adv),), 0.6), torch.full((len(adv),), 0.5)
    grpo, _ = compute_policy_loss(
        reference, old_mean, x, std, adv, sigma, sigma_next, loss_type="flow_grpo", epsilon=1e-4, noise_level=0.7
    )
    grpo.backward()
    torch.testing.assert_close(mean.grad, reference.grad, rtol=1e-12, atol=0)
    # and -MEAN_i A_i grad log p_i, written out
    expected = -adv.view(-1, 1, 1, 1) * (x - old_mean) / (std**2 * old_mean[0].numel()) / len(adv)
    torch.testing.assert_close(mean.grad, expected, rtol=1e-12, atol=0)


def test_below_the_threshold_nothing_is_masked_and_no_ratio_is_clipped():
    mean, old_mean, x, std, adv = _step(seed=2)
    mean = mean.clone().requires_grad_(True)
    loss, stats = compute_flow_dppo_loss(mean, old_mean, x, std, adv, kl_threshold=1e6)
    unclipped = (-adv * torch.exp(_log_ratio(mean, old_mean, x, std))).mean()
    torch.testing.assert_close(loss, unclipped, rtol=1e-12, atol=0)
    assert float(stats[Stat.MASK_FRAC_POS]) == float(stats[Stat.MASK_FRAC_NEG]) == 0


def _log_ratio(mean, old_mean, x, std):
    return ((-((x - mean) ** 2) + (x - old_mean) ** 2) / (2 * std**2)).flatten(1).mean(dim=1)


def test_the_loss_refuses_a_threshold_that_is_not_positive():
    mean, old_mean, x, std, adv = _step()
    with pytest.raises(ValueError, match="kl_threshold must be > 0"):
        compute_flow_dppo_loss(mean, old_mean, x, std, adv, kl_threshold=0.0)


# ---- configuration ------------------------------------------------------------------------------------------------
def _config(tmp_path, **overrides):
    return GuardConfig(output_dir=str(tmp_path), report_to="none", loss_type="flow_dppo", **overrides)


def test_config_defaults_and_refusals(tmp_path):
    config = _config(tmp_path)
    assert config.epsilon is None and config.dppo_kl_threshold == 1e-5 and config.dppo_kl_normalize is True
    with pytest.raises(ValueError, match=r"does not read epsilon=0\.0001"):
        _config(tmp_path, epsilon=1e-4)
    with pytest.raises(ValueError, match="dppo_kl_threshold=0.0 must be > 0"):
        _config(tmp_path, dppo_kl_threshold=0.0)
    # the SDE family's fields are read (all but GRPO-Guard's per-step weight); another family's are refused by name
    assert _config(tmp_path, sde_window_size=3, sde_window_range=[0, 5], recompute_old_means=True).sde_window_size == 3
    with pytest.raises(ValueError, match="does not read dance_weighting='paper'"):
        _config(tmp_path, dance_weighting="paper")
    with pytest.raises(ValueError, match="does not read nft_beta=0.5"):
        _config(tmp_path, nft_beta=0.5)
    # and Flow-DPPO's own fields under another loss type (the registry's generic refusal)
    for loss_type in ("flow_grpo", "nft"):
        with pytest.raises(ValueError, match=r"does not read dppo_kl_threshold=0\.001, dppo_kl_normalize=False"):
            GuardConfig(
                output_dir=str(tmp_path),
                report_to="none",
                loss_type=loss_type,
                dppo_kl_threshold=1e-3,
                dppo_kl_normalize=False,
            )


# ---- training on the tiny SD3 ---------------------------------------------------------------------------------------
DPPO = dict(loss_type="flow_dppo", sde_window_size=2, sde_window_range=[0, 3], recompute_old_means=True)


def test_flow_dppo_trains_and_logs_its_mask(tiny_pipeline, prompts, tmp_path):
    # with the optional penalty to the reference (UniRL's `beta`, whose form is kl_type="exact")
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, max_steps=2, beta=0.1, kl_type="exact", **DPPO
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(logged(trainer, "loss")).all()
    scores = logged(trainer, Stat.KL_SCORE)
    # recompute_old_means: the round's first update is exactly on-policy; the second sees the first one's move
    assert scores[0] == 0 and scores[1] > 0
    assert logged(trainer, Stat.MASK_FRAC_POS)[0] == logged(trainer, Stat.MASK_FRAC_NEG)[0] == 0
    assert len(logged(trainer, Stat.MASK_FRAC_POS)) == len(logged(trainer, Stat.MASK_FRAC_NEG)) == 2
    steps = {
        step for entry in trainer.state.log_history for step in range(4) if timestep_key(step, "kl_score") in entry
    }
    assert len(steps) == 2 and steps <= {0, 1, 2}  # one window of 2 steps in [0, 3)
    assert logged(trainer, Stat.KL)[0] == 0 and logged(trainer, Stat.KL)[1] > 0  # LoRA B starts at 0: on the base


def test_resume_in_the_middle_of_a_generation_round_is_exact(tiny_pipeline, _base_pipeline, prompts, tmp_path):
    # Two optimizer steps per round: the checkpoint at step 1 falls between the round's two updates, after the
    # recomputed old means replaced the recorded ones (the algorithm keeps no state of its own across rounds).
    settings = dict(max_steps=2, save_strategy="steps", save_steps=1, steps_per_generation=2, **DPPO)
    full = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-1"
    assert (checkpoint / "rollout_buffer_0.safetensors").exists()
    assert max(logged(full, Stat.MASK_FRAC_POS) + logged(full, Stat.MASK_FRAC_NEG)) > 0  # the mask acted

    resumed = make_trainer(copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final_full, final_resumed = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)
    assert logged(resumed, Stat.KL_SCORE)[-1] == pytest.approx(logged(full, Stat.KL_SCORE)[-1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan", "flux_kontext"])
def test_every_family_trains_under_flow_dppo(family, tmp_path):
    from test_forward_algorithms import _family_case

    pipeline, dataset, reward, fields = _family_case(family)
    trainer = make_trainer(
        pipeline, [reward], dataset, tmp_path, loss_type="flow_dppo", max_steps=1, steps_per_generation=1, **fields
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(logged(trainer, "loss")).all() and logged(trainer, Stat.KL_SCORE)
