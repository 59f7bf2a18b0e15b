"""LTX-2 (video with audio) through the adapter interface and trainer: the adapter reproduces `LTX2Pipeline` (video
and audio, with and without CFG), rewards receive each video's audio, training is exactly on-policy on its first
pass, and the LoRA loads with `LTX2Pipeline.load_lora_weights`."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import blueness
from helpers import logged, lora_config, make_trainer

from trl_guard.adapters import LTX2Adapter, SamplingSettings, get_adapter
from trl_guard.adapters.base import VideosWithAudio
from trl_guard.adapters.ltx2 import LTX2_ATTENTION_PROJECTIONS
from trl_guard.rewards import video_reward
from trl_guard.rollout import sample_ode
from trl_guard.scoring import RewardSet
from trl_guard.testing.ltx2 import TINY_MAX_SEQUENCE_LENGTH, build_tiny_ltx2_pipeline

PROMPTS = ["a red cat", "a dog barking loudly"]
FRAMES = 3  # two latent frames: the tiny VAE compresses time by 2
SIZE = 32  # LTX2Pipeline takes multiples of 32
LTX2 = dict(
    num_frames=FRAMES,
    height=SIZE,
    width=SIZE,
    max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    peft_config=lora_config(target_modules=None),
)
#: The pipeline's guidances the adapter does not do, at their "off" values (see adapters/ltx2.py).
EXTRA_GUIDANCE_OFF = dict(
    stg_scale=0.0,
    audio_stg_scale=0.0,
    modality_scale=1.0,
    audio_modality_scale=1.0,
    guidance_rescale=0.0,
    audio_guidance_rescale=0.0,
)


@pytest.fixture(scope="module")
def _base_pipeline():
    pipeline = build_tiny_ltx2_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def tiny_pipeline(_base_pipeline):
    return copy.deepcopy(_base_pipeline)


def configured(pipeline, guidance_scale=1.0):
    adapter = get_adapter(pipeline)
    adapter.configure(
        SamplingSettings(SIZE, SIZE, guidance_scale, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH, num_frames=FRAMES)
    )
    return adapter


def loudness(prompts, images, audios, **kwargs):
    """Root mean square of each video's waveform: a reward that reads the audio."""
    return [float(np.sqrt(np.mean(np.square(waveform)))) for waveform, _ in audios]


def video_blueness_and_loudness(prompts, images, audios, **kwargs):
    """Blue frames and loud sound: a reward both streams of the sample move."""
    blue = video_reward(blueness)(prompts, images)
    return [b + 10 * loud for b, loud in zip(blue, loudness(prompts, images, audios))]


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_adapter_sampling_matches_the_pipeline_video_and_audio(guidance_scale, tiny_pipeline):
    adapter = configured(tiny_pipeline, guidance_scale)
    assert isinstance(adapter, LTX2Adapter)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    video, audio = adapter.split(latents)
    # 2 x 16 x 16 video tokens of 4 channels, then 3 latent audio frames (3 frames at 24 fps, 25 latent frames a
    # second) of 2 channels x 2 mel bins
    assert video.shape == (2, 512, 4) and audio.shape == (2, 3, 4) and latents.shape == (2, 512 * 4 + 3 * 4)
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents, adapter.sigmas(2))
    decoded = adapter.decode(final)

    calls = []
    hook = tiny_pipeline.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    audio_vae = tiny_pipeline.audio_vae
    reference = tiny_pipeline(
        PROMPTS,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        audio_guidance_scale=guidance_scale,  # the pipeline's default is 7: the adapter guides both at one scale
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        latents=video.clone(),
        # the pipeline normalises audio latents it is given
        audio_latents=audio * audio_vae.latents_std + audio_vae.latents_mean,
        output_type="np",
        **EXTRA_GUIDANCE_OFF,
    )
    hook.remove()
    assert len(calls) == 2  # CFG's two branches batched in one call, as the adapter does
    assert isinstance(decoded, VideosWithAudio) and len(decoded) == 2
    assert all(len(frames) == FRAMES and frames[0].size == (SIZE, SIZE) for frames in decoded)
    ours = np.stack([[np.asarray(frame, dtype=np.float32) / 255 for frame in frames] for frames in decoded])
    assert np.abs(ours - reference.frames).max() <= 1.5 / 255  # PIL's 8-bit rounding
    waveforms = np.stack([waveform for waveform, _ in decoded.audios])
    assert waveforms.dtype == np.float32 and waveforms.shape == tuple(reference.audio.shape)  # (B, channels, samples)
    assert {rate for _, rate in decoded.audios} == {tiny_pipeline.vocoder.config.output_sampling_rate}
    np.testing.assert_allclose(waveforms, reference.audio.numpy(), rtol=0, atol=1e-5)
    assert np.abs(waveforms).max() > 1e-3  # not silence


