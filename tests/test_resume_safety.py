"""No run loses another's checkpoints: a fresh run over checkpoints refuses, and so does a resume whose settings
change what the checkpoint means."""

import copy

import pytest
from conftest import blueness
from helpers import lora_config, make_trainer

from trl_guard.checkpoints import parse_resume


def counting(calls):
    def reward(prompts, images, **kwargs):
        calls.append(len(images))
        return blueness(prompts, images)

    return reward


@pytest.fixture
def run_with_checkpoint(_base_pipeline, prompts, tmp_path):
    make_trainer(
        copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, max_steps=1, save_strategy="steps", save_steps=1
    ).train()
    assert (tmp_path / "checkpoint-1").is_dir()
    return tmp_path


def test_fresh_run_over_checkpoints_refuses_before_any_step(run_with_checkpoint, tiny_pipeline, prompts):
    calls = []
    trainer = make_trainer(tiny_pipeline, [counting(calls)], prompts, run_with_checkpoint, max_steps=2)
    with pytest.raises(ValueError, match=r"already holds checkpoints \(checkpoint-1\).*resume_from_checkpoint=True"):
        trainer.train()
    assert calls == [] and trainer.state.global_step == 0
    assert (run_with_checkpoint / "checkpoint-1" / "trainer_state.json").exists()


def test_overwrite_output_dir_allows_a_fresh_run(run_with_checkpoint, tiny_pipeline, prompts):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, run_with_checkpoint, overwrite_output_dir=True)
    trainer.train()
    assert trainer.state.global_step == 2


def test_resume_true_continues_from_the_last_checkpoint(run_with_checkpoint, tiny_pipeline, prompts):
    calls = []
    trainer = make_trainer(tiny_pipeline, [counting(calls)], prompts, run_with_checkpoint, max_steps=2)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2
    # tiny_config's rounds serve two optimizer steps: step 2 trains on the buffered round of checkpoint-1
    assert calls == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(loss_type="flow_grpo"), "loss_type: 'grpo_guard' in the checkpoint, 'flow_grpo' now"),
        (dict(num_generations=2), "num_generations: 4 in the checkpoint, 2 now"),
        (dict(peft_config=lora_config(r=4)), "lora_r: 8 in the checkpoint, 4 now"),
        (dict(peft_config=lora_config(target_modules=["attn.to_q"])), "lora_target_modules"),
        (dict(peft_config=None), "trains_lora: True in the checkpoint, False now"),
    ],
)
def test_resume_under_other_settings_names_them(run_with_checkpoint, tiny_pipeline, prompts, change, named):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, run_with_checkpoint, max_steps=2, **change)
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-1.*{named}"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_resume_with_nothing_to_resume(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path)
    with pytest.raises(ValueError, match="holds no checkpoint-N folder"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match="checkpoint-7.*does not exist"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-7"))


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("true", True), ("True", True), ("false", None), ("", None), (None, None), (False, None), ("out/c-2", "out/c-2")],
)
def test_resume_values_from_the_command_line(value, parsed):
    assert parse_resume(value) == parsed
