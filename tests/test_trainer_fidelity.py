"""Trainer behaviour that follows the official Flow-GRPO code: trained timesteps, CPS, Flow-GRPO's KL and the EMA."""

import copy
import math

import pytest
import torch
from conftest import blueness
from datasets import Dataset
from helpers import logged, make_trainer, resume_mid_round
from safetensors.torch import load_file

from trl_guard.losses import SDE_LOSS_TYPES


def trained_steps_per_log(trainer):
    """For each logged optimizer step, the sampling steps that logged a policy loss."""
    return [
        sorted({int(key.split("/")[1]) for key in entry if key.startswith("timestep/")})
        for entry in trainer.state.log_history
        if any(key.startswith("timestep/") for key in entry)
    ]


def test_default_trains_the_first_steps_in_every_round(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        num_inference_steps=10,
        timestep_fraction=0.99,
        steps_per_generation=1,  # one round per optimizer step, so each log entry is one round
        max_steps=3,
    )
    trainer.train()
    rounds = trained_steps_per_log(trainer)
    assert len(rounds) == 3
    assert all(steps == list(range(9)) for steps in rounds)  # steps 0-8, never the last


def test_random_selection_draws_different_subsets(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        num_inference_steps=10,
        timestep_fraction=0.3,
        timestep_selection="random",
        steps_per_generation=1,
        max_steps=4,
    )
    trainer.train()
    rounds = trained_steps_per_log(trainer)
    assert all(len(steps) == 3 for steps in rounds)
    assert len({tuple(steps) for steps in rounds}) > 1


@pytest.mark.parametrize("loss_type", SDE_LOSS_TYPES)
def test_cps_trains_finitely_for_every_loss_type(loss_type, tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        noise_schedule="cps",
        loss_type=loss_type,
        beta=0.01,
        max_steps=2,
        epsilon=1e-5,
    )
    trainer.train()
    for entry in trainer.state.log_history:
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float)), entry
    assert all(steps == [0, 1, 2] for steps in trained_steps_per_log(trainer))  # step 3 has no noise
    assert logged(trainer, "kl") and all(v >= 0 for v in logged(trainer, "kl"))
    assert any(v != 0 for v in logged(trainer, "grad_norm"))


def test_flow_grpo_kl_is_the_exact_kl_times_minus_dt(tiny_pipeline, prompts, tmp_path):
    """The same run logs the same means; only the KL's definition differs, by the factor -dt per step."""
    sigmas = None
    kls = {}
    for kl_type in ("flow_grpo", "exact"):
        trainer = make_trainer(
            copy.deepcopy(tiny_pipeline), [blueness], prompts, tmp_path / kl_type, beta=1e-9, kl_type=kl_type
        )
        trainer.train()
        sigmas = trainer.adapter.sigmas(trainer.args.num_inference_steps).double()
        kls[kl_type] = [logged(trainer, f"timestep/{i:02d}/kl")[-1] for i in range(4)]
    for step in range(4):
        neg_dt = float(sigmas[step] - sigmas[step + 1])
        if kls["exact"][step] > 0:
            assert kls["flow_grpo"][step] == pytest.approx(kls["exact"][step] * neg_dt, rel=1e-3)


def test_ema_is_what_is_evaluated_and_saved(tiny_pipeline, prompts, tmp_path):
    eval_prompts = Dataset.from_dict({"prompt": ["prompt number 0", "prompt number 1"]})
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        eval_dataset=eval_prompts,
        ema_decay=0.5,
        ema_update_interval=1,
        max_steps=3,
        eval_num_inference_steps=4,
    )
    trainer.train()
    ema, live = trainer.ema, {n: p.detach().clone() for n, p in trainer.ema.parameters.items()}
    assert any(not torch.equal(ema.averages[n], live[n]) for n in live)

    with_ema = trainer.evaluate()
    trainer.ema = None
    without_ema = trainer.evaluate()
    assert with_ema["eval_reward"] != without_ema["eval_reward"]
    with ema.swapped_in():
        assert trainer.evaluate()["eval_reward"] == with_ema["eval_reward"]
    trainer.ema = ema
    for name, parameter in ema.parameters.items():  # evaluation left the live weights in place
        assert torch.equal(parameter, live[name])

    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "pytorch_lora_weights.safetensors"))
    prefix = trainer.adapter.lora_prefix
    with ema.swapped_in():
        expected = {f"{prefix}.{k}": v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    live_state = {f"{prefix}.{k}": v for k, v in trainer.adapter.lora_state_dict().items()}
    assert saved.keys() == expected.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], expected[key].cpu(), rtol=0, atol=0)
    assert any(not torch.equal(saved[key], live_state[key].cpu()) for key in saved)


def test_resume_with_ema_is_exact(_base_pipeline, prompts, tmp_path):
    settings = dict(ema_decay=0.9, ema_update_interval=2)
    full, resumed = resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, **settings)
    checkpoint = tmp_path / "full" / "checkpoint-3"  # mid-round, and between two EMA updates
    assert (checkpoint / "ema_state.safetensors").exists()
    for name, parameter in full.ema.parameters.items():
        torch.testing.assert_close(resumed.ema.parameters[name], parameter, rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.ema.averages[name], full.ema.averages[name], rtol=0, atol=1e-6)
    # the checkpoint's model file is the EMA at step 3, not the live weights
    at_three = load_file(str(checkpoint / "ema_state.safetensors"))
    assert any(not torch.equal(at_three[f"live/{n}"], at_three[f"ema/{n}"]) for n in full.ema.parameters)


def test_eval_kl_is_zero_for_the_base_policy_and_grows_with_training(tiny_pipeline, prompts, tmp_path):
    eval_prompts = Dataset.from_dict({"prompt": ["prompt number 0", "prompt number 1", "prompt number 2"]})
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, eval_dataset=eval_prompts, eval_kl=True, max_steps=2
    )
    assert trainer.evaluate()["eval_kl"] == 0.0  # a fresh LoRA (B = 0) is the base policy
    trainer.train()
    after = trainer.evaluate()["eval_kl"]
    assert after > 0 and math.isfinite(after)