def test_refuses_frame_counts_sizes_and_text_lengths_it_cannot_take(tiny_pipeline):
    adapter = get_adapter(tiny_pipeline)
    with pytest.raises(ValueError, match="num_frames=4 .* for example, 3"):
        adapter.configure(SamplingSettings(SIZE, SIZE, num_frames=4, max_sequence_length=16))
    with pytest.raises(ValueError, match="width=48 .* for example, 32"):
        adapter.configure(SamplingSettings(SIZE, 48, num_frames=FRAMES, max_sequence_length=16))
    with pytest.raises(ValueError, match="max_sequence_length=20 .* 8 learnable registers.* for example, 16"):
        adapter.configure(SamplingSettings(SIZE, SIZE, num_frames=FRAMES, max_sequence_length=20))
    with pytest.raises(ValueError, match="true_cfg_scale=4.0.*guidance_scale"):
        adapter.configure(SamplingSettings(SIZE, SIZE, true_cfg_scale=4.0, num_frames=FRAMES, max_sequence_length=16))


def test_rewards_receive_each_videos_audio(tiny_pipeline):
    """Scoring hands reward functions the decoded waveforms as `audios` (the pipeline's, checked above); a reward that
    reads them follows the audio stream of the latents, and rewards that do not take `audios` keep working."""
    adapter = configured(tiny_pipeline)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    video, audio = adapter.split(latents)
    louder = adapter.join(video, audio * 3)  # the same video, other sound
    seen = {}

    def record(prompts, images, **kwargs):
        seen.setdefault("audios", []).append(kwargs.get("audios"))
        return [0.0] * len(images)

    rewards = RewardSet([loudness, video_reward(blueness), record])
    decoded, decoded_louder = adapter.decode(latents), adapter.decode(louder)
    scores, scores_louder = rewards(PROMPTS, decoded, {}), rewards(PROMPTS, decoded_louder, {})
    assert seen["audios"][0] == decoded.audios  # each video's (waveform, sample_rate), in order
    assert all(isinstance(w, np.ndarray) and w.ndim == 2 and rate == 16000 for w, rate in seen["audios"][0])
    torch.testing.assert_close(scores[:, 1], scores_louder[:, 1])  # the frames did not change ...
    assert not torch.allclose(scores[:, 0], scores_louder[:, 0])  # ... the sound did, and so its reward
    expected = [float(np.sqrt(np.mean(np.square(w)))) for w, _ in decoded.audios]
    torch.testing.assert_close(scores[:, 0], torch.tensor(expected))
    assert rewards(PROMPTS, decoded[:1], {}).shape == (1, 3)  # a slice keeps its audio
    assert seen["audios"][-1] == decoded.audios[:1]
    RewardSet([record])(PROMPTS, list(decoded), {})  # frames without audio (every other family): no `audios=`
    assert seen["audios"][-1] is None


