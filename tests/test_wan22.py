"""Wan2.2 text-to-video (two experts split at `boundary_ratio`) through the adapter, the trainer and the command line:
sampling equals `WanPipeline.__call__` with both guidance scales, each sample goes to the expert the pipeline would
use, training is exactly on-policy on its first pass and trains both experts, the LoRA loads with
`WanPipeline.load_lora_weights` into both experts, a mid-round resume is exact, and the real A14B widths run."""

import copy

import numpy as np
import pytest
import torch
from conftest import blueness
from diffusers import WanPipeline, WanTransformer3DModel
from helpers import logged, lora_config, make_trainer, resume_mid_round
from safetensors.torch import load_file

from trl_guard.adapters import SamplingSettings, WanAdapter, get_adapter
from trl_guard.adapters.wan22 import (
    LORA_WEIGHT_NAMES,
    WAN22_LORA_TARGETS,
    Wan22Adapter,
    split_lora_targets,
)
from trl_guard.rewards import video_reward
from trl_guard.rollout import sample_ode
from trl_guard.testing import build_tiny_wan_pipeline
from trl_guard.testing.wan22 import WAN22_T2V_A14B, build_tiny_wan22_pipeline, build_wan22_pipeline_at_real_width

PROMPTS = ["a red cat", "two blue dogs"]
FRAMES = 5  # two latent frames
# The tiny pipeline's 4-step Euler grid (shift 3) has timesteps 1000, 857.7, 602.2, 8.9: a boundary of 0.7 gives each
# expert two steps.
BOUNDARY = 0.7
# Default LoRA targets (both experts) and 5-frame videos.
WAN22 = dict(num_frames=FRAMES, peft_config=lora_config(target_modules=None))
SAMPLE = dict(height=32, width=32, num_frames=FRAMES, num_inference_steps=4, max_sequence_length=16)


@pytest.fixture(scope="module")
def _base_wan22_pipeline():
    return build_tiny_wan22_pipeline(seed=0, boundary_ratio=BOUNDARY)


@pytest.fixture
def tiny_wan22_pipeline(_base_wan22_pipeline):
    return copy.deepcopy(_base_wan22_pipeline)


@pytest.fixture(scope="module")
def tiny_wan22_pipeline_dir(_base_wan22_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan22")
    _base_wan22_pipeline.save_pretrained(path)
    return str(path)


def video_blueness(**kwargs):
    return video_reward(blueness, **kwargs)


def record_experts(experts: dict[str, torch.nn.Module]) -> tuple[list[tuple[str, int]], list]:
    """A log of (expert name, batch size) per expert call, and the hooks writing it."""
    calls = []
    hooks = [
        expert.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: calls.append((name, kwargs["hidden_states"].shape[0])),
            with_kwargs=True,
        )
        for name, expert in experts.items()
    ]
    return calls, hooks


def pipeline_experts(pipe) -> dict[str, torch.nn.Module]:
    return {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}


