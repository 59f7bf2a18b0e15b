import math

import pytest
import torch

from trl_guard import compute_advantages, compute_kl, compute_policy_loss
from trl_guard.losses import SDE_LOSS_TYPES, policy_log_ratio


def make_step(batch=6, seed=0, shift=1e-3):
    """A recorded step: old policy's mean, a sample from it, and a slightly different current mean."""
    g = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(batch, 4, 8, 8, generator=g)
    std = torch.rand(batch, 1, 1, 1, generator=g) * 0.3 + 0.05
    eps = torch.randn(batch, 4, 8, 8, generator=g)
    prev_sample = old_mean + std * eps
    mean = old_mean + shift * torch.randn(batch, 4, 8, 8, generator=g)
    return mean, old_mean, prev_sample, std, eps


def gaussian_log_prob64(x, mean, std):
    x, mean, std = x.double(), mean.double(), std.double()
    return (-((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def reference_loss64(mean, old_mean, x, std, adv, sigma, sigma_next, loss_type, epsilon, noise_level, schedule):
    """Paper Table 2 in float64, from log-densities rather than the library's factored form."""
    log_r = gaussian_log_prob64(x, mean, std) - gaussian_log_prob64(x, old_mean, std)
    d = (old_mean - mean).double()
    std64 = std.double().flatten()
    shift = (d**2).flatten(1).mean(1) / (2 * std64**2)
    sigma, sigma_next = sigma.double(), sigma_next.double()
    neg_dt = sigma - sigma_next
    s = (
        noise_level * torch.sqrt(sigma / (1 - sigma))
        if schedule == "flow_grpo"
        else torch.full_like(sigma, noise_level)
    )
    used = {
        "flow_grpo": log_r,
        "temp_reweight": log_r,
        "mean_revised": log_r + shift,
        "ratio_norm": std64 * (log_r + shift),
        "grpo_guard": std64 * (log_r + shift),
    }[loss_type]
    if loss_type == "temp_reweight":
        weight = s * torch.sqrt(neg_dt)
    elif loss_type == "grpo_guard":
        beta_t = 1 + noise_level**2 * (1 - sigma) / (2 * sigma)
        weight = 1 / neg_dt if schedule == "flow_grpo" else beta_t / neg_dt
    else:
        weight = torch.ones_like(sigma)
    r = torch.exp(used)
    adv = adv.double()
    per_sample = weight * torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - epsilon, 1 + epsilon))
    return per_sample.mean(), used


@pytest.mark.parametrize("loss_type", SDE_LOSS_TYPES)
@pytest.mark.parametrize("schedule", ["flow_grpo", "dance_grpo"])
def test_policy_loss_matches_float64_reference(loss_type, schedule):
    mean, old_mean, x, std, _ = make_step(seed=3)
    adv = torch.tensor([1.5, -0.5, 0.2, -2.0, 0.8, -0.1])
    sigma = torch.full((6,), 0.6)
    sigma_next = torch.full((6,), 0.5)
    # The std of the step must be the one its schedule implies, for temp_reweight's weight to be comparable.
    epsilon = 1e-4
    loss, stats = compute_policy_loss(
        mean,
        old_mean,
        x,
        std,
        adv,
        sigma,
        sigma_next,
        loss_type=loss_type,
        epsilon=epsilon,
        noise_level=0.7,
        noise_schedule=schedule,
        dance_weighting="paper",
    )
    ref_loss, ref_used = reference_loss64(
        mean, old_mean, x, std, adv, sigma, sigma_next, loss_type, epsilon, 0.7, schedule
    )
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-7)
    assert float(stats["log_ratio_mean"]) == pytest.approx(float(ref_used.mean()), rel=1e-3, abs=1e-8)
    r = torch.exp(ref_used)
    assert float(stats["clip_frac_high"]) == pytest.approx(float((r > 1 + epsilon).double().mean()))
    assert float(stats["clip_frac_low"]) == pytest.approx(float((r < 1 - epsilon).double().mean()))


def test_log_ratio_decomposition_and_ratio_norm_identity():
    mean, old_mean, x, std, eps = make_step(seed=5)
    d = old_mean - mean
    log_r = policy_log_ratio(mean, old_mean, x, std, loss_type="flow_grpo").double()
    expected = (
        -(d.double() ** 2).flatten(1).mean(1) / (2 * std.double().flatten() ** 2)
        - (d.double() * eps.double()).flatten(1).mean(1) / std.double().flatten()
    )
    torch.testing.assert_close(log_r, expected, rtol=1e-4, atol=1e-9)
    mean_revised = policy_log_ratio(mean, old_mean, x, std, loss_type="mean_revised").double()
    torch.testing.assert_close(
        mean_revised, -(d * eps).double().flatten(1).mean(1) / std.double().flatten(), rtol=1e-4, atol=1e-9
    )
    ratio_norm = policy_log_ratio(mean, old_mean, x, std, loss_type="ratio_norm").double()
    torch.testing.assert_close(ratio_norm, -(d * eps).double().flatten(1).mean(1), rtol=1e-4, atol=1e-10)


