"""The saved LoRA is what diffusers' pipelines load, and checkpoints resume."""

import numpy as np
import pytest
import torch
from conftest import blueness
from diffusers import StableDiffusion3Pipeline
from helpers import make_trainer, resume_mid_round

SAMPLE = dict(height=32, width=32, num_inference_steps=6, guidance_scale=1.0, max_sequence_length=16, output_type="np")


def generate(pipeline, prompt="prompt number 1"):
    return pipeline(prompt, generator=torch.Generator().manual_seed(0), **SAMPLE).images


def test_saved_lora_loads_into_a_fresh_pipeline_and_changes_images(tiny_pipeline_dir, prompts, tmp_path):
    load = dict(text_encoder_3=None, tokenizer_3=None)
    trainer = make_trainer(
        tiny_pipeline_dir, [blueness], prompts, tmp_path / "run", max_steps=4, model_init_kwargs=load
    )
    trainer.train()
    trainer.save_model()
    trained = generate(trainer.pipeline)

    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, **load)
    base = generate(fresh)
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = generate(fresh)

    assert np.abs(reloaded - base).mean() > 1e-3  # the LoRA changes the output...
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)  # ...into exactly what the trained model draws


def test_checkpoints_are_diffusers_loras_and_training_resumes(tiny_pipeline, _base_pipeline, prompts, tmp_path):
    import copy

    run = tmp_path / "run"
    full = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        run,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        steps_per_generation=1,
    )
    full.train()
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / "pytorch_lora_weights.safetensors").exists()
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "guard_config.json").exists()
    assert not (checkpoint / "training_args.bin").exists()  # no pickles in our output

    calls = []

    def counted_blueness(prompts, images, **kwargs):
        calls.append(len(images))
        return blueness(prompts, images)

    counted_blueness.__name__ = "blueness"
    resumed = make_trainer(
        copy.deepcopy(_base_pipeline),
        [counted_blueness],
        prompts,
        tmp_path / "resumed",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        steps_per_generation=1,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert len(calls) == 2  # only steps 3 and 4 ran: the first two came from the checkpoint
    final_full, final_resumed = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)


def test_builtin_reward_by_name(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, ["jpeg_compressibility"], prompts, tmp_path, max_steps=1)
    trainer.train()
    assert [e for e in trainer.state.log_history if "rewards/jpeg_compressibility/mean" in e]