@pytest.mark.parametrize(("guidance_scale", "guidance_scale_2"), [(1.0, None), (4.5, None), (4.0, 3.0)])
def test_sampling_matches_the_pipeline(guidance_scale, guidance_scale_2, tiny_wan22_pipeline):
    pipe = tiny_wan22_pipeline
    adapter = get_adapter(pipe)
    assert isinstance(adapter, Wan22Adapter)
    settings = SamplingSettings(
        32, 32, guidance_scale, max_sequence_length=16, num_frames=FRAMES, guidance_scale_2=guidance_scale_2
    )
    adapter.configure(settings)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    ours_calls, hooks = record_experts(adapter.denoiser.experts)
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents, adapter.sigmas(4))
    videos = adapter.decode(final)
    for hook in hooks:
        hook.remove()

    pipe.set_progress_bar_config(disable=True)
    cfg = dict(negative_prompt="", guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2)
    pipe_calls, hooks = record_experts(pipeline_experts(pipe))
    reference_latents = pipe(PROMPTS, latents=latents.clone(), output_type="latent", **cfg, **SAMPLE).frames
    for hook in hooks:
        hook.remove()
    reference = pipe(PROMPTS, latents=latents.clone(), output_type="np", **cfg, **SAMPLE).frames
    torch.testing.assert_close(final, reference_latents, rtol=0, atol=1e-5)  # bit for bit on this CPU
    ours = np.stack([[np.asarray(frame, dtype=np.float32) / 255 for frame in video] for video in videos])
    assert ours.shape == reference.shape == (2, FRAMES, 32, 32, 3)
    assert np.abs(ours - reference).max() <= 1.5 / 255  # PIL's 8-bit rounding
    # Two steps per expert, each step one batched call here (both CFG branches) where the pipeline makes one per
    # branch; the same expert at every step.
    branches = 2 if guidance_scale > 1 else 1
    assert [name for name, _ in ours_calls] == ["transformer"] * 2 + ["transformer_2"] * 2
    assert [name for name, _ in pipe_calls] == [name for name, _ in ours_calls for _ in range(branches)]
    assert {size for _, size in ours_calls} == {2 * branches}
    if guidance_scale_2 is not None:  # the low-noise expert's own scale is used: a single scale samples otherwise
        adapter.configure(SamplingSettings(32, 32, guidance_scale, max_sequence_length=16, num_frames=FRAMES))
        same_scale = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents, adapter.sigmas(4))
        assert (same_scale - final).abs().max() > 1e-3


def test_the_expert_switch_is_at_the_pipelines_boundary(_base_wan22_pipeline):
    """A boundary exactly on a timestep of the grid: that step belongs to the high-noise expert (`t >= boundary`), in
    the pipeline and in the adapter alike."""
    pipe = copy.deepcopy(_base_wan22_pipeline)
    pipe.scheduler.set_timesteps(4)
    timesteps = pipe.scheduler.timesteps
    pipe.register_to_config(boundary_ratio=float(timesteps[2]) / 1000)  # 602.15...: steps 0-2 are high-noise
    adapter = get_adapter(pipe)
    adapter.configure(SamplingSettings(32, 32, 1.0, max_sequence_length=16, num_frames=FRAMES))
    sigmas = adapter.sigmas(4)
    assert torch.equal(adapter._timestep(sigmas[:-1]), timesteps)  # the timesteps the pipeline compares
    routes = adapter.denoiser.routes_high(adapter._timestep(sigmas[:-1]))
    assert routes.tolist() == [True, True, True, False]
    just_below = torch.nextafter(timesteps[2:3], torch.zeros(1))
    assert adapter.denoiser.routes_high(torch.cat([timesteps[2:3], just_below])).tolist() == [True, False]

    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    ours, hooks = record_experts(adapter.denoiser.experts)
    sample_ode(adapter, adapter.encode_prompts(PROMPTS[:1]), None, latents, sigmas)
    for hook in hooks:
        hook.remove()
    pipe.set_progress_bar_config(disable=True)
    theirs, _ = record_experts(pipeline_experts(pipe))
    pipe(PROMPTS[:1], latents=latents.clone(), guidance_scale=1.0, output_type="latent", **SAMPLE)
    assert ours == theirs == [("transformer", 1)] * 3 + [("transformer_2", 1)]


