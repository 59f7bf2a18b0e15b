"""The gradient-signal benchmark's estimate, on draws whose signal fraction is known."""

import numpy as np
import pytest
from gradient_signal import bootstrap, scaled, signal_fraction


def draws(signal: float, noise: float, steps: int = 300, dim: int = 200, seed: int = 0) -> np.ndarray:
    """`steps` gradients with mean of squared norm `signal` and noise of total variance `noise`."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim)
    mean *= np.sqrt(signal) / np.linalg.norm(mean)
    return mean + rng.normal(scale=np.sqrt(noise / dim), size=(steps, dim))


@pytest.mark.parametrize(("signal", "noise"), [(1.0, 3.0), (1.0, 0.0), (0.0, 1.0)])
def test_the_signal_fraction_is_the_share_of_the_squared_norm_in_the_mean(signal, noise):
    """Few steps, as the benchmark has, over many seeds: counting a step paired with itself would add about
    (1 - share) / 8 here (0.09 and 0.125 for the first and last cases)."""
    estimates = [signal_fraction(draws(signal, noise, steps=8, seed=seed)) for seed in range(300)]
    assert np.mean(estimates) == pytest.approx(signal / (signal + noise), abs=0.01)


def test_the_interval_covers_the_truth_and_a_larger_batch_raises_the_fraction():
    gradients = draws(1.0, 3.0, steps=24)
    low, high = bootstrap(gradients, draws=500)
    assert low < 0.25 < high and high - low < 0.5
    assert scaled(0.25, 1) == pytest.approx(0.25) and scaled(0.25, 4) == pytest.approx(1 / (1 + 0.75))
