"""Precision and memory options: bf16 autocast, gradient checkpointing, offloading, precomputed prompt embeddings."""

import math

import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_precomputed_prompt_embeddings_never_run_the_text_encoders_again(family, request, prompts, tmp_path):
    pipeline = request.getfixturevalue("tiny_pipeline" if family == "sd3" else "tiny_flux_pipeline")
    trainer = make_trainer(pipeline, [blueness], prompts, tmp_path, precompute_prompt_embeds=True, guidance_scale=3.0)
    expected = set(prompts["prompt"]) | ({trainer.args.negative_prompt} if trainer.adapter.uses_cfg else set())
    assert set(trainer.prompt_encoder.cache) == expected

    def fail(*args, **kwargs):
        raise AssertionError("a text encoder ran after the prompts were precomputed")

    for encoder in trainer.adapter.text_encoders:
        encoder.forward = fail
    trainer.train()
    assert logged(trainer, "reward")


def test_precomputed_embeddings_equal_fresh_ones(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, precompute_prompt_embeds=True)
    cached, index = trainer.prompt_encoder(["prompt number 3", "prompt number 1", "prompt number 3"])
    fresh = trainer.adapter.encode_prompts(["prompt number 3", "prompt number 1"])
    assert index.tolist() == [0, 1, 0]
    for key, value in fresh.tensors.items():
        torch.testing.assert_close(cached.tensors[key], value)


def test_offloading_moves_frozen_modules_only_while_used(tiny_pipeline, prompts, tmp_path, monkeypatch):
    moves = []
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, offload_frozen_modules=True, max_steps=1)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(trainer.pipeline, name)
        original = module.to

        def recording_to(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0]) if args else str(kwargs)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "to", recording_to)
    trainer.train()
    for name in ("vae", "text_encoder", "text_encoder_2"):
        mine = [device for n, device in moves if n == name]
        assert mine and mine[-1] == "cpu" and len(mine) % 2 == 0, (name, mine)


def test_bf16_autocast_keeps_the_sde_math_in_float32(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, bf16=True, max_steps=2, use_cpu=True)
    batches = trainer._generate_and_score(
        [{"prompt": p} for p in prompts["prompt"][:4] for _ in range(4)], rollout_index=0
    )
    assert batches[0].rollout.latents.dtype == torch.float32
    assert batches[0].rollout.old_means.dtype == torch.float32
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_gradient_checkpointing(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, activation_checkpointing=True, max_steps=2)
    assert trainer.adapter.denoiser.gradient_checkpointing
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
