"""DGPO (`loss_type="dgpo"`): the loss against a float64 reference written from the formula, its on-policy limits,
the group helpers, and the trainer path (training, on-policy first step, group-shared noise and levels, the lagged
copy, exact mid-round resume, refused options, every model family)."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer, resume_mid_round, tiny_config

from trl_guard.algorithms.dgpo import (
    compute_dgpo_loss,
    dgpo_lagged_decay,
    group_means,
    group_shared_noise,
    group_sums,
)
from trl_guard.rollout import sample_ode

# The tiny pipelines sample 4 steps: train 2 of the grid's first 3 noise levels.
DGPO = dict(loss_type="dgpo", dgpo_max_train_step=2, dgpo_num_train_timesteps=2)


# ---- the loss against a reference written from the formula ---------------------------------------------------------
def _case(seed=0, groups=2, size=3, shape=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    batch = groups * size

    def draw(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    target = draw(batch, *shape)
    ref = target + 0.5 * draw(batch, *shape)
    old = target + 0.5 * draw(batch, *shape)
    velocity = (old + 0.3 * draw(batch, *shape)).requires_grad_(True)
    advantages = draw(batch)
    group_ids = torch.arange(groups).repeat_interleave(size) + 5  # global ids need not start at 0
    return velocity, target, ref, old, advantages, group_ids


def _reference(
    velocity,
    target,
    ref,
    old,
    advantages,
    group_ids,
    *,
    beta,
    size,
    epsilon,
    clip_dsm,
    clip_kl,
    kl_beta,
    lagged_reference,
):
    """The official loss, sample by sample in Python loops (float64)."""
    batch = len(advantages)

    def err(a, b):
        return ((a - b) ** 2).mean()

    dsm = [err(target[i], velocity[i]) for i in range(batch)]
    dgpo_ref = old if lagged_reference else ref
    ref_dsm = [err(target[i], dgpo_ref[i]).detach() for i in range(batch)]
    old_dsm = [err(target[i], old[i]).detach() for i in range(batch)]
    score = {}
    for i in range(batch):
        g = int(group_ids[i])
        score[g] = (
            score.get(g, 0.0) + float(advantages[i]) * beta * (float(dsm[i].detach()) - float(ref_dsm[i])) / size
        )
    total = 0.0
    kl_total = 0.0
    for i in range(batch):
        ratio = math.exp(float(old_dsm[i]) - float(dsm[i].detach()))
        a = float(advantages[i])
        clipped = ratio > 1 + epsilon if a > 0 else ratio < 1 - epsilon
        w = 1 / (1 + math.exp(-score[int(group_ids[i])]))
        d = dsm[i].detach() if clipped and clip_dsm else dsm[i]
        total = total + w * a * d
        kl = err(velocity[i], ref[i])
        kl_total = kl_total + (kl.detach() if clipped and clip_kl else kl)
    return total / batch + kl_beta * kl_total / batch


@pytest.mark.parametrize(
    "options",
    [
        dict(clip_dsm=True, clip_kl=False, kl_beta=0.0, lagged_reference=False, epsilon=0.02),
        dict(clip_dsm=True, clip_kl=True, kl_beta=0.3, lagged_reference=False, epsilon=0.02),
        dict(clip_dsm=False, clip_kl=True, kl_beta=0.3, lagged_reference=True, epsilon=0.05),
        dict(clip_dsm=True, clip_kl=False, kl_beta=0.0, lagged_reference=True, epsilon=1e-3),
    ],
)
@pytest.mark.parametrize("beta", [0.5, 100.0])
def test_dgpo_loss_matches_a_float64_reference_in_value_and_gradient(options, beta):
    velocity, target, ref, old, advantages, group_ids = _case()
    loss, stats = compute_dgpo_loss(
        velocity,
        target,
        advantages,
        group_ids,
        ref_velocity=ref,
        old_velocity=old,
        beta=beta,
        group_size=3,
        **options,
    )
    (grad,) = torch.autograd.grad(loss, velocity)
    expected = _reference(velocity, target, ref, old, advantages, group_ids, beta=beta, size=3, **options)
    (expected_grad,) = torch.autograd.grad(expected, velocity)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert 0 < stats["clip_frac"] < 1  # the case clips some samples and not others
    assert 0 < stats["group_weight_mean"] < 1


def test_dgpo_gradient_is_the_group_dpo_loss_gradient():
    # s_G = -(beta/|G|)(R(G+) - R(G-)): the surrogate's gradient is (|G| / (beta B)) grad sum_G -log sig(-s_G)
    velocity, target, ref, _, advantages, group_ids = _case(seed=1)
    beta, size, batch = 7.0, 3, len(advantages)
    loss, _ = compute_dgpo_loss(
        velocity, target, advantages, group_ids, ref_velocity=ref, beta=beta, group_size=size, epsilon=None
    )
    (grad,) = torch.autograd.grad(loss, velocity)
    dsm = ((target - velocity) ** 2).flatten(1).mean(1)
    ref_dsm = ((target - ref) ** 2).flatten(1).mean(1)
    dpo = 0.0
    for g in group_ids.unique():
        members = group_ids == g
        s = (advantages[members] * beta * (dsm[members] - ref_dsm[members]) / size).sum()
        dpo = dpo - torch.nn.functional.logsigmoid(-s)
    (dpo_grad,) = torch.autograd.grad(dpo * size / (beta * batch), velocity)
    torch.testing.assert_close(grad, dpo_grad, rtol=1e-10, atol=1e-14)


# ---- on-policy limits -----------------------------------------------------------------------------------------------
def test_policy_equal_to_reference_gives_half_weight_advantage_weighted_flow_matching():
    velocity, target, _, old, advantages, group_ids = _case(seed=2)
    loss, stats = compute_dgpo_loss(
        velocity,
        target,
        advantages,
        group_ids,
        ref_velocity=velocity.detach(),
        old_velocity=old,
        beta=100.0,
        group_size=3,
        epsilon=0.01,
    )
    dsm = ((target - velocity) ** 2).flatten(1).mean(1)
    assert float(stats["group_weight_mean"]) == 0.5 and float(stats["group_score_abs_mean"]) == 0.0
    (grad,) = torch.autograd.grad(loss, velocity, retain_graph=True)
    clipped = torch.where(
        advantages > 0,
        torch.exp(((target - old) ** 2).flatten(1).mean(1) - dsm) > 1.01,
        torch.exp(((target - old) ** 2).flatten(1).mean(1) - dsm) < 0.99,
    )
    half = (0.5 * advantages * torch.where(clipped, dsm.detach(), dsm)).mean()
    (expected,) = torch.autograd.grad(half, velocity)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_old_equal_to_current_never_clips_and_lagged_reference_gives_half_weights():
    velocity, target, ref, _, advantages, group_ids = _case(seed=3)
    common = dict(ref_velocity=ref, beta=50.0, group_size=3)
    clipped_loss, stats = compute_dgpo_loss(
        velocity, target, advantages, group_ids, old_velocity=velocity.detach(), epsilon=1e-6, **common
    )
    plain_loss, _ = compute_dgpo_loss(velocity, target, advantages, group_ids, epsilon=None, **common)
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_frac"]) == 0.0
    (a,) = torch.autograd.grad(clipped_loss, velocity)
    (b,) = torch.autograd.grad(plain_loss, velocity)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, lagged = compute_dgpo_loss(
        velocity,
        target,
        advantages,
        group_ids,
        old_velocity=velocity.detach(),
        epsilon=1e-6,
        lagged_reference=True,
        **{**common, "beta": 5000.0},
    )
    assert float(lagged["group_weight_mean"]) == 0.5  # whatever beta


def test_zero_advantages_and_identical_group_members_give_no_gradient():
    velocity, target, ref, old, _, group_ids = _case(seed=4)
    zero = torch.zeros(len(group_ids), dtype=torch.float64)
    loss, _ = compute_dgpo_loss(
        velocity, target, zero, group_ids, ref_velocity=ref, old_velocity=old, beta=100.0, group_size=3, epsilon=0.01
    )
    assert not torch.autograd.grad(loss, velocity)[0].any()
    # shared noise and identical clean samples in a group: identical inputs, identical errors; sum_G A = 0 cancels
    member = velocity[:1].detach().expand(3, -1, -1).clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -0.25, -0.75], dtype=torch.float64)
    loss, _ = compute_dgpo_loss(
        member,
        target[:1].expand(3, -1, -1),
        advantages,
        torch.zeros(3, dtype=torch.long),
        ref_velocity=ref[:1].expand(3, -1, -1),
        beta=100.0,
        group_size=3,
    )
    torch.testing.assert_close(torch.autograd.grad(loss, member)[0].sum(0), torch.zeros(2, 3, dtype=torch.float64))


def test_a_clipped_sample_has_no_gradient_but_counts_in_the_mean():
    target = torch.zeros(2, 4, dtype=torch.float64)
    old = torch.full_like(target, 1.0)  # old_dsm = 1
    velocity = torch.full_like(target, 0.5).requires_grad_(True)  # dsm = 0.25: ratio = e^0.75 > 1 + eps
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)  # the positive one is clipped, the negative is not
    loss, stats = compute_dgpo_loss(
        velocity,
        target,
        advantages,
        torch.tensor([0, 0]),
        ref_velocity=velocity.detach(),
        old_velocity=old,
        beta=1.0,
        group_size=2,
        epsilon=0.1,
    )
    (grad,) = torch.autograd.grad(loss, velocity)
    assert float(stats["clip_frac"]) == 0.5
    assert not grad[0].any() and grad[1].abs().min() > 0
    # the mean is over both samples: d/dv of (0.5 * -1 * MEAN (v)**2) / 2 = -0.5 * 2 v / 4 / 2
    torch.testing.assert_close(grad[1], torch.full((4,), -0.5 * 2 * 0.5 / 4 / 2, dtype=torch.float64))


# ---- group helpers --------------------------------------------------------------------------------------------------
def test_group_sums_and_means_match_loops():
    values = torch.randn(9, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([4, 1, 4, 9, 1, 4, 9, 9, 1])
    sums, means = group_sums(values, ids), group_means(values, ids)
    for i in range(9):
        members = [float(values[j]) for j in range(9) if ids[j] == ids[i]]
        assert math.isclose(float(sums[i]), sum(members), rel_tol=1e-6)
        assert math.isclose(float(means[i]), sum(members) / len(members), rel_tol=1e-6)


def test_group_shared_noise_is_shared_fresh_per_unit_and_independent_of_batching():
    ids = torch.tensor([3, 3, 3, 8, 8, 8])
    noise = group_shared_noise(0, 2, ids, 2, (4,))
    assert noise.shape == (6, 2, 4)
    assert torch.equal(noise[0], noise[2]) and torch.equal(noise[3], noise[5])
    assert not torch.equal(noise[0], noise[3]) and not torch.equal(noise[0, 0], noise[0, 1])
    assert torch.equal(group_shared_noise(0, 2, ids[3:], 2, (4,)), noise[3:])  # group 8 alone: the same noise
    assert not torch.equal(group_shared_noise(0, 3, ids, 2, (4,)), noise)  # another round


def test_lagged_decay_is_the_official_ema_ref_schedule():
    assert [dgpo_lagged_decay(s) for s in (0, 1, 150, 300, 5000)] == [0.0, 0.001, 0.15, 0.3, 0.3]


# ---- in the trainer -----------------------------------------------------------------------------------------------
def test_dgpo_trains_on_group_shared_points_and_is_on_policy_at_the_first_step(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=2, beta=0.01, **DGPO)
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(logged(trainer, "loss")))
    first = trainer.state.log_history[0]
    # the LoRA starts at zero: policy == reference == lagged copy, so w = 1/2, ratio 1 and nothing clipped
    assert first["group_weight_mean"] == 0.5 and first["ratio_mean"] == 1.0 and first["clip_frac"] == 0.0
    for key in ("dsm", "ref_dsm", "old_dsm", "policy_loss", "kl", "timestep/00/dsm", "timestep/01/dsm"):
        assert key in first
    assert trainer.state.log_history[1]["group_weight_mean"] != 0.5  # the second step of the round is off the base
    # every sample of the round trains at the same levels, among the first 3 of the grid; a group shares its noise
    batches = trainer._buffered_batches
    sigmas = trainer.adapter.sigmas(4)[:3]
    for batch in batches:
        rollout = batch.rollout
        assert (rollout.train_sigmas == rollout.train_sigmas[:1]).all()
        assert all(float(s) in sigmas.tolist() for s in rollout.train_sigmas[0])
        for group in batch.group_ids.unique():
            noise = rollout.train_noise[batch.group_ids == group]
            assert (noise == noise[:1]).all()
        assert not torch.equal(rollout.train_noise[0], rollout.train_noise[-1])  # another group
        assert not torch.equal(rollout.train_noise[:, 0], rollout.train_noise[:, 1])  # fresh per level


def test_per_sample_noise_when_not_shared(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        max_steps=1,
        dgpo_shared_noise=False,
        steps_per_generation=1,
        **DGPO,
    )
    trainer.train()
    noise = trainer._buffered_batches[0].rollout.train_noise
    assert not torch.equal(noise[0], noise[1])  # same group, own noise


def test_lagged_copy_follows_each_step_and_samples_after_the_switch(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=1, **DGPO)
    algorithm = trainer.algorithm
    lagged = algorithm.lagged
    start = {n: t.clone() for n, t in lagged.averages.items()}
    with torch.no_grad():
        for parameter in lagged.parameters.values():
            parameter.add_(1.0)
    live = {n: p.detach().clone() for n, p in lagged.parameters.items()}
    # steps 0..2 taken since the last pull: d = 0, 0.001, 0.002 in turn, each towards the live weights
    algorithm.on_round_start(1, global_step=3)
    kept = 0.0 * 0.001 * 0.002
    for name in live:
        torch.testing.assert_close(lagged.averages[name], kept * start[name] + (1 - kept) * live[name])
    assert algorithm.pulled_steps == 3 and algorithm.state_dict()["lagged_pulled_steps"] == 3
    algorithm.on_round_start(2, global_step=3)  # no step since: unchanged
    for name in live:
        torch.testing.assert_close(lagged.averages[name], kept * start[name] + (1 - kept) * live[name])

    # sampling switches to the lagged copy once more than dgpo_lagged_sampling_after steps were taken
    with torch.no_grad():
        for name, average in lagged.averages.items():
            average.copy_(start[name])  # the copy at the base, the live weights 1 away
    plan = algorithm.plan(0)
    embeds = trainer.adapter.encode_prompts(["prompt number 0"])
    latents = torch.randn(1, *trainer.adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(1)]
    with torch.no_grad():
        live_sample = sample_ode(trainer.adapter, embeds, None, latents, plan.sigmas)
        with lagged.swapped_in():
            lagged_sample = sample_ode(trainer.adapter, embeds, None, latents, plan.sigmas)
    assert not torch.equal(live_sample, lagged_sample)
    algorithm.global_step = 200  # official switch_ema_ref: sample with it once global_step > 200
    assert torch.equal(algorithm.sample(embeds, None, latents, generators, plan).final, live_sample)
    algorithm.global_step = 201
    assert torch.equal(algorithm.sample(embeds, None, latents, generators, plan).final, lagged_sample)


def test_mid_round_resume_is_exact(_base_pipeline, prompts, tmp_path):
    # checkpoint-3 falls between the two updates of the second round; the lagged copy was pulled twice by then and
    # switches the sampler at step 2 (dgpo_lagged_sampling_after=1), so the resumed run must restore it
    settings = dict(beta=0.01, dgpo_lagged_sampling_after=1, **DGPO)
    full, resumed = resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, **settings)
    assert (tmp_path / "full" / "checkpoint-3" / "algorithm_state.safetensors").exists()
    for name, tensor in full.algorithm.lagged.averages.items():
        torch.testing.assert_close(resumed.algorithm.lagged.averages[name], tensor, rtol=0, atol=1e-6)
    assert resumed.algorithm.pulled_steps == full.algorithm.pulled_steps == 2


def test_split_groups_are_refused_naming_the_fields(tmp_path):
    with pytest.raises(ValueError, match=r"num_generations=4 must divide per_device_train_batch_size=6"):
        tiny_config(tmp_path, per_device_train_batch_size=6, num_generations=4, **DGPO)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(loss_type="flow_grpo", dgpo_beta=10.0), "loss_type='flow_grpo'.*does not read dgpo_beta=10.0"),
        (dict(loss_type="nft", dgpo_lagged_reference=True), "does not read dgpo_lagged_reference=True"),
        (dict(DGPO, nft_beta=0.1), "loss_type='dgpo'.*does not read nft_beta=0.1"),
        (dict(DGPO, noise_schedule="cps"), "does not read noise_schedule='cps'"),
        (dict(DGPO, timestep_fraction=0.99), "does not read timestep_fraction=0.99"),
        (dict(DGPO, epsilon=0.01, dgpo_clip_dsm=False), "does not read epsilon=0.01"),
        (dict(DGPO, dgpo_beta=0.0), "dgpo_beta=0.0 must be > 0"),
        (dict(DGPO, epsilon=-1.0), "epsilon=-1.0 must be > 0"),
        (dict(loss_type="dgpo"), "dgpo_max_train_step=6 must index a noisy level.*num_inference_steps=4"),
        (dict(DGPO, dgpo_num_train_timesteps=4), "dgpo_num_train_timesteps=4 distinct noise levels"),
    ],
)
def test_options_are_refused_by_name(tmp_path, fields, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(tmp_path, **fields)


def test_defaults_are_the_official_ones(tmp_path):
    config = tiny_config(tmp_path, **DGPO)
    assert config.epsilon == 1e-2 and config.dgpo_beta == 100.0 and config.dgpo_clip_dsm and not config.dgpo_clip_kl
    assert config.dgpo_lagged_sampling_after == 200 and config.dgpo_shared_noise and not config.dgpo_lagged_reference
    from trl_guard.algorithms import algorithm_class

    family = algorithm_class("dgpo")
    assert family.needs_whole_groups
    assert family.needs_reference(config)  # the group score's reference, even with beta = 0
    assert not family.needs_reference(tiny_config(tmp_path, dgpo_lagged_reference=True, **DGPO))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan", "flux_kontext"])
def test_every_family_trains_under_dgpo(family, tmp_path):
    from test_forward_algorithms import _family_case

    pipeline, dataset, reward, fields = _family_case(family)
    fields = {**fields, **DGPO}  # qwenimage samples 3 steps: levels 0-2 are all noisy
    trainer = make_trainer(
        pipeline, [reward], dataset, tmp_path, max_steps=1, steps_per_generation=1, beta=0.01, **fields
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(logged(trainer, "loss")).all() and logged(trainer, "group_weight_mean")


def test_full_fine_tuning_keeps_a_frozen_reference(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, peft_config=None, max_steps=1, learning_rate=1e-2, **DGPO
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["group_weight_mean"] == 0.5 and np.isfinite(first["loss"])  # the frozen copy is the start
