"""Online Diffusion-DPO (`loss_type="dpo"`): its pairs, its loss against a float64 reference, the on-policy limits,
the pairs' shared noise, and the trainer (training, sampling with the reference, the refreshed reference, exact
mid-round resume, refusals, every model family)."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer, resume_mid_round, tiny_config

from trl_guard.algorithms.dgpo import group_shared_noise
from trl_guard.algorithms.dpo import DPOAlgorithm, compute_dpo_loss, dpo_pairs, pair_rows, pair_sigmas
from trl_guard.rollout import sample_sde

# Keep the trainer tests fast: micro-batches of one prompt group, 2 training units per pair (int(4 steps x 0.5)).
FAST = dict(loss_type="dpo", timestep_fraction=0.5, per_device_train_batch_size=4)


# ---- pairs ----------------------------------------------------------------------------------------------------------
def test_pairs_are_best_against_worst_within_each_group_and_equal_groups_are_skipped():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 1.0, 0.0])
    marks = dpo_pairs(scores, 4)
    # group 0: best 0.9 over worst 0.1; group 1: all equal, no pair; group 2 (4 samples, two tied at each end): the
    # first best over the first worst, as the official's argmax / argmin
    assert marks.tolist() == [0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0]
    chosen, rejected = pair_rows(marks, torch.arange(12) // 4)
    assert chosen.tolist() == [1, 8] and rejected.tolist() == [2, 9]


def test_training_signal_ranks_the_weighted_reward_total():
    args = tiny_config("/tmp/unused", loss_type="dpo")
    # two rewards; the second is missing (NaN) for some samples and counts as absent, not 0
    rewards = torch.tensor([[0.1, 1.0], [0.5, float("nan")], [0.2, 0.0], [0.4, 0.1]] * 2)
    marks, per_reward = DPOAlgorithm.training_signal(rewards, torch.tensor([1.0, 0.5]), args)
    # totals 0.6, 0.5, 0.2, 0.45: chosen the first, rejected the third
    assert marks.tolist() == [1.0, 0.0, -1.0, 0.0] * 2
    assert per_reward.shape == rewards.shape


def test_a_micro_batch_with_half_a_pair_is_refused():
    with pytest.raises(ValueError, match="both samples of each pair in one micro-batch"):
        pair_rows(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]))


# ---- the loss -------------------------------------------------------------------------------------------------------
def _reference_loss(velocity, ref_velocity, target, beta, num_groups):
    """The official formula written out with loops, in float64."""
    pairs = velocity.shape[0] // 2
    total = 0.0
    for p in range(pairs):
        errors = []
        for row in (p, pairs + p):
            err = sum((velocity[row].flatten()[k] - target[row].flatten()[k]) ** 2 for k in range(target[row].numel()))
            ref = sum(
                (ref_velocity[row].flatten()[k] - target[row].flatten()[k]) ** 2 for k in range(target[row].numel())
            )
            errors.append((err / target[row].numel(), ref / target[row].numel()))
        (err_w, ref_w), (err_l, ref_l) = errors
        inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
        total = total + torch.log1p(torch.exp(-inside))  # -log sigmoid(inside)
    return total / num_groups


@pytest.mark.parametrize("num_groups", [None, 5])
def test_loss_matches_a_float64_reference_in_value_and_gradient(num_groups):
    generator = torch.Generator().manual_seed(0)
    shape = (6, 2, 3)  # 3 pairs: chosen rows 0-2, rejected rows 3-5
    velocity = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    ref_velocity = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    beta = 0.7  # small enough that the sigmoid is not saturated

    loss, stats = compute_dpo_loss(velocity, ref_velocity, target, beta=beta, num_groups=num_groups)
    (gradient,) = torch.autograd.grad(loss, velocity)

    reference_velocity = velocity.detach().clone().requires_grad_(True)
    expected = _reference_loss(reference_velocity, ref_velocity, target, beta, num_groups or 3)
    (expected_gradient,) = torch.autograd.grad(expected, reference_velocity)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(gradient, expected_gradient)
    assert gradient.abs().max() > 0
    assert float(stats["pairs"]) == 3 / (num_groups or 3)


def test_loss_is_log_2_with_the_reference_gradient_when_the_policy_is_the_reference():
    generator = torch.Generator().manual_seed(1)
    velocity = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    beta = 100.0
    loss, stats = compute_dpo_loss(velocity, velocity.detach(), target, beta=beta)
    (gradient,) = torch.autograd.grad(loss, velocity)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-12)
    assert float(stats["implicit_acc"]) == 0.0 and float(stats["inside"]) == 0.0
    # d err_i / d v_i = 2 (v_i - v*_i) / d; the loss's gradient is (beta / 4)(grad err_w - grad err_l), over 2 pairs
    d_err = 2 * (velocity.detach() - target) / target.shape[1]
    expected = torch.cat([beta / 4 * d_err[:2], -beta / 4 * d_err[2:]]) / 2
    torch.testing.assert_close(gradient, expected)


def test_a_pair_of_identical_samples_has_zero_gradient():
    generator = torch.Generator().manual_seed(2)
    # A toy denoiser: the same latent, noise and level give both samples the same prediction and target.
    weight = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    noisy = torch.randn(1, 3, 4, generator=generator, dtype=torch.float64)
    velocity = torch.cat([weight * noisy, weight * noisy])
    target = torch.randn(1, 3, 4, generator=generator, dtype=torch.float64).expand(2, 3, 4)
    ref_velocity = torch.randn(1, 3, 4, generator=generator, dtype=torch.float64).expand(2, 3, 4)
    loss, _ = compute_dpo_loss(velocity, ref_velocity, target, beta=100.0)
    (gradient,) = torch.autograd.grad(loss, weight)
    assert float(loss.detach()) == pytest.approx(math.log(2))
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), rtol=0, atol=1e-12)


# ---- noise and noise levels -----------------------------------------------------------------------------------------
def test_pairs_share_noise_and_level_drawn_per_group_whatever_the_micro_batches():
    schedule = torch.linspace(1, 0.001, 1000, dtype=torch.float64)
    schedule = 3 * schedule / (1 + 2 * schedule)  # SD3.5-M's shift 3: the official's noise_scheduler.sigmas
    groups = torch.tensor([4, 4, 4, 7, 7, 7])
    sigmas = pair_sigmas(0, 3, groups, 5, schedule)
    noise = group_shared_noise(0, 3, groups, 5, (2, 2))
    for values in (sigmas, noise):
        assert torch.equal(values[0], values[2]) and torch.equal(values[3], values[5])
        assert not torch.equal(values[0], values[3])
    assert len(set(sigmas[0].tolist())) > 1  # each unit its own level
    # the same group drawn in another micro-batch (alone, or after other groups) gets the same values
    torch.testing.assert_close(pair_sigmas(0, 3, torch.tensor([7]), 5, schedule)[0], sigmas[3], rtol=0, atol=0)
    torch.testing.assert_close(group_shared_noise(0, 3, torch.tensor([7]), 5, (2, 2))[0], noise[3], rtol=0, atol=0)
    # another round draws anew
    assert not torch.equal(pair_sigmas(0, 4, groups, 5, schedule), sigmas)
    # logit-normal over the shifted schedule: median shift_3(1/2) = 0.75
    many = pair_sigmas(0, 0, torch.arange(400), 10, schedule).flatten()
    assert float(many.median()) == pytest.approx(0.75, abs=0.03)
    assert all(float(s) in set(schedule.tolist()) for s in many[:50])


# ---- in the trainer -------------------------------------------------------------------------------------------------
def test_dpo_trains_from_log_2_and_samples_with_the_frozen_reference(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=2, **FAST)
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = logged(trainer, "loss")
    assert np.isfinite(losses).all()
    first, second = trainer.state.log_history[0], trainer.state.log_history[1]
    # the first update of the round is on-policy: the LoRA is zero at start, so the policy is the frozen reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["implicit_acc"] == 0.0
    assert second["inside"] != 0.0 and first["pairs"] == 1.0 and "timestep/01/chosen_err" in first
    assert first["advantages/max"] == 1.0 and first["advantages/min"] == -1.0

    # The last round's pairs: the two samples of a group share their noise levels and noise, other groups differ.
    first_group, second_group = (batch.rollout for batch in trainer._buffered_batches)  # a micro-batch each
    levels, noise = first_group.train_sigmas, first_group.train_noise
    assert torch.equal(levels[0], levels[3]) and torch.equal(noise[0], noise[3]) and bool((levels > 0).all())
    assert not torch.equal(levels[0], second_group.train_sigmas[0])
    assert not torch.equal(noise[0], second_group.train_noise[0])

    # Rollouts come from the reference (the frozen base), not from the trained weights.
    algorithm, adapter = trainer.algorithm, trainer.adapter
    plan = algorithm.plan(0)
    embeds = adapter.encode_prompts(["prompt number 0"] * 2)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))

    def sample():
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return algorithm.sample(embeds, None, latents, generators, plan).final

    sampled = sample()

    def sample_sde_now():
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return sample_sde(
            adapter, embeds, None, latents, plan.sigmas, algorithm.schedule, generators=generators
        ).final_latents

    with adapter.reference_policy():
        base = sample_sde_now()
    torch.testing.assert_close(sampled, base, rtol=0, atol=0)
    assert not torch.equal(sample_sde_now(), sampled)  # the trained weights would sample otherwise


def test_the_reference_copy_is_refreshed_every_dpo_ref_update_steps(tiny_pipeline, prompts, tmp_path):
    # one optimizer step per round: after each refresh the round starts on-policy again (loss log 2)
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        max_steps=3,
        steps_per_generation=1,
        dpo_ref_update_steps=2,
        **FAST,
    )
    assert not DPOAlgorithm.needs_reference(trainer.args)
    trainer.train()
    losses = logged(trainer, "loss")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the copy starts as the initial weights
    assert losses[1] != pytest.approx(math.log(2), abs=1e-6)  # one step since the copy
    assert losses[2] == pytest.approx(math.log(2), abs=1e-6)  # refreshed after step 2
    state = trainer.algorithm.state_dict()
    assert int(state["reference_version"]) == 1 and any(k.startswith("reference/") for k in state)


def test_resume_in_the_middle_of_a_round_with_a_refreshed_reference_is_exact(_base_pipeline, prompts, tmp_path):
    # Two optimizer steps per round; the reference is refreshed at the start of round 1 (after step 2), and the
    # checkpoint at step 3 falls inside that round: only the saved copy can restore it.
    settings = dict(save_steps=3, dpo_ref_update_steps=2, **FAST)
    settings["timestep_fraction"] = 0.25  # one unit per pair: the resume, not the loss, is under test
    resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, **settings)


def test_a_round_of_equal_rewards_trains_nothing(tiny_pipeline, prompts, tmp_path):
    def constant(prompts, images, **kwargs):
        return [1.0] * len(images)

    trainer = make_trainer(tiny_pipeline, [constant], prompts, tmp_path, max_steps=1, steps_per_generation=1, **FAST)
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    assert logged(trainer, "loss") == [0.0] and logged(trainer, "pairs")[0] == 0.0
    after = trainer.adapter.lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_full_fine_tuning_keeps_a_frozen_reference(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, peft_config=None, max_steps=1, steps_per_generation=1, **FAST
    )
    assert trainer.adapter.reference_denoiser is not None
    trainer.train()
    assert logged(trainer, "loss")[0] == pytest.approx(math.log(2), abs=1e-6)


# ---- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(loss_type="flow_grpo", dpo_beta=10.0), "does not read dpo_beta=10.0"),
        (dict(loss_type="nft", dpo_ref_update_steps=40), "does not read dpo_ref_update_steps=40"),
        (dict(loss_type="dpo", noise_schedule="cps"), "does not read noise_schedule='cps'"),
        (dict(loss_type="dpo", nft_beta=0.1), "does not read nft_beta=0.1"),
        (dict(loss_type="dpo", beta=100.0), r"does not read beta=100.0 \(DPO's strength is dpo_beta\)"),
        (dict(loss_type="dpo", epsilon=1e-4), "does not read epsilon=0.0001"),
        (dict(loss_type="dpo", dpo_beta=0.0), "dpo_beta=0.0 must be > 0"),
        (dict(loss_type="dpo", dpo_ref_update_steps=0), "dpo_ref_update_steps=0 must be >= 1"),
        (
            dict(loss_type="dpo", num_generations=8, per_device_train_batch_size=4, steps_per_generation=2),
            "num_generations=8 must divide per_device_train_batch_size=4",
        ),
    ],
)
def test_settings_are_refused_by_name(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **fields)


# ---- every model family ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan", "flux_kontext"])
def test_every_family_trains_under_dpo(family, tmp_path):
    from test_forward_algorithms import _family_case

    pipeline, dataset, reward, fields = _family_case(family)
    trainer = make_trainer(
        pipeline, [reward], dataset, tmp_path, loss_type="dpo", max_steps=1, steps_per_generation=1, **fields
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(logged(trainer, "loss")).all() and logged(trainer, "reward")
