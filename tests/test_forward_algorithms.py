"""DiffusionNFT (`loss_type="nft"`) and AWM (`loss_type="awm"`) in the trainer: on-policy first passes, the lagged
copy, exact resume, every model family, and the options of the other family refused by name."""

import copy

import numpy as np
import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer, resume_mid_round, tiny_config

from trl_guard.losses import lagged_decay

FORWARD = ("nft", "awm")


@pytest.mark.parametrize("loss_type", FORWARD)
def test_forward_losses_train_and_are_on_policy_at_a_rounds_first_step(loss_type, tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, loss_type=loss_type, max_steps=2)
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(logged(trainer, "loss")))
    first = trainer.state.log_history[0]
    if loss_type == "nft":
        # round 0: the old policy (the lagged copy) is the policy itself
        assert first["old_deviation"] == 0.0
    else:
        # one optimizer step per micro-batch here, but the first step of a round is on-policy: ratio exactly 1
        assert first["ratio_mean"] == 1.0 and first["clip_frac"] == 0.0
    assert "timestep/00/grad_norm" in first  # per-unit diagnostics are logged as for the SDE family


def test_awm_off_policy_steps_compare_with_the_rounds_sampling_policy(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, loss_type="awm", max_steps=2)
    assert trainer.algorithm.round_start is not None  # two optimizer steps per round
    trainer.train()
    ratios = logged(trainer, "ratio_mean")
    assert ratios[0] == 1.0 and ratios[1] != 1.0  # the second step of the round is off-policy


def test_lagged_copy_follows_the_weights_by_its_decay(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, loss_type="nft", max_steps=2, lagged_decay_schedule="none"
    )
    trainer.train()
    lagged = trainer.algorithm.lagged
    start = {n: t.clone() for n, t in lagged.averages.items()}
    live = {n: p.detach().clone() for n, p in lagged.parameters.items()}
    assert any(not torch.equal(start[n], live[n]) for n in start)  # two steps trained, the copy not yet pulled
    trainer.algorithm.on_round_start(1, global_step=400)  # "none": d = 0, the copy becomes the weights
    assert all(torch.equal(lagged.averages[n], live[n]) for n in live)
    trainer.algorithm.decay_schedule = "nft"
    with torch.no_grad():
        for parameter in lagged.parameters.values():
            parameter.add_(1.0)
    trainer.algorithm.on_round_start(2, global_step=400)  # d = min(0.4, 0.5)
    d = lagged_decay(400, "nft")
    for name in live:
        torch.testing.assert_close(lagged.averages[name], d * live[name] + (1 - d) * (live[name] + 1.0))


@pytest.mark.parametrize(("loss_type", "extra"), [("nft", dict(ema_decay=0.9, ema_update_interval=1)), ("awm", {})])
def test_mid_round_resume_is_exact(loss_type, extra, _base_pipeline, prompts, tmp_path):
    # checkpoint-3 falls between the two updates of the second round: the lagged copy (and AWM's round-start
    # weights) must come back from the checkpoint for the resumed run to end on the same weights
    settings = dict(loss_type=loss_type, **extra)
    full, resumed = resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, **settings)
    assert (tmp_path / "full" / "checkpoint-3" / "algorithm_state.safetensors").exists()
    for name, tensor in full.algorithm.lagged.averages.items():
        torch.testing.assert_close(resumed.algorithm.lagged.averages[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_type", FORWARD)
def test_full_fine_tuning_with_a_reference_penalty(loss_type, tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, peft_config=None, loss_type=loss_type, beta=1e-2, max_steps=1
    )
    trainer.train()
    key = "kl" if loss_type == "nft" else "ref_distance"
    assert logged(trainer, key) and all(np.isfinite(logged(trainer, key)))


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(loss_type="nft", noise_schedule="cps"), "loss_type='nft'.*does not read noise_schedule='cps'"),
        (dict(loss_type="awm", sde_window_size=2), "does not read sde_window_size=2"),
        (dict(loss_type="nft", epsilon=1e-4), "does not read epsilon=0.0001"),
        (dict(loss_type="nft", awm_weighting="t"), "does not read awm_weighting='t'"),
        (dict(loss_type="grpo_guard", nft_beta=0.1), "loss_type='grpo_guard'.*does not read nft_beta=0.1"),
        (dict(loss_type="flow_grpo", lagged_decay_schedule="nft"), "does not read lagged_decay_schedule='nft'"),
        (dict(loss_type="nft", nft_beta=0.0), "nft_beta=0.0 must be > 0"),
    ],
)
def test_options_of_the_other_family_are_refused(tmp_path, fields, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(tmp_path, **fields)


def test_awm_default_clip_range_is_the_official_one(tmp_path):
    assert tiny_config(tmp_path, loss_type="awm").epsilon == 1.0
    assert tiny_config(tmp_path, loss_type="nft").epsilon is None


def _family_case(family):
    """(pipeline, dataset, reward, trainer fields) for one training step of `family` from its tiny pipeline."""
    from datasets import Dataset
    from helpers import lora_config
    from PIL import Image

    from trl_guard.rewards import video_reward
    from trl_guard.testing import (
        build_tiny_flux_kontext_pipeline,
        build_tiny_flux_pipeline,
        build_tiny_qwenimage_pipeline,
        build_tiny_wan_pipeline,
    )

    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]})
    defaults = dict(peft_config=lora_config(target_modules=None))
    if family == "flux":
        return build_tiny_flux_pipeline(seed=0), prompts, blueness, dict(guidance_scale=3.5, **defaults)
    if family == "qwenimage":
        fields = dict(true_cfg_scale=4.0, negative_prompt=" ", num_inference_steps=3, **defaults)
        return build_tiny_qwenimage_pipeline(seed=0), prompts, blueness, fields
    if family == "wan":
        return build_tiny_wan_pipeline(seed=0), prompts, video_reward(blueness), dict(num_frames=5, **defaults)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    edits = Dataset.from_dict({"prompt": prompts["prompt"], "image": images})
    return build_tiny_flux_kontext_pipeline(seed=0), edits, blueness, dict(guidance_scale=2.5, **defaults)


@pytest.mark.parametrize("loss_type", FORWARD)
@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan", "flux_kontext"])
def test_every_family_trains_under_the_forward_losses(family, loss_type, tmp_path):
    pipeline, dataset, reward, fields = _family_case(family)
    trainer = make_trainer(
        pipeline, [reward], dataset, tmp_path, loss_type=loss_type, max_steps=1, steps_per_generation=1, **fields
    )
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    after = trainer.adapter.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(logged(trainer, "loss")).all() and logged(trainer, "reward")
