"""Resume is exact from any checkpoint, and every way a checkpoint or an output folder can mislead a run is refused
with a message that names the file or the field."""

import copy
import json
import shutil

import pytest
import torch
from conftest import blueness
from helpers import make_trainer


def recording(seen):
    def reward(prompts, images, **kwargs):
        seen.append(list(prompts))
        return blueness(prompts, images)

    return reward


def test_resume_after_the_first_epoch_sees_the_same_prompts_and_ends_on_the_same_weights(
    tiny_pipeline, _base_pipeline, prompts, tmp_path
):
    # 8 prompts, 4 per round, 2 optimizer steps per round: an epoch is 4 optimizer steps. checkpoint-5 is in the
    # middle of the second epoch's first round; the round after it (steps 7-8) is sampled after the resume.
    settings = dict(max_steps=8, save_strategy="steps", save_steps=5)
    full_seen, resumed_seen = [], []
    full = make_trainer(tiny_pipeline, [recording(full_seen)], prompts, tmp_path / "full", **settings)
    full.train()
    rounds = [sorted(set(sum(full_seen[i : i + 2], []))) for i in range(0, len(full_seen), 2)]
    assert len(rounds) == 4 and rounds[0] != rounds[2]  # epochs are shuffled anew

    resumed = make_trainer(
        copy.deepcopy(_base_pipeline), [recording(resumed_seen)], prompts, tmp_path / "resumed", **settings
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    assert resumed.state.global_step == 8
    # the resumed run sampled only the last round, with the prompts the uninterrupted run had there
    assert resumed_seen == full_seen[-len(resumed_seen) :] and len(resumed_seen) == 2
    final_full, final_resumed = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)


def test_fresh_run_over_a_finished_run_without_checkpoints_refuses(tiny_pipeline, _base_pipeline, prompts, tmp_path):
    first = make_trainer(copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, max_steps=1)
    first.train()
    first.save_model()
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    before = lora.read_bytes()
    second = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="already holds a trained model.*pytorch_lora_weights.*overwrite_output_dir"):
        second.train()
    assert lora.read_bytes() == before and second.state.global_step == 0
    third = copy.deepcopy(_base_pipeline)
    make_trainer(third, [blueness], prompts, tmp_path, max_steps=1, overwrite_output_dir=True).train()


@pytest.fixture
def mid_round_checkpoint(_base_pipeline, prompts, tmp_path):
    """A run saved at step 1, between the two optimizer steps of its first round."""
    make_trainer(
        copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path / "run", max_steps=1, save_strategy="steps"
    ).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "rollout_buffer_0.safetensors").exists()
    return checkpoint


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            dict(per_device_train_batch_size=4, steps_per_generation=4),
            "per_device_train_batch_size=8 in the checkpoint, 4",
        ),
        (dict(steps_per_generation=4), "steps_per_generation=2 in the checkpoint, 4 now"),
    ],
)
def test_mid_round_resume_under_another_batch_layout_names_the_fields(
    mid_round_checkpoint, tiny_pipeline, prompts, change, named
):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, mid_round_checkpoint.parent, max_steps=2, **change)
    with pytest.raises(ValueError, match=f"middle of a generation round.*{named}"):
        trainer.train(resume_from_checkpoint=str(mid_round_checkpoint))


def test_mid_round_checkpoint_without_its_buffer_refuses(mid_round_checkpoint, tiny_pipeline, prompts):
    (mid_round_checkpoint / "rollout_buffer_0.safetensors").unlink()
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, mid_round_checkpoint.parent, max_steps=2)
    with pytest.raises(ValueError, match="middle of a generation round.*rollout_buffer_0.safetensors is missing"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    "name", ["rollout_buffer_0.safetensors", "pytorch_lora_weights.safetensors", "optimizer.pt", "trainer_state.json"]
)
def test_truncated_checkpoint_files_are_named(mid_round_checkpoint, tiny_pipeline, prompts, name):
    path = mid_round_checkpoint / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, mid_round_checkpoint.parent, max_steps=2)
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-1: {name} .*(truncated|damaged)"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_a_moved_identical_model_folder_resumes_and_another_model_does_not(
    tiny_pipeline_dir, _base_pipeline, prompts, tmp_path
):
    folder_kwargs = dict(model_init_kwargs={"text_encoder_3": None, "tokenizer_3": None})
    settings = dict(max_steps=2, save_strategy="steps", save_steps=1, **folder_kwargs)
    make_trainer(tiny_pipeline_dir, [blueness], prompts, tmp_path / "run", **settings).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"

    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_pipeline_dir, moved)
    resumed = make_trainer(str(moved), [blueness], prompts, tmp_path / "run", max_steps=3, **folder_kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3

    other = tmp_path / "other-model"
    shutil.copytree(tiny_pipeline_dir, other)
    scheduler = other / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 1.0}))
    refused = make_trainer(str(other), [blueness], prompts, tmp_path / "run", max_steps=3, **folder_kwargs)
    with pytest.raises(ValueError, match="Cannot resume .*model: "):
        refused.train(resume_from_checkpoint=str(checkpoint))


def test_train_without_a_train_dataset_names_it(tiny_pipeline, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], None, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"train\(\) needs a train_dataset"):
        trainer.train()
