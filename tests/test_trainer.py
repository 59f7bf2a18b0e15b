import math

import numpy as np
import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer

from trl_guard.losses import SDE_LOSS_TYPES
from trl_guard.seeding import Stream

STAT_KEYS = ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low", "grad_norm")


def trained_keys(trainer):
    return {k for entry in trainer.state.log_history for k in entry}


@pytest.mark.parametrize("loss_type", SDE_LOSS_TYPES)
def test_end_to_end_per_loss_type(loss_type, tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, loss_type=loss_type, max_steps=2)
    trainer.train()
    keys = trained_keys(trainer)
    for step in range(4):
        for stat in STAT_KEYS:
            assert f"timestep/{step:02d}/{stat}" in keys
    assert {"reward", "reward_std", "rewards/blueness/mean", "advantages/abs_mean", "loss"} <= keys
    for entry in trainer.state.log_history:
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float))


def test_dance_grpo_schedule_with_kl_and_shared_noise(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        noise_schedule="dance_grpo",
        init_same_noise=True,
        beta=0.01,
        timestep_fraction=0.5,
        guidance_scale=3.0,
    )
    trainer.train()
    kl = logged(trainer, "kl")
    assert kl and all(v >= 0 for v in kl)
    trained_steps = {k.split("/")[1] for k in trained_keys(trainer) if k.startswith("timestep/")}
    assert len(trained_steps) <= 4

    latents = trainer._initial_latents(list(range(8)), Stream.INIT_NOISE, rollout_index=0)
    assert torch.equal(latents[0], latents[3]) and torch.equal(latents[4], latents[7])
    assert not torch.equal(latents[0], latents[4])


def test_first_pass_after_sampling_has_ratio_exactly_one(tiny_pipeline, prompts, tmp_path):
    # One micro-step per generation: every update is on-policy, so every ratio is exactly 1.
    on_policy = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, steps_per_generation=1, max_steps=3, loss_type="flow_grpo"
    )
    on_policy.train()
    for key in ("log_ratio_mean", "log_ratio_std", "raw_log_ratio_mean", "clip_frac_high", "clip_frac_low"):
        assert logged(on_policy, key) and all(v == 0.0 for v in logged(on_policy, key)), key


def test_second_micro_step_is_off_policy(tiny_pipeline, prompts, tmp_path):
    # The counterpart of the test above: after an optimizer step the recorded means are stale and ratios move.
    off_policy = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, steps_per_generation=2, max_steps=2, loss_type="flow_grpo"
    )
    off_policy.train()
    assert logged(off_policy, "log_ratio_std")[1] > 0


def test_learnable_reward_goes_up(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, max_steps=20, logging_steps=2, per_device_train_batch_size=16
    )  # measured: the last three logged rewards 37 spreads above the first three at 20 steps (42 at 40)
    trainer.train()
    rewards = logged(trainer, "reward")
    assert len(rewards) == 10
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    spread = np.mean(logged(trainer, "reward_std")[:3])
    assert last > first + 5 * spread, (first, last, spread)


def test_equal_rewards_train_with_zero_advantage(tiny_pipeline, prompts, tmp_path):
    def constant(prompts, images, **kwargs):
        return [1.0] * len(images)

    trainer = make_trainer(tiny_pipeline, [constant], prompts, tmp_path, max_steps=2)
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    trainer.train()
    assert logged(trainer, "advantages/abs_mean") == [0.0]  # one generation round serves both steps
    assert logged(trainer, "frac_reward_zero_std") == [1.0]
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    after = trainer.adapter.lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reward_weights_and_extra_columns(tiny_pipeline, prompts, tmp_path):
    seen = {}

    def uses_label(prompts, images, label, trainer_state, **kwargs):
        seen.setdefault("label", []).extend(label)  # called once per micro-batch of 8
        seen["state"] = trainer_state
        return [float(x) for x in label]

    def skips_odd(prompts, images, label, **kwargs):
        return [None if x % 2 else 1.0 for x in label]

    trainer = make_trainer(
        tiny_pipeline, [uses_label, skips_odd], prompts, tmp_path, max_steps=1, reward_weights=[2.0, 1.0]
    )
    trainer.train()
    assert len(seen["label"]) == 16 and seen["state"] is trainer.state
    assert logged(trainer, "rewards/skips_odd/mean") == [1.0]
    labels = torch.tensor(seen["label"], dtype=torch.float32)
    expected = (2 * labels + torch.where(labels % 2 == 0, 1.0, 0.0)).mean()
    assert logged(trainer, "reward")[0] == pytest.approx(float(expected))


