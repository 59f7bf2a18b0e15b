"""Several rewards at once: `multi_reward_normalization="sum"` (weighted sum, then group normalisation) against
`"decoupled"` (each reward normalised in its group, then weighted: GDPO), and the per-reward advantages logged."""

import hashlib

import pytest
import torch

from trl_guard import GuardConfig
from trl_guard.losses import compute_advantages, compute_multi_reward_advantages


def correlation(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def two_scales(groups=16, num_generations=4, seed=0):
    """A judge-like reward on a 0-100 scale and a CLIP-like one on a 0-0.1 scale, independent of each other."""
    generator = torch.Generator().manual_seed(seed)
    large = 100 * torch.rand(groups * num_generations, generator=generator)
    small = 0.1 * torch.rand(groups * num_generations, generator=generator)
    return torch.stack([large, small], dim=1)


def test_a_large_scale_reward_drowns_a_small_one_in_the_sum_but_not_when_decoupled():
    rewards, weights = two_scales(), torch.ones(2)
    summed, per_reward = compute_multi_reward_advantages(rewards, weights, 4, normalization="sum")
    decoupled, same = compute_multi_reward_advantages(rewards, weights, 4, normalization="decoupled")
    large, small = per_reward[:, 0], per_reward[:, 1]

    assert correlation(summed, large) > 0.999  # the small reward does not count at all
    assert abs(correlation(summed, small)) < 0.3
    assert correlation(decoupled, large) == pytest.approx(correlation(decoupled, small), abs=0.1)
    assert correlation(decoupled, small) > 0.5
    torch.testing.assert_close(decoupled, (large + small).clamp(-5, 5))
    torch.testing.assert_close(per_reward, same)  # per-reward advantages do not depend on the mode


def test_decoupled_weights_count_whatever_the_scale():
    # in each group the large reward ranks the samples one way and the small one the other way
    rewards = torch.tensor([[10.0, 0.4], [20.0, 0.3], [30.0, 0.2], [40.0, 0.1]]).repeat(3, 1)
    for weights, sign in ((torch.tensor([1.0, 2.0]), -1), (torch.tensor([2.0, 1.0]), 1)):
        advantages, _ = compute_multi_reward_advantages(rewards, weights, 4, normalization="decoupled")
        assert torch.all(advantages.view(3, 4).diff(dim=1) * sign > 0)
    summed, _ = compute_multi_reward_advantages(rewards, torch.tensor([1.0, 50.0]), 4, normalization="sum")
    assert torch.all(summed.view(3, 4).diff(dim=1) > 0)  # even a 50x weight leaves the large reward in charge


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_sum_is_the_weighted_total_normalised_as_before(scale_rewards):
    rewards, weights = two_scales(), torch.tensor([0.5, 3.0])
    rewards[3, 1] = float("nan")  # a reward that does not apply to a sample counts as missing, not as 0
    advantages, _ = compute_multi_reward_advantages(
        rewards, weights, 4, normalization="sum", scale_rewards=scale_rewards, adv_clip_max=2.0
    )
    total = (rewards * weights).nansum(dim=1)
    expected = compute_advantages(total, 4, scale_rewards=scale_rewards, adv_clip_max=2.0)
    assert torch.equal(advantages, expected)


def test_decoupled_leaves_out_missing_values_within_their_reward():
    rewards = torch.tensor(
        [[1.0, 5.0], [3.0, float("nan")], [2.0, 7.0], [2.0, float("nan")]]
        + [[1.0, float("nan")], [2.0, float("nan")], [3.0, float("nan")], [4.0, float("nan")]]
    )
    advantages, per_reward = compute_multi_reward_advantages(rewards, torch.ones(2), 4, normalization="decoupled")
    assert torch.isfinite(advantages).all() and torch.isfinite(per_reward).all()
    torch.testing.assert_close(per_reward[:4, 1], torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-3, rtol=0)
    assert torch.all(per_reward[4:, 1] == 0)  # a group where the reward never applies moves nothing
    torch.testing.assert_close(advantages[4:], per_reward[4:, 0])


def test_an_unknown_mode_is_refused_by_the_config(tmp_path):
    with pytest.raises(
        ValueError, match=r"multi_reward_normalization='gdpo' is unknown; use one of \('sum', 'decoupled'\)"
    ):
        GuardConfig(str(tmp_path), multi_reward_normalization="gdpo")
    with pytest.raises(ValueError, match="Unknown multi_reward_normalization"):
        compute_multi_reward_advantages(two_scales(), torch.ones(2), 4, normalization="gdpo")


def _uniform(image) -> float:
    """A value in [0, 1) that looks random but is fixed by the image's pixels."""
    return int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:4], "big") / 2**32


def large(prompts, images, **kwargs):
    return [1000 * _uniform(image) for image in images]


def small(prompts, images, **kwargs):
    return [-_uniform(image) for image in images]  # ranks every group the other way round


@pytest.mark.parametrize(
    ("mode", "weights", "large_corr"), [("sum", [1.0, 1.0], 1.0), ("decoupled", [1.0, 3.0], -1.0)]
)
def test_the_trainer_trains_on_the_mode_and_logs_each_rewards_advantage(
    tiny_pipeline, prompts, tmp_path, mode, weights, large_corr
):
    from helpers import logged, make_trainer

    trainer = make_trainer(
        tiny_pipeline,
        [large, small],
        prompts,
        tmp_path,
        max_steps=1,
        multi_reward_normalization=mode,
        reward_weights=weights,
    )
    trainer.train()
    assert logged(trainer, "advantages/large/corr") == [pytest.approx(large_corr, abs=1e-3)]
    assert logged(trainer, "advantages/small/corr") == [pytest.approx(-large_corr, abs=1e-3)]
    assert logged(trainer, "advantages/large/abs_mean")[0] == pytest.approx(
        logged(trainer, "advantages/small/abs_mean")[0], rel=1e-3
    )
