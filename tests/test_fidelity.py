"""The math that must agree with the official Flow-GRPO / GRPO-Guard code, checked against float64 references written
from the formulas (not from our implementation): Flow-GRPO's KL, CPS sampling, the sampling log-prob's gradient, the
trained timesteps and the per-step weights under CPS."""

import math

import pytest
import torch

from trl_guard import compute_kl, compute_policy_loss, sde_step_with_logprob
from trl_guard.losses import SDE_LOSS_TYPES, timestep_weight
from trl_guard.rollout import select_train_steps
from trl_guard.sde import sde_std, velocity_coefficient


def sd3_sigmas(steps: int = 10, shift: float = 3.0) -> torch.Tensor:
    """The schedule SD3.5 samples with: diffusers' flow-matching Euler scheduler, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


def flow_grpo_kl64(mean, ref_mean, sigma, sigma_next, noise_level):
    """Flow-GRPO's kl_loss: MEAN((mean - ref_mean)**2) / (2 s**2), s its std_dev_t (the diffusion coefficient)."""
    sigma_max = sigma_next  # Flow-GRPO's substitute in the denominator where sigma == 1
    s = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    per_sample = ((mean.double() - ref_mean.double()) ** 2).flatten(1).mean(1) / (2 * s**2)
    return per_sample.mean()


@pytest.mark.parametrize("step", range(10))
def test_flow_grpo_kl_matches_the_official_definition(step):
    sigmas = sd3_sigmas()
    sigma, sigma_next = sigmas[step].expand(3), sigmas[step + 1].expand(3)
    g = torch.Generator().manual_seed(step)
    x, v = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g)
    v_ref = v + 0.05 * torch.randn(3, 4, 8, 8, generator=g)
    _, _, mean, std = sde_step_with_logprob(v.double(), x, sigma, sigma_next, noise_level=0.7)
    _, _, ref_mean, _ = sde_step_with_logprob(v_ref.double(), x, sigma, sigma_next, noise_level=0.7)
    ours = compute_kl(mean, ref_mean, std, sigma, sigma_next)  # kl_type="flow_grpo" by default
    torch.testing.assert_close(ours, flow_grpo_kl64(mean, ref_mean, sigma, sigma_next, 0.7), rtol=1e-12, atol=0)
    exact = compute_kl(mean, ref_mean, std, sigma, sigma_next, kl_type="exact")
    torch.testing.assert_close(ours, exact * (sigma[0] - sigma_next[0]), rtol=1e-12, atol=0)


def test_kl_factor_between_the_two_definitions_spans_the_schedule():
    """The factor exact / flow_grpo is 1/(-dt): about 4 to 112 on SD3's 10-step schedule (shift 3)."""
    sigmas = sd3_sigmas()
    factors = 1 / (sigmas[:-1] - sigmas[1:])
    assert 3.5 < float(factors.min()) < 4.5 and 100 < float(factors.max()) < 120


def test_kl_rejects_unknown_type():
    t = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="kl_type"):
        compute_kl(t, t, torch.ones(1, 1), torch.ones(1), torch.zeros(1), kl_type="reverse")


