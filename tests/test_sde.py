import math

import pytest
import torch

from trl_guard import ode_step, sde_step_with_logprob


def reference_step(v, x, sigma, sigma_next, noise_level, schedule, x_next):
    """The SDE step of docs/method.md written out in float64, independently of the library."""
    v, x, x_next = v.double(), x.double(), x_next.double()
    out_mean, out_std, out_lp = [], [], []
    for b in range(x.shape[0]):
        s_, sn = float(sigma[b]), float(sigma_next[b])
        if schedule == "flow_grpo":
            denom = sn if s_ == 1 else s_
            s = noise_level * math.sqrt(s_ / (1 - denom))
        else:
            s = noise_level
        dt = sn - s_
        mean = x[b] + (v[b] + s**2 / (2 * s_) * (x[b] + (1 - s_) * v[b])) * dt
        std = s * math.sqrt(-dt)
        log_density = -((x_next[b] - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        out_mean.append(mean)
        out_std.append(std)
        out_lp.append(log_density.mean())
    return torch.stack(out_mean), torch.tensor(out_std, dtype=torch.float64), torch.stack(out_lp)


@pytest.mark.parametrize("schedule", ["flow_grpo", "dance_grpo"])
@pytest.mark.parametrize("first_step", [True, False])
def test_sde_step_matches_float64_reference(schedule, first_step):
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([1.0, 1.0, 1.0]) if first_step else torch.tensor([0.9, 0.5, 0.2])
    sigma_next = torch.tensor([0.95, 0.8, 0.9]) if first_step else torch.tensor([0.7, 0.3, 0.0])
    x_next, log_prob, mean, std = sde_step_with_logprob(
        v, x, sigma, sigma_next, noise_level=0.7, noise_schedule=schedule
    )
    ref_mean, ref_std, ref_lp = reference_step(v, x, sigma, sigma_next, 0.7, schedule, x_next)
    assert torch.isfinite(log_prob).all()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.flatten().double(), ref_std, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_prob.double(), ref_lp, rtol=1e-5, atol=1e-5)
    assert std.shape == (3, 1, 1, 1) and log_prob.shape == (3,)


def test_sigma_one_uses_sigma_next_in_the_noise_scale():
    x, v = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    _, _, _, std = sde_step_with_logprob(v, x, torch.tensor([1.0]), torch.tensor([0.75]), noise_level=0.5)
    expected = 0.5 * math.sqrt(1.0 / (1 - 0.75)) * math.sqrt(0.25)
    assert float(std) == pytest.approx(expected, rel=1e-6)


def test_given_prev_sample_is_scored_not_resampled():
    torch.manual_seed(1)
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sigma, sigma_next = torch.tensor([0.8, 0.8]), torch.tensor([0.6, 0.6])
    x_next, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7)
    again, log_prob_again, _, _ = sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7, prev_sample=x_next)
    assert torch.equal(again, x_next) and torch.equal(log_prob_again, log_prob)
    # The drawn noise is standard normal: the log-prob of an exact sample averages -0.5 - log(std) - log(sqrt(2 pi)).
    big_x, big_v = torch.randn(4, 16, 32, 32), torch.randn(4, 16, 32, 32)
    s4, n4 = torch.full((4,), 0.8), torch.full((4,), 0.6)
    _, lp, _, st = sde_step_with_logprob(
        big_v, big_x, s4, n4, noise_level=0.7, generator=torch.Generator().manual_seed(0)
    )
    expected = -0.5 - torch.log(st.flatten()) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lp, expected, atol=0.02, rtol=0)


def test_per_sample_generators_make_noise_independent_of_batching():
    x, v = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    sigma, sigma_next = torch.full((2,), 0.5), torch.full((2,), 0.4)
    pair, _, _, _ = sde_step_with_logprob(
        v, x, sigma, sigma_next, noise_level=0.7, generator=[torch.Generator().manual_seed(s) for s in (7, 8)]
    )
    single, _, _, _ = sde_step_with_logprob(
        v[1:], x[1:], sigma[1:], sigma_next[1:], noise_level=0.7, generator=[torch.Generator().manual_seed(8)]
    )
    assert torch.equal(pair[1], single[0])
    with pytest.raises(ValueError, match="generators"):
        sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7, generator=[torch.Generator()])


def test_unknown_noise_schedule_is_rejected():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="noise_schedule"):
        sde_step_with_logprob(x, x, torch.tensor([0.5]), torch.tensor([0.4]), noise_level=0.7, noise_schedule="ddpm")


def test_ode_step_is_euler():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = ode_step(v, x, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(out, x + v * torch.tensor([-0.2, -0.5]).view(2, 1, 1, 1))


def test_bf16_inputs_are_computed_in_float32():
    x, v = torch.randn(2, 4, 4, 4).bfloat16(), torch.randn(2, 4, 4, 4).bfloat16()
    x_next, log_prob, mean, std = sde_step_with_logprob(
        v, x, torch.full((2,), 0.9), torch.full((2,), 0.8), noise_level=0.7
    )
    assert mean.dtype == torch.float32 and log_prob.dtype == torch.float32