def test_log_ratio_is_shifted_below_zero_by_the_predicted_amount():
    """E[log r] = -MEAN(d**2) / (2 std**2) < 0: the left shift of the paper's Fig. 2."""
    g = torch.Generator().manual_seed(0)
    old_mean = torch.zeros(4000, 1, 8, 8)
    std = torch.full((4000, 1, 1, 1), 0.1)
    d = torch.full((1, 1, 8, 8), 0.02)
    x = old_mean + std * torch.randn(4000, 1, 8, 8, generator=g)
    log_r = policy_log_ratio(old_mean - d, old_mean, x, std, loss_type="flow_grpo")
    predicted = -(0.02**2) / (2 * 0.1**2)
    assert predicted < 0
    assert float(log_r.mean()) == pytest.approx(predicted, rel=0.1)
    normalised = policy_log_ratio(old_mean - d, old_mean, x, std, loss_type="ratio_norm")
    assert abs(float(normalised.mean())) < 0.1 * abs(predicted) * 0.1


def test_same_policy_gives_ratio_exactly_one_and_plain_policy_gradient():
    mean, _, x, std, _ = make_step(seed=1)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    sigma, sigma_next = torch.full((6,), 0.8), torch.full((6,), 0.7)
    for loss_type in SDE_LOSS_TYPES:
        loss, stats = compute_policy_loss(
            mean, mean, x, std, adv, sigma, sigma_next, loss_type=loss_type, epsilon=2e-6, noise_level=0.7
        )
        assert float(stats["log_ratio_mean"]) == 0.0 and float(stats["log_ratio_std"]) == 0.0
        assert float(stats["clip_frac_high"]) == 0.0 and float(stats["clip_frac_low"]) == 0.0
        assert float(loss) == pytest.approx(float((-adv * stats["weight"]).mean()), rel=1e-6)


def test_clipped_samples_get_no_gradient():
    _, old_mean, x, std, _ = make_step(batch=2, seed=2, shift=0.0)
    # Sample 0's mean moved towards its sample: ratio far above 1 + epsilon with a positive advantage, so PPO stops
    # its gradient. Sample 1 is on-policy (ratio 1) and keeps its gradient.
    current = old_mean.clone()
    current[0] = old_mean[0] + 0.05 * (x[0] - old_mean[0])
    current.requires_grad_(True)
    loss, stats = compute_policy_loss(
        current,
        old_mean,
        x,
        std,
        torch.tensor([1.0, 1.0]),
        torch.full((2,), 0.5),
        torch.full((2,), 0.4),
        loss_type="flow_grpo",
        epsilon=1e-4,
        noise_level=0.7,
    )
    assert float(stats["clip_frac_high"]) == 0.5
    loss.backward()
    assert float(current.grad[0].abs().sum()) == 0.0
    assert float(current.grad[1].abs().sum()) > 0.0


@pytest.mark.parametrize(
    ("loss_type", "epsilon", "message"), [("grpo_guard", 0.0, "epsilon"), ("ppo", 1e-4, "loss_type")]
)
def test_bad_epsilon_or_loss_type_is_named(loss_type, epsilon, message):
    mean, old_mean, x, std, _ = make_step(batch=2)
    sigma, sigma_next = torch.full((2,), 0.5), torch.full((2,), 0.4)
    with pytest.raises(ValueError, match=message):
        compute_policy_loss(
            mean,
            old_mean,
            x,
            std,
            torch.ones(2),
            sigma,
            sigma_next,
            loss_type=loss_type,
            epsilon=epsilon,
            noise_level=0.7,
        )


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = compute_advantages(rewards, 4)
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: zero advantage, not NaN
    batch = compute_advantages(rewards, 4, scale_rewards="batch")
    torch.testing.assert_close(batch[:4], (first - first.mean()) / (rewards.std(unbiased=False) + 1e-4))
    none = compute_advantages(rewards, 4, scale_rewards="none")
    torch.testing.assert_close(none[:4], first - first.mean())
    clipped = compute_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), 4, scale_rewards="none", adv_clip_max=5.0)
    assert float(clipped.max()) == 5.0 and float(clipped.min()) == -5.0
    with pytest.raises(ValueError, match="num_generations"):
        compute_advantages(torch.ones(5), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(torch.ones(4), 4, scale_rewards="global")


def test_dance_grpo_weightings():
    from trl_guard.losses import timestep_weight

    sigma, sigma_next = torch.tensor([0.8, 0.3]), torch.tensor([0.6, 0.1])
    beta_t = 1 + 0.7**2 * (1 - sigma) / (2 * sigma)
    kwargs = dict(loss_type="grpo_guard", noise_level=0.7, noise_schedule="dance_grpo")
    torch.testing.assert_close(timestep_weight(sigma, sigma_next, dance_weighting="paper", **kwargs), beta_t / 0.2)
    torch.testing.assert_close(
        timestep_weight(sigma, sigma_next, **kwargs),
        1 / (beta_t * 0.2),  # the default
    )
    with pytest.raises(ValueError, match="dance_weighting"):
        timestep_weight(sigma, sigma_next, dance_weighting="both", **kwargs)


def test_exact_kl_closed_form():
    mean, ref_mean = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.3)
    std = torch.full((2, 1, 1, 1), 0.5)
    sigma, sigma_next = torch.full((2,), 0.5), torch.full((2,), 0.4)
    kl = compute_kl(mean, ref_mean, std, sigma, sigma_next, kl_type="exact")
    assert float(kl) == pytest.approx(0.09 / (2 * 0.25))
