"""DiffusionNFT and AWM losses against float64 references written from their formulas, per sample, in numpy.

Notation: ``x_t = (1 - t) x0 + t eps``, target velocity ``v* = eps - x0``, ``D`` the number of elements per sample.
"""

import numpy as np
import pytest
import torch

import trl_guard.losses as losses
from trl_guard.losses import (
    AWM_WEIGHTINGS,
    LAGGED_DECAY_SCHEDULES,
    awm_log_likelihood,
    compute_awm_loss,
    compute_awm_regularizer,
    compute_nft_loss,
    lagged_decay,
    nft_optimality,
)

DELTA = 1e-10  # AWM's Huber offset


def make_batch(batch=5, shape=(3, 4, 4), seed=0, drift=0.1):
    """A re-noised batch in float64: an imperfect old policy, a current one ``drift`` away, a reference."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    x0, eps = randn(batch, *shape), randn(batch, *shape)
    sigma = torch.rand(batch, generator=g, dtype=torch.float64) * 0.9 + 0.05
    t = sigma.view(-1, *([1] * len(shape)))
    x_t = (1 - t) * x0 + t * eps
    target = eps - x0
    old_v = target + 0.5 * randn(batch, *shape)
    v = old_v + drift * randn(batch, *shape)
    ref_v = old_v + 0.2 * randn(batch, *shape)
    advantages = torch.tensor([7.0, -6.0, 2.0, -1.5, 0.5, 3.0, -4.0, 0.0][:batch], dtype=torch.float64)
    return dict(x0=x0, x_t=x_t, sigma=sigma, target=target, old_v=old_v, v=v, ref_v=ref_v, advantages=advantages)


def np_(x):
    return x.detach().cpu().numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------------
# DiffusionNFT
# ----------------------------------------------------------------------------------------------------------------------


def nft_reference(v, v_old, x_t, x0, sigma, r, *, beta, scale, v_ref=None, kl_beta=0.0, min_norm=1e-5):
    """NFT's loss and its gradient with respect to ``v`` (normalisers held fixed), one sample at a time.

    ``dL_plus/dv = -2 t beta e_plus / (D w_plus)`` and ``dL_minus/dv = +2 t beta e_minus / (D w_minus)``, with
    ``e = x_t - t v_pm - x0`` and ``w`` the normaliser.
    """
    v, v_old, x_t, x0, sigma, r = map(np.asarray, (v, v_old, x_t, x0, sigma, r))
    batch, size = v.shape[0], v[0].size
    total, grad = 0.0, np.zeros_like(v)
    for i in range(batch):
        t = sigma[i]
        e_plus = x_t[i] - t * (beta * v[i] + (1 - beta) * v_old[i]) - x0[i]
        e_minus = x_t[i] - t * ((1 + beta) * v_old[i] - beta * v[i]) - x0[i]
        w_plus = max(np.abs(e_plus).mean(), min_norm)
        w_minus = max(np.abs(e_minus).mean(), min_norm)
        l_plus, l_minus = (e_plus**2).mean() / w_plus, (e_minus**2).mean() / w_minus
        total += scale / beta * (r[i] * l_plus + (1 - r[i]) * l_minus) / batch
        d_plus = -2 * t * beta * e_plus / (size * w_plus)
        d_minus = 2 * t * beta * e_minus / (size * w_minus)
        grad[i] = scale / (beta * batch) * (r[i] * d_plus + (1 - r[i]) * d_minus)
        if v_ref is not None:
            diff = v[i] - np.asarray(v_ref)[i]
            total += kl_beta * (diff**2).mean() / batch
            grad[i] += kl_beta * 2 * diff / (size * batch)
    return total, grad


def test_nft_optimality_maps_the_clip_range_onto_unit_interval():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0], dtype=torch.float64)
    expected = [min(max(a / 10 + 0.5, 0.0), 1.0) for a in adv.tolist()]
    assert nft_optimality(adv).tolist() == pytest.approx(expected, abs=1e-15)
    # M = 2: A = 1 is a quarter of the range above the middle
    assert nft_optimality(torch.tensor([-3.0, -1.0, 1.0, 3.0]), adv_clip_max=2.0).tolist() == [0.0, 0.25, 0.75, 1.0]
    with pytest.raises(ValueError, match="adv_clip_max must be > 0"):
        nft_optimality(adv, adv_clip_max=0.0)


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.7])
@pytest.mark.parametrize("kl_beta", [0.0, 1e-4, 0.5])
def test_nft_loss_and_gradient_match_the_reference(beta, kl_beta):
    b = make_batch(seed=1)
    r = nft_optimality(b["advantages"])
    v = b["v"].clone().requires_grad_(True)
    loss, stats = compute_nft_loss(
        v, b["old_v"], b["x_t"], b["x0"], b["sigma"], r, nft_beta=beta, ref_velocity=b["ref_v"], kl_beta=kl_beta
    )
    loss.backward()
    ref_loss, ref_grad = nft_reference(
        np_(b["v"]), np_(b["old_v"]), np_(b["x_t"]), np_(b["x0"]), np_(b["sigma"]), np_(r),
        beta=beta, scale=5.0, v_ref=np_(b["ref_v"]), kl_beta=kl_beta,
    )  # fmt: skip
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(np_(v.grad), ref_grad, rtol=1e-10, atol=1e-16)
    kl = np.mean([((np_(b["v"])[i] - np_(b["ref_v"])[i]) ** 2).mean() for i in range(5)])
    assert float(stats["kl"]) == pytest.approx(kl, rel=1e-12)
    assert float(stats["policy_loss"]) == pytest.approx(ref_loss - kl_beta * kl, rel=1e-12)


def test_nft_normaliser_is_a_stop_gradient():
    """Finite differences of the reference with the normalisers frozen reproduce autograd; unfrozen ones do not."""
    b = make_batch(batch=3, shape=(2, 3), seed=2, drift=0.3)
    r = nft_optimality(b["advantages"])
    v = b["v"].clone().requires_grad_(True)
    loss, _ = compute_nft_loss(v, b["old_v"], b["x_t"], b["x0"], b["sigma"], r, nft_beta=0.5)
    loss.backward()
    args = (np_(b["old_v"]), np_(b["x_t"]), np_(b["x0"]), np_(b["sigma"]), np_(r))

    def frozen(vv, base):
        # the loss with each sample's normaliser taken at ``base`` (what the stop-gradient means); beta = 0.5
        old_v, x_t, x0, sigma, rr = args
        total = 0.0
        for i in range(3):
            t = sigma[i]
            for weight, mix_v, mix_base in (
                (rr[i], 0.5 * vv[i] + 0.5 * old_v[i], 0.5 * base[i] + 0.5 * old_v[i]),
                (1 - rr[i], 1.5 * old_v[i] - 0.5 * vv[i], 1.5 * old_v[i] - 0.5 * base[i]),
            ):
                w = max(np.abs(x_t[i] - t * mix_base - x0[i]).mean(), 1e-5)
                total += 5.0 / 0.5 * weight * ((x_t[i] - t * mix_v - x0[i]) ** 2).mean() / w / 3
        return total

    base, h = np_(b["v"]), 1e-6
    fd_frozen, fd_free = np.zeros_like(base), np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += h
        down[idx] -= h
        fd_frozen[idx] = (frozen(up, base) - frozen(down, base)) / (2 * h)
        fd_free[idx] = (frozen(up, up) - frozen(down, down)) / (2 * h)
    np.testing.assert_allclose(np_(v.grad), fd_frozen, rtol=1e-6, atol=1e-9)
    assert np.abs(np_(v.grad) - fd_free).max() > 1e-3


@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("adv_clip_max", [5.0, 2.0])
def test_nft_on_policy_gradient_is_advantage_weighted_x0_regression(beta, adv_clip_max):
    """At v = v_old: grad = (M / B) beta (2 r - 1) dL/dv / beta = (1 / B) clip(A, -M, M) dL/dv, whatever beta and M.

    ``dL/dv = -2 t (x_t - t v_old - x0) / (D w)``, the gradient of the normalised x0 loss of ``v_old``.
    """
    b = make_batch(seed=3)
    adv = b["advantages"]
    r = nft_optimality(adv, adv_clip_max=adv_clip_max)
    v = b["old_v"].clone().requires_grad_(True)
    loss, stats = compute_nft_loss(
        v, b["old_v"], b["x_t"], b["x0"], b["sigma"], r, nft_beta=beta, adv_clip_max=adv_clip_max
    )
    loss.backward()

    old_v, x_t, x0, sigma, a = np_(b["old_v"]), np_(b["x_t"]), np_(b["x0"]), np_(b["sigma"]), np_(adv)
    batch, size = old_v.shape[0], old_v[0].size
    expected, l_old = np.zeros_like(old_v), np.zeros(batch)
    for i in range(batch):
        e = x_t[i] - sigma[i] * old_v[i] - x0[i]
        w = max(np.abs(e).mean(), 1e-5)
        l_old[i] = (e**2).mean() / w
        dl_dv = -2 * sigma[i] * e / (size * w)
        expected[i] = np.clip(a[i], -adv_clip_max, adv_clip_max) * dl_dv / batch
    np.testing.assert_allclose(np_(v.grad), expected, rtol=1e-12, atol=1e-17)
    # same (2 r - 1) form, with the constants: (M / B) (2 r - 1) dL/dv
    two_r_minus_1 = 2 * np_(r) - 1
    np.testing.assert_allclose(two_r_minus_1, np.clip(a, -adv_clip_max, adv_clip_max) / adv_clip_max, rtol=1e-15)
    # on-policy, L_plus = L_minus = L(v_old): the loss is (M / beta) E[L]
    assert loss.item() == pytest.approx(adv_clip_max / beta * l_old.mean(), rel=1e-12)
    assert float(stats["positive_loss"]) == pytest.approx(float(stats["negative_loss"]), rel=1e-14)
    assert float(stats["old_deviation"]) == 0.0
    # a positive-advantage sample's step lowers its x0 error, a negative one's raises it
    stepped = (v - 1e-3 * v.grad).detach()
    err_before = (b["x_t"] - b["sigma"].view(-1, 1, 1, 1) * b["old_v"] - b["x0"]).pow(2).flatten(1).mean(1)
    err_after = (b["x_t"] - b["sigma"].view(-1, 1, 1, 1) * stepped - b["x0"]).pow(2).flatten(1).mean(1)
    change = (err_after - err_before).tolist()
    for a_i, c in zip(adv.tolist(), change):
        assert (c < 0) if a_i > 0 else (c > 0) if a_i < 0 else (c == 0)


def test_nft_normaliser_floor_and_zero_error():
    shape = (2, 3, 4)
    x0, v = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    sigma, r = torch.full((2,), 0.4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    # |x0_hat - x0| = 1e-7 < 1e-5: L = 1e-14 / 1e-5
    loss, stats = compute_nft_loss(
        v, v.detach(), torch.full(shape, 1e-7, dtype=torch.float64), x0, sigma, r, nft_beta=1.0
    )
    assert float(stats["positive_loss"]) == pytest.approx(1e-14 / 1e-5, rel=1e-12)
    assert loss.item() == pytest.approx(5 * 1e-9, rel=1e-12)
    # zero error: zero loss and zero (finite) gradient
    loss, _ = compute_nft_loss(v, v.detach(), x0, x0, sigma, r, nft_beta=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(v.grad, torch.zeros_like(v))


def test_nft_stats_and_dtypes():
    b = make_batch(seed=4)
    r = nft_optimality(b["advantages"])
    v32 = b["v"].float().requires_grad_(True)
    inputs32 = [b[k].float() for k in ("old_v", "x_t", "x0", "sigma")]
    loss32, stats = compute_nft_loss(v32, *inputs32, r.float(), nft_beta=1.0, ref_velocity=b["ref_v"].float())
    loss32.backward()
    loss64, _ = compute_nft_loss(b["v"], *[x.double() for x in inputs32], r, nft_beta=1.0)
    assert loss32.dtype == torch.float64 and v32.grad.dtype == torch.float32
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-6)
    assert float(stats["kl"]) > 0 and all(not s.requires_grad for s in stats.values())
    assert set(stats) == {
        "policy_loss",
        "positive_loss",
        "negative_loss",
        "x0_error",
        "old_deviation",
        "optimality",
        "kl",
    }

    v, old_v, x_t, x0, sigma = (np_(b[k]) for k in ("v", "old_v", "x_t", "x0", "sigma"))
    _, stats = compute_nft_loss(b["v"], b["old_v"], b["x_t"], b["x0"], b["sigma"], r, nft_beta=1.0)
    x0_error = np.mean([np.abs(x_t[i] - sigma[i] * v[i] - x0[i]).mean() for i in range(5)])
    assert float(stats["x0_error"]) == pytest.approx(x0_error, rel=1e-12)
    assert float(stats["old_deviation"]) == pytest.approx(np.mean((v - old_v) ** 2), rel=1e-12)
    assert float(stats["optimality"]) == pytest.approx(float(r.mean()), rel=1e-15)
    assert "kl" not in stats


def test_nft_bad_arguments():
    b = make_batch(batch=2)
    args = (b["v"], b["old_v"], b["x_t"], b["x0"], b["sigma"], torch.ones(2))
    with pytest.raises(ValueError, match="nft_beta must be > 0"):
        compute_nft_loss(*args, nft_beta=0.0)
    with pytest.raises(ValueError, match="kl_beta > 0 needs ref_velocity"):
        compute_nft_loss(*args, nft_beta=1.0, kl_beta=1e-4)
    with pytest.raises(ValueError, match="sigma must have one value per sample"):
        compute_nft_loss(*args[:4], torch.ones(3), args[5], nft_beta=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# AWM
# ----------------------------------------------------------------------------------------------------------------------


def awm_weight_reference(err, t, weighting, p=0.25):
    """``w(l, t)`` at ``l = err``, of the official ``compute_log_prob_awm`` and its derivative ``dw/dl``."""
    if weighting == "uniform":
        return err, 1.0
    if weighting == "t":
        return t * err, t
    if weighting == "t_squared":
        return t * t * err, t * t
    if weighting == "huber":
        return t * (np.sqrt(err + DELTA) - 1e-5), t / (2 * np.sqrt(err + DELTA))
    if weighting == "ghuber":
        return t / p * ((err + DELTA) ** p - DELTA**p), t * (err + DELTA) ** (p - 1)
    raise AssertionError(weighting)


@pytest.mark.parametrize("weighting", AWM_WEIGHTINGS)
def test_awm_log_likelihood_matches_each_weighting(weighting):
    b = make_batch(seed=5)
    out = awm_log_likelihood(b["v"], b["target"], b["sigma"], weighting=weighting)
    v, target, sigma = np_(b["v"]), np_(b["target"]), np_(b["sigma"])
    expected = [-awm_weight_reference(((v[i] - target[i]) ** 2).mean(), sigma[i], weighting)[0] for i in range(5)]
    assert out.shape == (5,) and out.dtype == torch.float64
    np.testing.assert_allclose(np_(out), expected, rtol=1e-13)


def test_awm_log_likelihood_details():
    b = make_batch(seed=6)
    v32, target32 = b["v"].float(), b["target"].float()
    # the error is taken in float64 even for float32 inputs
    assert torch.equal(
        awm_log_likelihood(v32, target32, b["sigma"].float()),
        awm_log_likelihood(v32.double(), target32.double(), b["sigma"].float().double()),
    )
    # ghuber with p = 1/2 is twice the official huber (which has no 1/p)
    ghuber_half = awm_log_likelihood(b["v"], b["target"], b["sigma"], weighting="ghuber", ghuber_power=0.5)
    huber = awm_log_likelihood(b["v"], b["target"], b["sigma"], weighting="huber")
    torch.testing.assert_close(ghuber_half, 2 * huber, rtol=1e-12, atol=1e-18)
    # zero error: both Huber forms vanish and keep a finite gradient
    for weighting in ("huber", "ghuber"):
        v = b["target"].clone().requires_grad_(True)
        out = awm_log_likelihood(v, b["target"], b["sigma"], weighting=weighting)
        out.sum().backward()
        assert out.abs().max() < 1e-20 and torch.isfinite(v.grad).all()


def test_awm_log_likelihood_bad_arguments():
    b = make_batch(batch=2)
    with pytest.raises(ValueError, match=r"Unknown weighting 'Uniform'; expected one of \('uniform'"):
        awm_log_likelihood(b["v"], b["target"], b["sigma"], weighting="Uniform")
    with pytest.raises(ValueError, match="ghuber_power must be > 0"):
        awm_log_likelihood(b["v"], b["target"], b["sigma"], ghuber_power=0.0)
    with pytest.raises(ValueError, match="sigma must have one value per sample"):
        awm_log_likelihood(b["v"], b["target"], torch.ones(3))


def awm_loss_reference(log_p, old_log_p, adv, *, epsilon, clip_max=5.0, adv_max=1.0):
    """The clipped loss and its gradient with respect to ``log_p``, one sample at a time."""
    batch = len(log_p)
    total, grad = 0.0, np.zeros(batch)
    for i in range(batch):
        a = min(max(adv[i], -clip_max), clip_max) / clip_max * adv_max
        rho = np.exp(log_p[i] - old_log_p[i])
        unclipped, clipped = -a * rho, -a * min(max(rho, 1 - epsilon), 1 + epsilon)
        total += max(unclipped, clipped) / batch
        outside = (a > 0 and rho > 1 + epsilon) or (a < 0 and rho < 1 - epsilon)
        grad[i] = 0.0 if outside else -a * rho / batch
    return total, grad


@pytest.mark.parametrize("epsilon", [1.0, 0.2])
@pytest.mark.parametrize("adv_max", [1.0, 0.5])
def test_awm_loss_and_gradient_match_the_reference(epsilon, adv_max):
    old = torch.tensor([-0.4, -0.1, -0.3, -0.2, -0.5, -0.6, -0.05, -0.2], dtype=torch.float64)
    log_p = (old + torch.tensor([0.9, -0.5, 0.1, -0.1, 0.3, -1.2, 0.05, 0.8], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([3.0, -2.0, 6.0, -7.0, -1.0, 2.0, 0.5, -4.0], dtype=torch.float64)
    loss, stats = compute_awm_loss(log_p, old, adv, epsilon=epsilon, advantage_max=adv_max)
    loss.backward()
    ref_loss, ref_grad = awm_loss_reference(np_(log_p), np_(old), np_(adv), epsilon=epsilon, adv_max=adv_max)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-13)
    np.testing.assert_allclose(np_(log_p.grad), ref_grad, rtol=1e-13, atol=1e-18)
    rho = np.exp(np_(log_p) - np_(old))
    assert float(stats["ratio_mean"]) == pytest.approx(rho.mean(), rel=1e-13)
    assert float(stats["clip_frac"]) == np.mean(np.abs(rho - 1) > epsilon)
    assert float(stats["clip_frac_high"]) == np.mean(rho > 1 + epsilon)
    assert float(stats["clip_frac_low"]) == np.mean(rho < 1 - epsilon)
    if epsilon == 1.0:  # the official clip range: ratios are never clipped below (1 - epsilon = 0)
        assert float(stats["clip_frac_low"]) == 0.0 and float(stats["clip_frac_high"]) > 0


@pytest.mark.parametrize("weighting", AWM_WEIGHTINGS)
def test_awm_loss_gradient_through_the_likelihood_by_finite_differences(weighting):
    b = make_batch(batch=4, shape=(2, 3, 3), seed=7, drift=0.05)
    old = awm_log_likelihood(b["old_v"], b["target"], b["sigma"], weighting=weighting)

    def loss_of(v):
        log_p = awm_log_likelihood(v, b["target"], b["sigma"], weighting=weighting)
        penalty, _ = compute_awm_regularizer(
            v, ref_velocity=b["ref_v"], ref_weight=1e-3, lagged_velocity=b["old_v"], lagged_weight=1.0
        )
        return compute_awm_loss(log_p, old, b["advantages"], epsilon=0.3)[0] + penalty

    assert torch.autograd.gradcheck(loss_of, (b["v"].clone().requires_grad_(True),))


@pytest.mark.parametrize("weighting", AWM_WEIGHTINGS)
def test_awm_on_policy_ratio_is_exactly_one_and_gradient_is_advantage_weighted(weighting):
    """Equal inputs: rho = 1.0 exactly, nothing clipped, and grad = -E[A_hat grad log p_tilde].

    ``grad_v log p_tilde = -(dw/dl) 2 (v - v*) / D``.
    """
    b = make_batch(seed=8)
    v = b["v"].clone().requires_grad_(True)
    log_p = awm_log_likelihood(v, b["target"], b["sigma"], weighting=weighting)
    old = awm_log_likelihood(b["v"].clone(), b["target"], b["sigma"], weighting=weighting)
    loss, stats = compute_awm_loss(log_p, old, b["advantages"], epsilon=1e-3)
    loss.backward()
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["log_ratio_mean"]) == 0.0
    assert float(stats["clip_frac"]) == float(stats["clip_frac_high"]) == float(stats["clip_frac_low"]) == 0.0

    vv, target, sigma, adv = np_(b["v"]), np_(b["target"]), np_(b["sigma"]), np_(b["advantages"])
    batch, size = vv.shape[0], vv[0].size
    expected = np.zeros_like(vv)
    for i in range(batch):
        a_hat = np.clip(adv[i], -5, 5) / 5
        dw_dl = awm_weight_reference(((vv[i] - target[i]) ** 2).mean(), sigma[i], weighting)[1]
        grad_log_p = -dw_dl * 2 * (vv[i] - target[i]) / size
        expected[i] = -a_hat * grad_log_p / batch
    np.testing.assert_allclose(np_(v.grad), expected, rtol=1e-12, atol=1e-18)
    assert loss.item() == pytest.approx(-np.mean(np.clip(adv, -5, 5) / 5), rel=1e-15)


def test_awm_loss_bad_arguments():
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        compute_awm_loss(x, x, x, epsilon=0.0)
    with pytest.raises(ValueError, match="adv_clip_max and advantage_max must be > 0"):
        compute_awm_loss(x, x, x, epsilon=1.0, adv_clip_max=0.0)


def test_awm_regularizer_values_and_gradient():
    b = make_batch(seed=9)
    v = b["v"].float().requires_grad_(True)
    penalty, stats = compute_awm_regularizer(
        v, ref_velocity=b["ref_v"], ref_weight=1e-3, lagged_velocity=b["old_v"], lagged_weight=1.0
    )
    penalty.backward()
    vv, ref, lag = np_(v), np_(b["ref_v"]), np_(b["old_v"])
    batch, size = vv.shape[0], vv[0].size
    ref_d = np.mean([((vv[i] - ref[i]) ** 2).mean() for i in range(batch)])
    lag_d = np.mean([((vv[i] - lag[i]) ** 2).mean() for i in range(batch)])
    assert penalty.dtype == torch.float64
    assert penalty.item() == pytest.approx(1e-3 * ref_d + lag_d, rel=1e-12)
    assert float(stats["ref_distance"]) == pytest.approx(ref_d, rel=1e-12)
    assert float(stats["lagged_distance"]) == pytest.approx(lag_d, rel=1e-12)
    expected = (1e-3 * 2 * (vv - ref) + 2 * (vv - lag)) / (size * batch)
    np.testing.assert_allclose(np_(v.grad), expected, rtol=1e-6)

    # a zero weight reports the distance but adds nothing
    penalty, stats = compute_awm_regularizer(b["v"], ref_velocity=b["ref_v"])
    assert penalty.item() == 0.0 and set(stats) == {"ref_distance"}
    with pytest.raises(ValueError, match="lagged_weight > 0 needs lagged_velocity"):
        compute_awm_regularizer(b["v"], lagged_weight=1.0)
    with pytest.raises(ValueError, match="ref_weight must be >= 0"):
        compute_awm_regularizer(b["v"], ref_velocity=b["ref_v"], ref_weight=-1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Lagged-copy decay
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, steps, expected",
    [
        ("none", [0, 10, 10_000], [0.0, 0.0, 0.0]),
        ("nft", [0, 1, 100, 499, 500, 10_000], [0.0, 0.001, 0.1, 0.499, 0.5, 0.5]),
        ("nft_ocr", [0, 74, 75, 76, 175, 208, 209, 10_000], [0.0, 0.0, 0.0, 0.0075, 0.75, 0.9975, 0.999, 0.999]),
        ("awm", [0, 1, 100, 299, 300, 10_000], [0.0, 0.001, 0.1, 0.299, 0.3, 0.3]),
    ],
)
def test_lagged_decay_schedules(schedule, steps, expected):
    assert [lagged_decay(s, schedule) for s in steps] == pytest.approx(expected, abs=1e-12)


def test_lagged_decay_bad_arguments():
    with pytest.raises(ValueError, match=r"Unknown schedule 'linear'; expected one of \('none', 'nft'"):
        lagged_decay(10, "linear")
    with pytest.raises(ValueError, match="step must be >= 0"):
        lagged_decay(-1, "nft")


def test_forward_names_are_exported():
    assert losses.FORWARD_LOSS_TYPES == ("nft", "awm")
    assert LAGGED_DECAY_SCHEDULES == ("none", "nft", "nft_ocr", "awm")
    for name in ("nft_optimality", "compute_nft_loss", "awm_log_likelihood", "compute_awm_loss", "lagged_decay"):
        assert name in losses.__all__
