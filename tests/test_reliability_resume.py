"""Issue 32, part B: what a new user hits around resuming, checkpoints, the over-optimisation alarm and the report.

- `trl-guard report` on an AWM run (epsilon 1: the lower clip bound has no log);
- a resumed run's alarm decides as the uninterrupted run's did (its state is in the checkpoints);
- `overwrite_output_dir` moves an earlier run's checkpoints aside, so a resume cannot take them;
- an alarm metric evaluation will not log is refused before training;
- `resume_from_checkpoint=<output_dir>` is named as an output folder.
"""

import copy
import json
import re

import pytest
import torch
from conftest import blueness
from datasets import Dataset
from helpers import lora_config, make_trainer, tiny_config
from safetensors.torch import load_file

from trl_guard import GuardGRPODiffusionTrainer, OverOptimizationCallback
from trl_guard.checkpoints import resolve_resume
from trl_guard.cli import main


# ---- 1. the report on an AWM run ---------------------------------------------------------------------------------
def test_report_on_an_awm_run_draws_the_upper_clip_bound_and_says_the_lower_has_none(tmp_path):
    run = tmp_path / "awm"
    run.mkdir()
    history = []
    for step in (1, 2):
        entry = {"step": step, "reward": 0.1 * step, "rewards/blueness/mean": 0.1 * step}
        for t in range(3):
            entry[f"timestep/{t:02d}/log_ratio_mean"] = -1e-3 * 10**t
            entry[f"timestep/{t:02d}/clip_frac_high"] = 0.0
            entry[f"timestep/{t:02d}/clip_frac_low"] = 0.0
        history.append(entry)
    (run / "log_history.json").write_text(json.dumps(history))
    (run / "guard_config.json").write_text(json.dumps({"loss_type": "awm", "epsilon": 1.0}))

    main(["report", str(run), "--output", str(tmp_path / "report")])
    page = (tmp_path / "report" / "index.html").read_text()
    assert (tmp_path / "report" / "timesteps.png").exists()
    assert "awm: mean log-ratio its loss clips (awm loss, ε = 1; dashed: +ε only, 1 − ε ≤ 0 has no log)" in page


# ---- 2. the alarm's state survives a resume ------------------------------------------------------------------------
def rising_blueness(prompts, images, trainer_state=None, **kwargs):
    """The proxy: blueness plus the step, so its evaluation rises every step (advantages do not see the offset)."""
    return [value + trainer_state.global_step for value in blueness(prompts, images)]


def falling_gold(prompts, images, trainer_state=None, **kwargs):
    return [-float(trainer_state.global_step)] * len(images)


def alarm_trainer(pipeline, output_dir, **overrides):
    alarm = OverOptimizationCallback("eval_gold/falling_gold", patience=2)
    # a second alarm, on a rising metric, that never fires: checkpoints must keep each alarm's state apart
    watch = OverOptimizationCallback("eval_rewards/rising_blueness", patience=5)
    args = tiny_config(
        output_dir,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        eval_num_inference_steps=2,
        save_strategy="steps",
        save_steps=1,
        **overrides,
    )
    trainer = GuardGRPODiffusionTrainer(
        model=pipeline,
        reward_funcs=[rising_blueness],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(8)]}),
        eval_dataset=Dataset.from_dict({"prompt": ["a red square", "a blue circle"]}),
        callbacks=[alarm, watch],
        peft_config=lora_config(),
        gold_reward_funcs=[falling_gold],
    )
    return trainer, alarm