def test_a_batch_straddling_the_boundary_is_split_per_sample(tiny_wan22_pipeline):
    """Forward-process losses noise each sample of a batch to its own level: every sample gets its own expert and its
    own guidance scale, and gradients reach both experts."""
    adapter = get_adapter(tiny_wan22_pipeline)
    adapter.configure(SamplingSettings(32, 32, 4.0, max_sequence_length=16, num_frames=FRAMES, guidance_scale_2=2.0))
    adapter.add_lora(lora_config(target_modules=None))
    sigma = torch.tensor([0.95, 0.3, 0.8, 0.1])  # timesteps 950, 300, 800, 100: high, low, high, low
    latents = torch.randn(4, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    prompt = adapter.encode_prompts(["a", "b", "c", "d"])
    negative = adapter.encode_prompts([""])
    calls, hooks = record_experts(adapter.denoiser.experts)
    mixed = adapter.predict_velocity(latents, sigma, prompt, negative)
    for hook in hooks:
        hook.remove()
    assert sorted(calls) == [("transformer", 4), ("transformer_2", 4)]  # two rows each, both CFG branches
    with torch.no_grad():
        alone = torch.cat(
            [
                adapter.predict_velocity(latents[i : i + 1], sigma[i : i + 1], prompt.index(slice(i, i + 1)), negative)
                for i in range(4)
            ]
        )
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-6)
    # each row guided at its own expert's scale: guidance_scale 4.0 (high noise), guidance_scale_2 2.0 (low noise)
    with torch.no_grad():
        cond = adapter.forward(adapter.denoiser, latents, sigma, prompt)
        uncond = adapter.forward(adapter.denoiser, latents, sigma, negative.expand(4))
    scale = torch.tensor([4.0, 2.0, 4.0, 2.0]).view(4, 1, 1, 1, 1)
    torch.testing.assert_close(mixed, uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-6)

    mixed.square().mean().backward()
    for name, expert in adapter.denoiser.experts.items():
        grads = [p.grad for p in expert.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    # a batch of one expert leaves the other without gradients: the optimizer skips it, as any unused branch
    adapter.denoiser.zero_grad(set_to_none=True)
    adapter.predict_velocity(latents[:1], sigma[:1], prompt.index(slice(0, 1)), negative).square().mean().backward()
    high, low = ([p.grad for p in e.parameters() if p.requires_grad] for e in adapter.denoiser.experts.values())
    assert any(g is not None and g.abs().sum() > 0 for g in high) and all(g is None for g in low)


def test_lora_on_both_experts_and_the_reference_disables_both(tiny_wan22_pipeline):
    pipe = tiny_wan22_pipeline
    adapter = get_adapter(pipe)
    adapter.configure(SamplingSettings(32, 32, 1.0, max_sequence_length=16, num_frames=FRAMES))
    assert all(m is not pipe.transformer and m is not pipe.transformer_2 for m in adapter.frozen_modules)
    assert any(m is pipe.text_encoder for m in adapter.frozen_modules)
    sigma = torch.tensor([0.9, 0.2])  # one sample per expert
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    prompt = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = adapter.predict_velocity(latents, sigma, prompt, None)
    adapter.add_lora(lora_config(target_modules=None, init_lora_weights=False))  # B != 0: the LoRA acts at once
    assert adapter.trained_experts == ["transformer", "transformer_2"]
    for expert in (pipe.transformer, pipe.transformer_2):
        assert set(expert.peft_config["default"].target_modules) == set(WAN22_LORA_TARGETS)
    with torch.no_grad():
        tuned = adapter.predict_velocity(latents, sigma, prompt, None)
        with adapter.reference_policy():
            reference = adapter.predict_velocity(latents, sigma, prompt, None)
        # the trainer's optimizer sees every LoRA weight of both experts through the one denoiser
        trainable = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert all((tuned[i] - base[i]).abs().max() > 1e-3 for i in range(2))  # both experts changed
    torch.testing.assert_close(reference, base, rtol=0, atol=0)
    assert {n.split(".")[0] for n in trainable} == {"transformer", "transformer_2"}

    # names prefixed with an expert train that expert only
    assert split_lora_targets(["attn1.to_q", "transformer_2.ffn.net.2"]) == {
        "transformer": ["attn1.to_q"],
        "transformer_2": ["attn1.to_q", "ffn.net.2"],
    }
    only_low = get_adapter(build_tiny_wan22_pipeline(boundary_ratio=BOUNDARY))
    only_low.add_lora(lora_config(target_modules=["transformer_2.attn1.to_q", "transformer_2.attn2.to_q"]))
    assert only_low.trained_experts == ["transformer_2"]
    assert only_low.has_lora and not getattr(only_low.pipeline.transformer, "peft_config", None)
    (load,) = only_low.lora_load_code("me/wan22-lora").splitlines()  # the card loads the one file saved
    assert "load_into_transformer_2=True" in load and LORA_WEIGHT_NAMES["transformer_2"] in load


def test_wan21_stays_with_its_adapter_and_bad_settings_are_refused(tiny_wan22_pipeline):
    assert type(get_adapter(build_tiny_wan_pipeline())) is WanAdapter  # one transformer: Wan2.1
    adapter = get_adapter(tiny_wan22_pipeline)
    with pytest.raises(ValueError, match="guidance_scale_2=3.0 with guidance_scale=1.0: WanPipeline runs CFG only"):
        adapter.configure(SamplingSettings(32, 32, 1.0, num_frames=FRAMES, guidance_scale_2=3.0))
    no_boundary = copy.deepcopy(tiny_wan22_pipeline)
    no_boundary.register_to_config(boundary_ratio=None)
    with pytest.raises(ValueError, match="no boundary_ratio, so WanPipeline never calls transformer_2"):
        get_adapter(no_boundary)


@pytest.mark.parametrize(("loss_type", "noise_schedule"), [("flow_grpo", "flow_grpo"), ("nft", None)])
def test_trains_both_experts_and_its_first_pass_is_exactly_on_policy(
    loss_type, noise_schedule, tiny_wan22_pipeline, prompts, tmp_path
):
    schedule = dict(noise_schedule=noise_schedule, noise_level=0.7) if noise_schedule else {}
    trainer = make_trainer(
        tiny_wan22_pipeline,
        [video_blueness()],
        prompts,
        tmp_path,
        loss_type=loss_type,
        steps_per_generation=1,
        max_steps=2,
        guidance_scale=4.5,  # CFG: both branches batched in one forward, in sampling and in training
        **schedule,
        **WAN22,
    )
    adapter = trainer.adapter
    calls, _ = record_experts(adapter.denoiser.experts)
    before = {k: v.clone() for k, v in adapter.lora_state_dict().items()}
    trainer.train()
    after = adapter.lora_state_dict()
    for expert in ("transformer", "transformer_2"):
        keys = [k for k in before if k.startswith(f"{expert}.")]
        assert keys and any(not torch.equal(before[k], after[k]) for k in keys), expert
    assert all(np.isfinite(logged(trainer, "loss")))
    if loss_type == "nft":
        assert logged(trainer, "old_deviation")[0] == 0.0  # round 0: the old policy is the policy
        batch = 2 * trainer.args.per_device_train_batch_size  # CFG doubles it
        assert any(size < batch for _, size in calls)  # batches were split between the experts
    else:
        for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
            assert all(v == 0.0 for v in logged(trainer, key)), key


def test_lora_loads_with_wan_pipeline_into_both_experts(tiny_wan22_pipeline_dir, prompts, tmp_path):
    trainer = make_trainer(
        tiny_wan22_pipeline_dir,
        [video_blueness()],
        prompts,
        tmp_path / "run",
        max_steps=2,
        guidance_scale=4.5,
        **WAN22,
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    files = {name: load_file(tmp_path / "run" / weight) for name, weight in LORA_WEIGHT_NAMES.items()}
    for weights in files.values():  # both keyed as WanPipeline.load_lora_weights reads them
        assert weights and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in weights)
    assert any(".ffn.net.2." in k for k in files["transformer_2"])

    pipe = trainer.pipeline
    pipe.set_progress_bar_config(disable=True)
    sample = dict(prompt="prompt number 1", guidance_scale=4.5, guidance_scale_2=3.0, output_type="np", **SAMPLE)
    trained = pipe(generator=torch.Generator().manual_seed(0), **sample).frames

    fresh = WanPipeline.from_pretrained(tiny_wan22_pipeline_dir)
    fresh.set_progress_bar_config(disable=True)
    assert fresh.config.boundary_ratio == BOUNDARY
    base = fresh(generator=torch.Generator().manual_seed(0), **sample).frames
    # the model card's usage snippet loads each expert's file (here from the folder instead of the Hub repo "run")
    card = (tmp_path / "run" / "README.md").read_text()
    high, low = [line for line in card.splitlines() if line.startswith("pipe.load_lora_weights(")]
    assert high.startswith('pipe.load_lora_weights("run")') and "weight_name" not in high  # the default file
    assert f'weight_name="{LORA_WEIGHT_NAMES["transformer_2"]}"' in low and "load_into_transformer_2=True" in low
    exec(high.replace('"run"', repr(str(tmp_path / "run"))), {"pipe": fresh})
    high_only = fresh(generator=torch.Generator().manual_seed(0), **sample).frames
    exec(low.replace('"run"', repr(str(tmp_path / "run"))), {"pipe": fresh})
    reloaded = fresh(generator=torch.Generator().manual_seed(0), **sample).frames
    assert np.abs(high_only - base).mean() > 1e-4 and np.abs(reloaded - high_only).mean() > 1e-4
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)