@pytest.mark.parametrize("name", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_builtin_rewards_resolve(name):
    from trl_guard.rewards import resolve_reward_func

    assert resolve_reward_func(name).__name__ == name
    assert resolve_reward_func("trl_guard.rewards.compression." + name).__name__ == name


@pytest.mark.slow
def test_a_run_killed_while_saving_loses_nothing(tiny_pipeline, prompts, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers.trainer_utils import get_last_checkpoint

    run = tmp_path / "run"
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, str(tests / "checkpoint_kill_run.py"), str(run)],
        env={**os.environ, "PYTHONPATH": str(tests)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert not (run / "checkpoint-4").exists()  # the interrupted checkpoint never appears under its real name
    previous = run / "checkpoint-2"
    for name in (
        "pytorch_lora_weights.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.pth",
    ):
        assert (previous / name).exists(), name
    assert get_last_checkpoint(str(run)) == str(previous)

    resumed = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        run,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        steps_per_generation=1,
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert (run / "checkpoint-6").exists() and not (run / ".staging").exists()


def test_resume_in_the_middle_of_a_generation_round_is_exact(_base_pipeline, prompts, tmp_path):
    import copy

    resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path)
    assert not (tmp_path / "full" / "checkpoint-2" / "rollout_buffer_0.safetensors").exists()  # end of a round


def test_full_fine_tuning_resumes_exactly_and_saves_diffusers_weights(
    tiny_pipeline, _base_pipeline, prompts, tmp_path
):
    import copy

    from diffusers import SD3Transformer2DModel

    settings = dict(
        peft_config=None, max_steps=4, save_strategy="steps", save_steps=3, steps_per_generation=2, learning_rate=1e-2
    )
    straight = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path / "straight", **settings)
    straight.train()
    straight.save_model()
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "rollout_buffer_0.safetensors").exists()  # in the middle of a round

    resumed = make_trainer(copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = straight.adapter.denoiser.state_dict()
    for key, value in resumed.adapter.denoiser.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)

    saved = SD3Transformer2DModel.from_pretrained(tmp_path / "straight", subfolder="transformer").state_dict()
    base = _base_pipeline.transformer.state_dict()
    assert max((saved[k] - base[k]).abs().max() for k in base) > 1e-4  # the whole model trained
    for key, value in saved.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_rollout_buffer_round_trips_train_batches(tmp_path):
    import torch

    from trl_guard.adapters import PromptEmbeddings
    from trl_guard.rollout import Rollout, TrainBatch, load_rollout_buffer, save_rollout_buffer

    def batch(seed, negative):
        g = torch.Generator().manual_seed(seed)
        rollout = Rollout(
            torch.randn(2, 4, 3, generator=g),
            torch.randn(2, 3, 3, generator=g),
            torch.linspace(1, 0, 4),
        )
        embeds = PromptEmbeddings({"prompt_embeds": torch.randn(2, 5, 8, generator=g)})
        advantages, rewards = torch.randn(2, generator=g), torch.randn(2, generator=g)
        groups = torch.tensor([seed, seed])
        return TrainBatch(rollout, embeds, embeds if negative else None, advantages, [0, 2], rewards, groups)

    batches = [batch(0, negative=True), batch(1, negative=False)]
    layout = {"per_device_train_batch_size": 2, "steps_per_generation": 2}
    save_rollout_buffer(batches, str(tmp_path / "buffer.safetensors"), layout)
    loaded = load_rollout_buffer(str(tmp_path / "buffer.safetensors"), torch.device("cpu"), layout, Rollout)
    assert len(loaded) == 2 and loaded[1].negative_embeds is None and loaded[0].train_steps == [0, 2]
    for original, back in zip(batches, loaded):
        for name in ("latents", "old_means", "sigmas"):
            torch.testing.assert_close(getattr(back.rollout, name), getattr(original.rollout, name), rtol=0, atol=0)
        torch.testing.assert_close(back.advantages, original.advantages, rtol=0, atol=0)
        torch.testing.assert_close(back.prompt_embeds.tensors, original.prompt_embeds.tensors, rtol=0, atol=0)
    two = dict(rewards=torch.zeros(2), group_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="3 advantages for a batch of 2"):
        TrainBatch(batches[0].rollout, batches[0].prompt_embeds, None, torch.zeros(3), [0], **two)
    with pytest.raises(ValueError, match=r"Train steps \[5\] were not recorded"):
        TrainBatch(batches[0].rollout, batches[0].prompt_embeds, None, torch.zeros(2), [0, 5], **two)
    with pytest.raises(ValueError, match="per_device_train_batch_size=2 in the checkpoint, 4 now"):
        load_rollout_buffer(
            str(tmp_path / "buffer.safetensors"), "cpu", {**layout, "per_device_train_batch_size": 4}, Rollout
        )


def test_a_mid_round_buffer_records_the_context_parallel_degree(tmp_path):
    """Two processes cut a round into other micro-batches as one context-parallel group than as two data-parallel
    ranks: a mid-round buffer saved under one degree is refused under another, naming the field."""
    from trl_guard import GuardConfig
    from trl_guard.rollout import Rollout, buffer_layout, load_rollout_buffer, save_rollout_buffer

    layout = buffer_layout(GuardConfig(output_dir=str(tmp_path), report_to="none"))
    assert layout["context_parallel_degree"] == 1
    save_rollout_buffer([], str(tmp_path / "buffer.safetensors"), layout)
    with pytest.raises(ValueError, match="context_parallel_degree=1 in the checkpoint, 2 now"):
        load_rollout_buffer(
            str(tmp_path / "buffer.safetensors"), "cpu", {**layout, "context_parallel_degree": 2}, Rollout
        )