@pytest.fixture(scope="module")
def uninterrupted_alarm_run(_base_pipeline, tmp_path_factory):
    """Gold falls every evaluation while the proxy rises: with patience 2 the run stops at step 3 and restores the
    weights of step 1."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer, alarm = alarm_trainer(copy.deepcopy(_base_pipeline), output_dir)
    trainer.train()
    return output_dir, trainer.adapter.lora_state_dict(), trainer.state.global_step, alarm


@pytest.mark.parametrize("restore_callback_states", [False, True])
def test_a_resumed_alarm_stops_at_the_same_step_and_restores_the_same_weights(
    uninterrupted_alarm_run, _base_pipeline, tmp_path, restore_callback_states
):
    full_dir, final_full, full_steps, full_alarm = uninterrupted_alarm_run
    assert full_steps == 3 and full_alarm.best_step == 1 and "step 3" in full_alarm.stop_reason
    saved = json.loads((full_dir / "checkpoint-2" / "trainer_state.json").read_text())
    first, second = saved["stateful_callbacks"]["OverOptimizationCallback"]  # this step's states only
    assert (first["attributes"]["bad_evaluations"], second["attributes"]["best_step"]) == (1, 2)

    # killed after checkpoint-2: resumed from it in another folder
    resumed, resumed_alarm = alarm_trainer(
        copy.deepcopy(_base_pipeline),
        tmp_path / "resumed",
        restore_callback_states_from_checkpoint=restore_callback_states,
    )
    resumed.train(resume_from_checkpoint=str(full_dir / "checkpoint-2"))
    assert resumed.state.global_step == 3
    # the alarm the caller holds is the one that decided (transformers would have replaced it)
    assert resumed_alarm in resumed.callback_handler.callbacks
    assert (resumed_alarm.best_step, resumed_alarm.stop_reason) == (1, full_alarm.stop_reason)
    final_resumed = resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)


def test_resuming_from_the_checkpoint_where_the_alarm_stopped_the_run_takes_no_step(
    uninterrupted_alarm_run, _base_pipeline, tmp_path
):
    full_dir, final_full, _, full_alarm = uninterrupted_alarm_run
    resumed, resumed_alarm = alarm_trainer(copy.deepcopy(_base_pipeline), tmp_path / "resumed")
    output = resumed.train(resume_from_checkpoint=str(full_dir / "checkpoint-3"))
    assert output.global_step == resumed.state.global_step == 3
    assert max(entry["step"] for entry in resumed.state.log_history) == 3
    assert resumed_alarm.stop_reason == full_alarm.stop_reason
    # the alarm restored the weights of step 1, as at the end of the uninterrupted run
    final_resumed = resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)
    assert not list((tmp_path / "resumed").glob("checkpoint-*"))


def test_resuming_from_the_checkpoint_at_max_steps_takes_no_step_and_keeps_its_weights(
    _base_pipeline, prompts, tmp_path
):
    def trainer():
        settings = dict(max_steps=3, save_strategy="steps", save_steps=1, steps_per_generation=1, ema_decay=0.9)
        return make_trainer(
            copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, **settings, per_device_train_batch_size=4
        )

    full = trainer()
    full.train()
    resumed = trainer()
    output = resumed.train(resume_from_checkpoint=True)
    # transformers' loop would train step 4 before it checked for the end
    assert output.global_step == resumed.state.global_step == 3
    assert [entry["step"] for entry in resumed.state.log_history if "loss" in entry] == [1, 2, 3]
    assert output.training_loss == pytest.approx(sum(e["loss"] for e in full.state.log_history if "loss" in e) / 3)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    final_full, final_resumed = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=0)
    # the model a script saves after train() (with the EMA swapped in) is the uninterrupted run's
    full.save_model(str(tmp_path / "full-model"))
    resumed.save_model(str(tmp_path / "resumed-model"))
    saved_full, saved_resumed = (
        load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("full-model", "resumed-model")
    )
    assert saved_full.keys() == saved_resumed.keys()
    for key in saved_full:
        torch.testing.assert_close(saved_resumed[key], saved_full[key], rtol=0, atol=0)


# ---- 3. overwrite_output_dir moves the earlier run aside ----------------------------------------------------------
def test_overwrite_moves_the_earlier_runs_checkpoints_aside_and_resume_takes_this_runs(
    _base_pipeline, prompts, tmp_path
):
    def run(max_steps, **kwargs):
        trainer = make_trainer(
            copy.deepcopy(_base_pipeline),
            [blueness],
            prompts,
            tmp_path,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
            steps_per_generation=1,
            per_device_train_batch_size=4,
            **{k: v for k, v in kwargs.items() if k != "resume"},
        )
        trainer.train(resume_from_checkpoint=kwargs.get("resume"))
        return trainer

    run(4)  # run A
    a_lora = (tmp_path / "checkpoint-4" / "pytorch_lora_weights.safetensors").read_bytes()
    run(2, overwrite_output_dir=True)  # run B, afresh in the same folder
    aside = tmp_path / "previous-run-1"
    assert sorted(p.name for p in aside.iterdir()) == [f"checkpoint-{n}" for n in range(1, 5)]
    assert (aside / "checkpoint-4" / "pytorch_lora_weights.safetensors").read_bytes() == a_lora  # nothing lost
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    b = run(3, resume=True)  # B again: from B's checkpoint-2, one step to train
    assert b.state.global_step == 3
    assert [entry["step"] for entry in b.state.log_history if "loss" in entry] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


# ---- 4. an alarm metric that evaluation will not log --------------------------------------------------------------
@pytest.mark.parametrize(
    ("gold", "metric", "message"),
    [
        ([falling_gold], "eval_gold/falling_golf", r"'eval_gold/falling_golf'.*eval_gold/falling_gold"),
        (None, "eval_gold/falling_gold", r"'eval_gold/falling_gold'.*It logs eval_rewards/blueness, eval_reward;"),
    ],
)
def test_an_alarm_metric_evaluation_will_not_log_is_refused_before_the_pipeline_loads(
    gold, metric, message, prompts, tmp_path, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the alarm's metric was checked")

    monkeypatch.setattr("trl_guard.preflight.load_pipeline", no_loading)
    with pytest.raises(ValueError, match=message):
        GuardGRPODiffusionTrainer(
            model=str(tmp_path / "no-such-model"),
            reward_funcs=[blueness],
            args=tiny_config(tmp_path / "out", eval_strategy="steps", eval_steps=1),
            train_dataset=prompts,
            eval_dataset=prompts,
            callbacks=[OverOptimizationCallback(metric)],
            gold_reward_funcs=gold,
        )


def test_an_alarm_added_after_construction_is_checked_before_any_step(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, eval_dataset=prompts)
    trainer.add_callback(OverOptimizationCallback("gold/blueness"))
    with pytest.raises(ValueError, match="Gold scores need gold_reward_funcs"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_misspelt_gold_metric_on_the_command_line_is_refused_naming_the_logged_ones(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    flags = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--dataset_name", str(tmp_path / "prompts.txt")]
    flags += ["--eval_dataset_name", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "out")]
    flags += ["--reward_funcs", "jpeg_compressibility", "--gold_reward_funcs", "jpeg_incompressibility"]
    flags += ["--eval_strategy", "steps", "--eval_steps", "1", "--overoptimization_gold_metric", "gold/jpeg"]
    with pytest.raises(SystemExit):
        main(["grpo", *flags])
    error = capsys.readouterr().err
    assert re.search(r"overoptimization_gold_metric='gold/jpeg'.*eval_gold/jpeg_incompressibility", error), error


# ---- 5. resume_from_checkpoint given the output folder ------------------------------------------------------------
def test_resume_from_the_output_folder_names_the_checkpoint_to_pass(tmp_path):
    for step in (1, 2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a run's output folder, not a checkpoint.*checkpoint-10`.*`true`") as e:
        resolve_resume(str(tmp_path), str(tmp_path), overwrite_output_dir=False)
    assert "trainer_state.json is missing" not in str(e.value)