def test_sampling_log_prob_carries_the_policy_gradient():
    """Scoring the sample just drawn must differentiate through the mean only, as the official scores
    prev_sample.detach(); differentiating through the drawn sample would cancel the gradient exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    v = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    sigma, sigma_next = torch.tensor([0.8, 0.8]), torch.tensor([0.7, 0.7])
    _, log_prob, _, _ = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7, generator=g)
    (grad,) = torch.autograd.grad(log_prob.sum(), v)
    assert float(grad.abs().max()) > 1e-3


def cps_reference64(x, v, sigma, sigma_next, noise_level):
    x, v = x.double(), v.double()
    sigma, sigma_next = sigma.double().view(-1, 1, 1, 1), sigma_next.double().view(-1, 1, 1, 1)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    return x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt(sigma_next**2 - std**2), std


@pytest.mark.parametrize("step", range(10))
def test_cps_mean_and_std_match_the_reference(step):
    sigmas = sd3_sigmas()
    sigma, sigma_next = sigmas[step].expand(2), sigmas[step + 1].expand(2)
    g = torch.Generator().manual_seed(step)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_next, log_prob, mean, std = sde_step_with_logprob(
        v.double(), x.double(), sigma, sigma_next, noise_level=0.8, noise_schedule="cps", generator=g
    )
    ref_mean, ref_std = cps_reference64(x, v, sigma, sigma_next, 0.8)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, ref_std, rtol=1e-12, atol=0)
    # the official log-prob: -MEAN((x_next - mean)**2), constants and variance dropped
    official = -((x_next - ref_mean) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(log_prob, official, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(log_prob).all()


def test_cps_last_step_is_noiseless_and_finite():
    sigma, sigma_next = torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    v_new = (v + 0.01).requires_grad_(True)
    for cps_log_prob in ("official", "gaussian"):
        x_next, log_prob, mean, std = sde_step_with_logprob(
            v, x, sigma, sigma_next, noise_level=0.7, noise_schedule="cps", cps_log_prob=cps_log_prob
        )
        assert float(std.abs().max()) == 0.0
        torch.testing.assert_close(x_next, x - 0.1 * v)  # x0_hat: the step lands on the predicted clean image
        _, _, new_mean, _ = sde_step_with_logprob(
            v_new, x, sigma, sigma_next, noise_level=0.7, noise_schedule="cps", prev_sample=x_next
        )
        for loss_type in SDE_LOSS_TYPES:
            loss, stats = compute_policy_loss(
                new_mean, mean, x_next, std, torch.tensor([1.0, -1.0]), sigma, sigma_next,
                loss_type=loss_type, epsilon=1e-5, noise_level=0.7, noise_schedule="cps", cps_log_prob=cps_log_prob,
            )  # fmt: skip
            (grad,) = torch.autograd.grad(loss, v_new, retain_graph=True, allow_unused=True)
            grad = torch.zeros_like(v_new) if grad is None else grad
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), loss_type
            assert all(torch.isfinite(value) for value in stats.values()), loss_type
        kl = compute_kl(new_mean, mean, std, sigma, sigma_next, noise_schedule="cps")
        assert torch.isfinite(kl)


def test_cps_log_ratios_relate_as_derived():
    """Official CPS log r = 2 std**2 x the Gaussian one; RatioNorm is -MEAN(d * eps) under both."""
    from trl_guard.losses import policy_log_ratio

    g = torch.Generator().manual_seed(3)
    old_mean = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    std = torch.full((4, 1, 1, 1), 0.2, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    x, mean = old_mean + std * eps, old_mean + 1e-3 * torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    kwargs = dict(noise_schedule="cps")
    official = policy_log_ratio(mean, old_mean, x, std, loss_type="flow_grpo", cps_log_prob="official", **kwargs)
    gaussian = policy_log_ratio(mean, old_mean, x, std, loss_type="flow_grpo", cps_log_prob="gaussian", **kwargs)
    torch.testing.assert_close(official, 2 * 0.2**2 * gaussian)
    d = old_mean - mean
    for form in ("official", "gaussian"):
        ratio_norm = policy_log_ratio(mean, old_mean, x, std, loss_type="ratio_norm", cps_log_prob=form, **kwargs)
        torch.testing.assert_close(ratio_norm, -(d * eps).flatten(1).mean(1))


def test_guard_weight_under_cps_is_the_inverse_velocity_coefficient():
    """The weight undoes d mean / d v, checked by autograd on the reference mean; for the Euler step the same rule
    gives Flow-GRPO's 1/(-dt) up to the beta factor the official leaves out."""
    sigmas = sd3_sigmas()
    for step in range(9):
        sigma, sigma_next = sigmas[step].view(1), sigmas[step + 1].view(1)
        v = torch.zeros(1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
        mean, _ = cps_reference64(torch.ones(1, 1, 1, 1, dtype=torch.float64), v, sigma, sigma_next, 0.7)
        (slope,) = torch.autograd.grad(mean.sum(), v)
        coefficient = velocity_coefficient(sigma, sigma_next, noise_level=0.7, noise_schedule="cps")
        torch.testing.assert_close(coefficient, slope.view(1))
        weight = timestep_weight(sigma, sigma_next, loss_type="grpo_guard", noise_level=0.7, noise_schedule="cps")
        torch.testing.assert_close(weight, 1 / slope.abs().view(1))
    with_zero_noise = velocity_coefficient(sigmas[2:3], sigmas[3:4], noise_level=1e-9, noise_schedule="cps")
    torch.testing.assert_close(with_zero_noise, sigmas[3:4] - sigmas[2:3])


def test_first_timesteps_are_the_official_rule():
    assert select_train_steps(torch.ones(10), 0.99, "first") == list(range(9))
    assert select_train_steps(torch.ones(10), 1.0, "first") == list(range(10))
    assert select_train_steps(torch.ones(10), 0.5, "first") == list(range(5))
    sigmas = sd3_sigmas()
    cps_std = sde_std(sigmas[:-1], sigmas[1:], noise_level=0.7, noise_schedule="cps")
    assert select_train_steps(cps_std, 1.0, "first") == list(range(9))  # the noiseless last step never
    drawn = select_train_steps(torch.ones(10), 0.5, "random", generator=torch.Generator().manual_seed(0))
    assert len(drawn) == 5 and drawn == sorted(drawn) and drawn != list(range(5))


def wan_sigmas(steps: int = 20) -> torch.Tensor:
    """The grid Wan2.1 samples on: its checkpoints' UniPC scheduler with flow sigmas and flow_shift 3, through our
    Wan adapter (which samples on the checkpoint scheduler's own grid)."""
    from diffusers import UniPCMultistepScheduler

    from trl_guard.adapters import SamplingSettings, get_adapter
    from trl_guard.testing import build_tiny_wan_pipeline

    pipeline = build_tiny_wan_pipeline()
    pipeline.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    adapter = get_adapter(pipeline)
    adapter.configure(SamplingSettings(32, 32, num_frames=5))
    return adapter.sigmas(steps).double()


def wan_reference64(x, v, sigma, sigma_next, sigmas):
    """Flow-GRPO's Wan2.1 SDE step (flow_grpo/diffusers_patch/wan_pipeline_with_logprob.py): a noise scale linear in
    sigma between the grid's last sigma and its second, the Euler-Maruyama mean and std."""
    x, v = x.double(), v.double()
    sigma, sigma_next = sigma.double().view(-1, 1, 1, 1), sigma_next.double().view(-1, 1, 1, 1)
    sigma_max, sigma_min = sigmas[1].item(), sigmas[-1].item()
    dt = sigma_next - sigma
    std_dev_t = sigma_min + (sigma_max - sigma_min) * sigma
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * torch.sqrt(-dt)


def test_linear_schedule_is_flow_grpos_wan_step_on_the_wan_grid():
    """noise_schedule="linear" with noise_level = sigmas[1] is the official Wan step, on every step of the grid."""
    sigmas = wan_sigmas()
    assert sigmas[-1] == 0 and 0.9 < sigmas[1] < 1  # the grid ends at 0, so sigma_min drops out
    for step in range(20):
        sigma, sigma_next = sigmas[step].expand(2), sigmas[step + 1].expand(2)
        g = torch.Generator().manual_seed(step)
        x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        x_next, log_prob, mean, std = sde_step_with_logprob(
            v.double(),
            x.double(),
            sigma,
            sigma_next,
            noise_level=sigmas[1].item(),
            noise_schedule="linear",
            generator=g,
        )
        ref_mean, ref_std = wan_reference64(x, v, sigma, sigma_next, sigmas)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(std, ref_std.expand_as(std), rtol=1e-12, atol=0)
        official = (
            -((x_next - ref_mean) ** 2) / (2 * ref_std**2) - torch.log(ref_std) - math.log(math.sqrt(2 * math.pi))
        ).flatten(1).mean(1)  # fmt: skip
        torch.testing.assert_close(log_prob, official, rtol=1e-12, atol=1e-12)
        # GRPO-Guard's weight under it is the inverse of d mean / d v, by autograd on the official mean
        v0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(
            wan_reference64(torch.ones_like(v0), v0, sigma[:1], sigma_next[:1], sigmas)[0].sum(), v0
        )
        weight = timestep_weight(
            sigma[:1], sigma_next[:1], loss_type="grpo_guard", noise_level=sigmas[1].item(), noise_schedule="linear"
        )
        torch.testing.assert_close(weight, 1 / slope.abs().view(1), rtol=1e-12, atol=0)


def test_wan_recipe_uses_the_official_wan_schedule():
    import yaml

    with open("examples/recipes/wan21_t2v_guard_example.yaml") as f:
        recipe = yaml.safe_load(f)
    assert recipe["noise_schedule"] == "linear"
    sigma_max = wan_sigmas(recipe["num_inference_steps"])[1].item()
    assert recipe["noise_level"] == pytest.approx(sigma_max, abs=1e-5)