def test_default_lora_targets_and_fsdp2_wrap_classes(tiny_pipeline):
    """The transformer lists no `_no_split_modules`, so accelerate's transformer-based policy (the shipped
    examples/accelerate_configs/fsdp2.yaml) wraps no block of it: naming its block class
    (`fsdp_transformer_layer_cls_to_wrap: LTX2VideoTransformerBlock`) wraps every block, and every default LoRA target
    sits inside one."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    transformer = tiny_pipeline.transformer
    default = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(default, transformer)
    assert not [name for name, module in transformer.named_modules() if policy(module)]
    named = SimpleNamespace(
        auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=["LTX2VideoTransformerBlock"]
    )
    policy = fsdp2_prepare_auto_wrap_policy(named, transformer)
    wrapped = [name for name, module in transformer.named_modules() if policy(module)]
    blocks = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    assert wrapped == blocks
    targets = [n for n, _ in transformer.named_modules() if any(n.endswith(t) for t in LTX2_ATTENTION_PROJECTIONS)]
    assert {n for n in targets} == {f"{b}.{t}" for b in blocks for t in LTX2_ATTENTION_PROJECTIONS}
    assert LTX2Adapter.fsdp2_refusal is None


@pytest.mark.slow  # ~30 s on two loaded cores: 512 video tokens a sample
def test_trains_on_video_and_audio_and_its_first_pass_is_exactly_on_policy(tiny_pipeline, prompts, tmp_path):
    seen = []

    def record(prompts, images, audios, **kwargs):
        seen.append((images, audios))
        return video_blueness_and_loudness(prompts, images, audios)

    trainer = make_trainer(
        tiny_pipeline,
        [record],
        prompts,
        tmp_path,
        steps_per_generation=1,
        max_steps=2,
        num_generations=2,
        per_device_train_batch_size=4,
        num_inference_steps=2,
        guidance_scale=4.0,  # CFG: both branches batched in one forward, in sampling and in training
        **LTX2,
    )
    # peft shortens a long target list to suffixes matching the same modules: check the modules
    adapted = {n[: -len(".lora_A")] for n, _ in trainer.adapter.denoiser.named_modules() if n.endswith(".lora_A")}
    assert adapted and all(any(n.endswith(t) for t in LTX2_ATTENTION_PROJECTIONS) for n in adapted)
    assert len(adapted) == len(LTX2_ATTENTION_PROJECTIONS) * len(trainer.adapter.denoiser.transformer_blocks)
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    images, audios = seen[0]
    assert len(images) == len(audios) == 4 and len(images[0]) == FRAMES and audios[0][0].shape[0] == 2
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        values = logged(trainer, key)
        assert len(values) == 2 and all(v == 0.0 for v in values), (key, values)
    assert all(np.isfinite(logged(trainer, "loss")))
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # audio-only parameters train too: the audio is part of each sample's log-probability
    assert any(not torch.equal(before[n], after[n]) for n in before if ".audio_attn1." in n)


@pytest.mark.slow  # ~30 s on two loaded cores
def test_lora_loads_with_the_pipelines_loader_and_reproduces_the_policy(_base_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        copy.deepcopy(_base_pipeline),
        [video_blueness_and_loudness],
        prompts,
        tmp_path,
        num_inference_steps=2,
        num_generations=2,
        per_device_train_batch_size=4,
        max_steps=1,
        steps_per_generation=1,
        **LTX2,
    )
    trainer.train()
    trainer.save_model()
    sample = dict(
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=2,
        guidance_scale=1.0,
        audio_guidance_scale=1.0,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        output_type="np",
        **EXTRA_GUIDANCE_OFF,
    )

    def run(pipe):
        out = pipe("prompt number 1", generator=torch.Generator().manual_seed(0), **sample)
        return out.frames, out.audio.numpy()

    trained = run(trainer.pipeline)
    fresh = copy.deepcopy(_base_pipeline)
    base = run(fresh)
    exec(trainer.adapter.lora_load_code(str(tmp_path)), {"pipe": fresh})  # pipe.load_lora_weights(folder)
    reloaded = run(fresh)
    assert np.abs(reloaded[0] - base[0]).mean() > 1e-3 and np.abs(reloaded[1] - base[1]).max() > 1e-6
    np.testing.assert_allclose(reloaded[0], trained[0], atol=1e-5)
    np.testing.assert_allclose(reloaded[1], trained[1], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft"])
def test_the_other_algorithm_families_train_it(loss_type, tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline,
        [video_blueness_and_loudness],
        prompts,
        tmp_path,
        loss_type=loss_type,
        max_steps=1,
        steps_per_generation=1,
        num_generations=2,
        per_device_train_batch_size=4,
        num_inference_steps=2,
        **LTX2,
    )
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(np.isfinite(logged(trainer, "loss")))
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_resume_in_the_middle_of_a_round_is_exact(_base_pipeline, prompts, tmp_path):
    settings = dict(
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        steps_per_generation=2,
        num_generations=2,
        per_device_train_batch_size=2,
        num_inference_steps=2,
        **LTX2,
    )
    rewards = [video_blueness_and_loudness]
    full = make_trainer(copy.deepcopy(_base_pipeline), rewards, prompts, tmp_path / "full", **settings)
    full.train()
    resumed = make_trainer(copy.deepcopy(_base_pipeline), rewards, prompts, tmp_path / "r", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))  # mid-round: replays the buffer
    assert resumed.state.global_step == 4
    final_full, final_resumed = full.adapter.lora_state_dict(), resumed.adapter.lora_state_dict()
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_trains_from_the_command_line_with_the_shipped_recipe(_base_pipeline, tmp_path):
    """The shipped recipe trains; only the model, the prompts, the reward (one reading the audio) and the sizes
    change. The saved tiny pipeline loads back through `from_pretrained` (Gemma3, connectors, both VAEs, vocoder)."""
    from safetensors.torch import load_file

    from trl_guard.scripts.grpo import main as grpo_main

    model_dir = tmp_path / "model"
    _base_pipeline.save_pretrained(model_dir)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(f"a drum playing {i}" for i in range(2)))
    trainer = grpo_main(
        [
            "--config", "examples/recipes/ltx2_guard.yaml",
            "--model_name_or_path", str(model_dir),
            "--model_init_kwargs", "{}",
            "--dataset_name", str(data), "--eval_dataset_name", str(data), "--eval_strategy", "no",
            "--reward_funcs", "test_ltx2.video_blueness_and_loudness",
            "--output_dir", str(tmp_path / "out"),
            "--height", "32", "--width", "32", "--num_frames", "3", "--num_inference_steps", "2",
            "--max_sequence_length", "16",
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--steps_per_generation", "2",
            "--gradient_accumulation_steps", "1", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
            "--bf16", "false", "--activation_checkpointing", "false", "--report_to", "none", "--save_strategy", "no",
        ]
    )  # fmt: skip
    assert trainer.state.global_step == 1 and isinstance(trainer.adapter, LTX2Adapter)
    assert trainer.args.guidance_scale == 3.0 and trainer.adapter.uses_cfg
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("audio_attn1.to_q.lora_A" in key for key in lora)