def test_loads_from_a_folder_by_path(tiny_pipeline_dir, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_dir,
        [blueness],
        prompts,
        tmp_path,
        max_steps=1,
        model_init_kwargs={"torch_dtype": "float32", "text_encoder_3": None, "tokenizer_3": None},
    )
    assert trainer.adapter.denoiser.dtype == torch.float32
    trainer.train()
    assert logged(trainer, "reward")


def test_evaluate_logs_reward_per_function(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, per_device_eval_batch_size=3, eval_num_inference_steps=3
    )
    metrics = trainer.evaluate(prompts)
    again = trainer.evaluate(prompts)
    assert set(metrics) >= {"eval_reward", "eval_rewards/blueness"}
    assert metrics["eval_reward"] == again["eval_reward"]  # ODE sampling with fixed seeds is deterministic


def test_full_finetuning_without_lora(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, peft_config=None, max_steps=1, learning_rate=1e-3, beta=0.1
    )
    before = trainer.adapter.denoiser.proj_out.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.adapter.denoiser.proj_out.weight)
    assert logged(trainer, "kl")
    trainer.save_model()
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_timestep_grad_norms_are_measured_on_logged_steps_only(tiny_pipeline, prompts, tmp_path, monkeypatch):
    from trl_guard.trainer import GuardGRPODiffusionTrainer

    calls = []
    original = GuardGRPODiffusionTrainer._unit_grad_norm

    def counted(self, loss, params, defer_sync):
        calls.append(1)
        return original(self, loss, params, defer_sync)

    monkeypatch.setattr(GuardGRPODiffusionTrainer, "_unit_grad_norm", counted)
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=4, logging_steps=2)
    trainer.train()
    assert len(calls) == 2 * 4  # steps 2 and 4, one per trained timestep (4), one micro-step each
    logged_norms = [e for e in trainer.state.log_history if "timestep/03/grad_norm" in e]
    assert [e["step"] for e in logged_norms] == [2, 4] and all(e["timestep/03/grad_norm"] > 0 for e in logged_norms)


def test_metrics_are_kept_by_mode_as_trl_keeps_them(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        eval_dataset=prompts.select(range(2)),
        eval_strategy="steps",
        eval_steps=1,
        eval_num_inference_steps=2,
        max_steps=2,
        steps_per_generation=1,
    )
    assert set(trainer._metrics) == {"train", "eval"}
    trainer.train()
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    eval_logs = [e for e in trainer.state.log_history if "eval_reward" in e]
    assert len(train_logs) == 2 and len(eval_logs) == 2
    # each training log holds its own round's statistics, and no evaluation swallowed them
    assert all("reward" in e and "timestep/00/log_ratio_mean" in e for e in train_logs)
    assert all(not any(k.startswith("eval_") for k in e) for e in train_logs)
    assert all("reward" not in e and "log_ratio_mean" not in e for e in eval_logs)


def test_rewards_scored_in_the_worker_thread_equal_inline_scoring_and_the_thread_ends_with_train(
    tiny_pipeline, prompts, tmp_path
):
    """`overlap_reward_scoring` scores each micro-batch in a worker thread while the next one samples: the rewards are
    those of scoring inline, in the same order, and no scoring thread outlives `train()`."""
    import copy
    import threading

    def scorer_threads():
        return [t for t in threading.enumerate() if t.name.startswith("trl-guard-scoring")]

    seen: dict[bool, list[str]] = {True: [], False: []}
    rewards = {}
    for overlap in (True, False):

        def recorded_blueness(prompts, images, names=seen[overlap], **kwargs):
            names.append(threading.current_thread().name)
            return blueness(prompts, images)

        trainer = make_trainer(
            copy.deepcopy(tiny_pipeline),
            [recorded_blueness],
            prompts,
            tmp_path / str(overlap),
            max_steps=2,
            overlap_reward_scoring=overlap,
        )
        trainer.train()
        rewards[overlap] = logged(trainer, "reward")
        assert not scorer_threads()
    assert seen[True] and all(name.startswith("trl-guard-scoring") for name in seen[True])
    assert seen[False] and all(name == threading.current_thread().name for name in seen[False])
    assert rewards[True] == rewards[False]