def test_resume_in_the_middle_of_a_round_is_exact(_base_wan22_pipeline, prompts, tmp_path):
    full, _ = resume_mid_round(
        lambda: copy.deepcopy(_base_wan22_pipeline), [video_blueness()], prompts, tmp_path, guidance_scale=4.5, **WAN22
    )
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert all((checkpoint / name).exists() for name in LORA_WEIGHT_NAMES.values())
    assert {k.split(".")[0] for k in full.adapter.lora_state_dict()} == {"transformer", "transformer_2"}


def test_full_fine_tune_saves_both_experts_and_resumes_mid_round_exactly(_base_wan22_pipeline, prompts, tmp_path):
    """Without LoRA both experts train whole, are saved in the pipeline's layout (`transformer/`, `transformer_2/`),
    and a run resumed from a checkpoint in the middle of a round (its buffer replayed) ends where the uninterrupted
    one does, in both experts."""
    settings = dict(
        peft_config=None, num_frames=FRAMES, max_steps=2, steps_per_generation=2, save_strategy="steps", save_steps=1
    )
    reward = [video_blueness()]
    trainer = make_trainer(copy.deepcopy(_base_wan22_pipeline), reward, prompts, tmp_path / "run", **settings)
    trainer.train()
    trainer.save_model()
    for name in ("transformer", "transformer_2"):
        saved = WanTransformer3DModel.from_pretrained(tmp_path / "run", subfolder=name).state_dict()
        trained, base = getattr(trainer.pipeline, name).state_dict(), getattr(_base_wan22_pipeline, name).state_dict()
        assert all(torch.equal(saved[k], trained[k]) for k in trained)
        assert any(not torch.equal(trained[k], base[k]) for k in trained), name  # both experts were trained
    checkpoint = tmp_path / "run" / "checkpoint-1"  # step 1 of a 2-step round
    assert (checkpoint / "transformer_2").is_dir() and list(checkpoint.glob("rollout_buffer*"))

    resumed = make_trainer(copy.deepcopy(_base_wan22_pipeline), reward, prompts, tmp_path / "resumed", **settings)
    at_checkpoint = resumed.adapter.full_weights(str(checkpoint))  # keyed as the two-expert module's state
    assert at_checkpoint.keys() == resumed.adapter.denoiser.state_dict().keys()
    for name in ("transformer", "transformer_2"):  # the step after the checkpoint changed each expert
        final = getattr(trainer.pipeline, name).state_dict()
        assert any(not torch.equal(at_checkpoint[f"{name}.{k}"], final[k]) for k in final), name
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2
    for name in ("transformer", "transformer_2"):
        final, final_resumed = (
            getattr(trainer.pipeline, name).state_dict(),
            getattr(resumed.pipeline, name).state_dict(),
        )
        for key in final:
            torch.testing.assert_close(final_resumed[key], final[key], rtol=0, atol=1e-6)


def test_trains_from_the_command_line_with_the_shipped_recipe(tiny_wan22_pipeline_dir, tmp_path):
    """The shipped recipe trains; only the model, the sizes, the reward (OCR there) and the run length change."""
    from trl_guard.scripts.grpo import main as grpo_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f'a sign that says "word {i}"' for i in range(4)))
    trainer = grpo_main(
        [
            "--config", "examples/recipes/wan22_t2v_guard.yaml",
            "--model_name_or_path", tiny_wan22_pipeline_dir,
            "--model_init_kwargs", "{}",
            "--dataset_name", str(prompts),
            "--eval_dataset_name", str(prompts),
            "--eval_strategy", "no",
            "--reward_funcs", "cli_rewards.video_blueness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_frames", "5", "--max_sequence_length", "16",
            "--num_inference_steps", "4",
            "--num_generations", "4", "--per_device_train_batch_size", "4", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.adapter, Wan22Adapter)
    assert trainer.adapter.trained_experts == ["transformer", "transformer_2"]
    assert trainer.adapter.denoiser.transformer.peft_config["default"].r == 4
    for weight in LORA_WEIGHT_NAMES.values():
        assert any("lora_A" in key for key in load_file(tmp_path / "out" / weight))


@pytest.mark.slow
def test_real_a14b_widths_sample_train_save_and_reload(tmp_path):
    """The A14B experts at their real width (5120, 40 heads of 128, FFN 13824, umT5-XXL text width 4096) with one
    block each, in bfloat16: 3-step sampling, one LoRA training step on the default targets of both experts, and the
    LoRA saved and loaded back with `WanPipeline.load_lora_weights`."""
    pipe = build_wan22_pipeline_at_real_width(num_layers=1)
    spec = WAN22_T2V_A14B["transformer"]
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 5120
    assert pipe.transformer_2.blocks[0].ffn.net[2].in_features == spec["ffn_dim"]
    assert pipe.text_encoder.config.d_model == pipe.transformer.config.text_dim == 4096
    adapter = get_adapter(pipe)
    assert isinstance(adapter, Wan22Adapter)
    real = WAN22_T2V_A14B["pipeline"]
    adapter.configure(
        SamplingSettings(
            16, 16, real["guidance_scale"], max_sequence_length=8, guidance_scale_2=real["guidance_scale_2"]
        )
    )
    assert adapter.latent_shape() == (16, 1, 2, 2)  # one frame; 16 x 16 px: one 2x2 patch, one token
    sigmas = adapter.sigmas(3)  # UniPC's grid at flow_shift 12: timesteps 999, 960, 857
    assert adapter.denoiser.routes_high(adapter._timestep(sigmas[:-1])).tolist() == [True, True, False]
    adapter.add_lora(lora_config(target_modules=None, r=4, lora_alpha=8))
    prompt, negative = adapter.encode_prompts(["a cat"]), adapter.encode_prompts([""])
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampled = sample_ode(adapter, prompt, negative, latents, sigmas)
    (video,) = adapter.decode(sampled)
    assert len(video) == 1 and video[0].size == (16, 16)

    trainable = {n: p for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    for p in trainable.values():
        p.data = p.data.float()  # LoRA weights train in float32, as the trainer keeps them
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=1.0)
    both = torch.cat([latents, latents])
    loss = (
        adapter.predict_velocity(both, torch.tensor([0.95, 0.5]), prompt.expand(2), negative).float().square().mean()
    )
    loss.backward()
    optimizer.step()
    changed = {n for n, p in trainable.items() if not torch.equal(before[n], p)}
    # B starts at zero, so the first step moves every B (of every default target, in both experts) and no A
    assert changed == {n for n in trainable if ".lora_B." in n}
    for expert in ("transformer", "transformer_2"):  # "<expert>.blocks.0.<target>.lora_B.default.weight"
        targets = {n.split(".lora_B")[0].split(".", 3)[3] for n in changed if n.startswith(f"{expert}.")}
        assert targets == set(WAN22_LORA_TARGETS), expert

    adapter.save_lora(tmp_path)
    for p in trainable.values():  # as `load_lora_weights` places the LoRA in a bfloat16 model
        p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        trained = adapter.predict_velocity(both, torch.tensor([0.95, 0.5]), prompt.expand(2), negative)
    for expert in (pipe.transformer, pipe.transformer_2):
        expert.delete_adapters("default")
    pipe.load_lora_weights(str(tmp_path), adapter_name="default")
    pipe.load_lora_weights(
        str(tmp_path),
        weight_name=LORA_WEIGHT_NAMES["transformer_2"],
        adapter_name="default",
        load_into_transformer_2=True,
    )
    with torch.no_grad():
        reloaded = adapter.predict_velocity(both, torch.tensor([0.95, 0.5]), prompt.expand(2), negative)
    torch.testing.assert_close(reloaded.float(), trained.float(), rtol=0, atol=0)
