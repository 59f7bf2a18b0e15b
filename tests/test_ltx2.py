"""LTX-2 (video with audio) through the adapter interface and trainer: the adapter reproduces `LTX2Pipeline` (video
and audio, with and without CFG), rewards (group-wise ones too) receive each video's audio, evaluation logs it to
the trackers, training is exactly on-policy on its first pass, the LoRA loads with `LTX2Pipeline.load_lora_weights`,
and all of it holds at the published widths (`LTX2_T2V`)."""

import copy
import io
import json
import math
import sqlite3
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import test_tracking
import torch
from builders.ltx2 import (
    LTX2_T2V,
    REAL_WIDTH_MAX_SEQUENCE_LENGTH,
    TINY_MAX_SEQUENCE_LENGTH,
    build_real_width_ltx2_pipeline,
    build_tiny_ltx2_pipeline,
)
from conftest import blueness
from datasets import Dataset
from helpers import logged, lora_config, make_trainer, resume_mid_round

from trl_guard.adapters import LTX2Adapter, SamplingSettings, get_adapter
from trl_guard.adapters.base import VideosWithAudio
from trl_guard.adapters.ltx2 import LTX2_ATTENTION_PROJECTIONS
from trl_guard.rewards import video_reward
from trl_guard.rollout import sample_ode
from trl_guard.scoring import RewardSet

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
# test_tracking's fixtures: a wandb offline run and a trackio store under tmp_path
wandb_offline, trackio_dir = test_tracking.wandb_offline, test_tracking.trackio_dir

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
    settings = dict(num_generations=2, per_device_train_batch_size=2, num_inference_steps=2, **LTX2)
    rewards = [video_blueness_and_loudness]
    resume_mid_round(lambda: copy.deepcopy(_base_pipeline), rewards, prompts, tmp_path, **settings)


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


def test_the_published_record_is_the_classes_defaults_but_the_rope_layout():
    """The record's diffusers components are their classes' defaults (which the conversion script's "2.0" tables
    repeat) but the split RoPE layout of the transformer and the connectors, and the video VAE's non-causal decoder
    and its compression ratios (None by default: derived from the blocks, the same 32 and 8)."""
    import inspect

    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    differ = {
        "transformer": (LTX2VideoTransformer3DModel, {"rope_type"}),
        "connectors": (LTX2TextConnectors, {"rope_type"}),
        "vae": (AutoencoderKLLTX2Video, {"decoder_causal", "spatial_compression_ratio", "temporal_compression_ratio"}),
        "audio_vae": (AutoencoderKLLTX2Audio, set()),
        "vocoder": (LTX2Vocoder, set()),
    }
    for component, (cls, expected) in differ.items():
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        values = LTX2_T2V[component].values
        assert set(values) == set(defaults), component
        assert {k for k in values if values[k] != defaults[k]} == expected, component
    assert LTX2_T2V["transformer"]["rope_type"] == LTX2_T2V["connectors"]["rope_type"] == "split"
    # Gemma3-12B's 48 layers and embeddings are the connectors' 49 stacked hidden states, its width the captions'
    text, connectors = LTX2_T2V["text_encoder"], LTX2_T2V["connectors"]
    assert connectors["text_proj_in_factor"] == text["num_hidden_layers"] + 1
    assert connectors["caption_channels"] == text["hidden_size"] == LTX2_T2V["transformer"]["caption_channels"]
    # one latent audio frame: 8 channels x (64 mel bins / 4) = 128 features; 240 waveform samples a 160-sample hop
    audio_vae, vocoder = LTX2_T2V["audio_vae"], LTX2_T2V["vocoder"]
    assert audio_vae["latent_channels"] * audio_vae["mel_bins"] // 4 == LTX2_T2V["transformer"]["audio_in_channels"]
    assert vocoder["in_channels"] == audio_vae["output_channels"] * audio_vae["mel_bins"]
    assert math.prod(vocoder["upsample_factors"]) == audio_vae["mel_hop_length"] * 24000 // audio_vae["sample_rate"]


@pytest.mark.slow  # 1-2 min: 1.4 G parameters (the one-block transformer is 0.73 G of them)
def test_real_widths_sample_train_save_and_reload(tmp_path):
    """The published widths (`LTX2_T2V`: the 4096-wide video stream of 32 heads x 128 and the 2048-wide audio stream
    of 32 x 64, Gemma3-12B's 3840-wide states through 3840-wide connectors with 128 registers, the 128-channel video
    VAE at 32x / 8x, the audio VAE's 8 x 16 latent features, the 24 kHz vocoder) with one audio-video block, the
    published scheduler and CFG scale: sample video and audio, train one LoRA step on the default targets, save, and
    load the LoRA with the model card's line (`pipe.load_lora_weights`): it gives the trained policy's velocity."""
    real = LTX2_T2V
    spec = real["transformer"]
    pipe = build_real_width_ltx2_pipeline(seed=0)
    transformer = pipe.transformer
    video_width = spec["num_attention_heads"] * spec["attention_head_dim"]
    audio_width = spec["audio_num_attention_heads"] * spec["audio_attention_head_dim"]
    assert (
        (video_width, audio_width) == (4096, 2048) == (spec["cross_attention_dim"], spec["audio_cross_attention_dim"])
    )
    assert transformer.proj_in.out_features == video_width and transformer.audio_proj_in.out_features == audio_width
    assert transformer.proj_in.in_features == spec["in_channels"] == pipe.vae.config.latent_channels == 128
    assert transformer.audio_proj_in.in_features == spec["audio_in_channels"] == 128
    assert transformer.transformer_blocks[0].ff.net[2].in_features == 4 * video_width
    assert pipe.text_encoder.config.text_config.hidden_size == spec["caption_channels"] == 3840
    assert pipe.connectors.video_connector.num_learnable_registers == 128
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    assert pipe.vocoder.config.output_sampling_rate == 24000
    assert pipe.scheduler.config.shift_terminal == real["pipeline"]["shift_terminal"]

    captions = Dataset.from_dict({"prompt": PROMPTS})
    trainer = make_trainer(
        pipe,
        [video_blueness_and_loudness],
        captions,
        tmp_path / "run",
        num_frames=9,  # 2 latent frames
        height=64,
        width=64,  # 2 x 2 latent tokens
        max_sequence_length=REAL_WIDTH_MAX_SEQUENCE_LENGTH,
        num_generations=2,
        per_device_train_batch_size=2,
        steps_per_generation=1,
        max_steps=1,
        num_inference_steps=2,
        timestep_fraction=0.5,  # train the first of the 2 steps
        guidance_scale=real["pipeline"]["guidance_scale"],
        learning_rate=1e-3,
        peft_config=lora_config(target_modules=None),
    )
    adapter = trainer.adapter
    assert adapter.uses_cfg
    # 8 video tokens of 128, then 9 latent audio frames (9 frames at 24 fps, 25 a second) of 128
    assert adapter.split(torch.zeros(1, *adapter.latent_shape()))[1].shape == (1, 9, 128)
    assert adapter.latent_shape() == (8 * 128 + 9 * 128,)
    trainer.train()
    assert logged(trainer, "log_ratio_mean") == [0.0] and np.isfinite(logged(trainer, "loss")[0])
    trainer.save_model()

    embeds, negative = adapter.encode_prompts(PROMPTS[:1]), adapter.encode_prompts([""])
    assert embeds.tensors["encoder_hidden_states"].shape == (1, REAL_WIDTH_MAX_SEQUENCE_LENGTH, 3840)
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8])
    with torch.no_grad():
        trained = adapter.predict_velocity(latents, sigma, embeds, negative)
        decoded = adapter.decode(latents - 0.8 * trained)
        transformer.delete_adapters("default")
        base = adapter.predict_velocity(latents, sigma, embeds, negative)
        exec(adapter.lora_load_code(str(tmp_path / "run")), {"pipe": pipe})  # the model card's loading line
        reloaded = adapter.predict_velocity(latents, sigma, embeds, negative)
    waveform, rate = decoded.audios[0]
    assert len(decoded[0]) == 9 and decoded[0][0].size == (64, 64)
    # stereo, 240 samples a mel frame; the causal audio VAE makes 4 (L - 1) + 1 mel frames of L latent frames
    assert rate == 24000 and waveform.shape == (2, (4 * 8 + 1) * 240) and np.isfinite(waveform).all()
    audio = slice(8 * 128, None)
    assert (trained - base)[:, audio].abs().max() > 1e-4  # the step moved the LoRA, in the audio stream too
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file's samples `(channels, samples)` as int16, and its sample rate."""
    with wave.open(io.BytesIO(data)) as file:
        frames = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2")
        return frames.reshape(-1, file.getnchannels()).T, file.getframerate()


@pytest.mark.slow  # ~30 s on two loaded cores: one round, one evaluation, three trackers
def test_evaluation_logs_each_videos_audio_to_the_trackers(
    tiny_pipeline,
    prompts,
    tmp_path,
    monkeypatch,
    wandb_offline,
    trackio_dir,
):
    """The evaluation videos' sound, each video's with it (row i of the grid is `eval_audio/i`), is written next to
    the run as WAV files and reaches TensorBoard (`add_audio`, the channels' mean), wandb and trackio (`Audio`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    heard = {}

    def record(prompts, images, audios, **kwargs):
        heard.update(zip(prompts, audios))
        return video_blueness_and_loudness(prompts, images, audios)

    evaluation = ["a drum", "a bell"]
    trainer = make_trainer(
        tiny_pipeline,
        [record],
        prompts,
        tmp_path / "run",
        max_steps=1,
        steps_per_generation=1,
        num_generations=2,
        per_device_train_batch_size=2,
        num_inference_steps=2,
        eval_num_inference_steps=2,
        report_to=["tensorboard", "wandb", "trackio"],
        eval_strategy="steps",
        eval_steps=1,
        eval_dataset=Dataset.from_dict({"prompt": evaluation}),
        **LTX2,
    )
    trainer.train()
    wavs = sorted((tmp_path / "run" / "eval_audio").glob("*.wav"))
    assert [w.name for w in wavs] == ["step-000001-00.wav", "step-000001-01.wav"]
    for path, prompt in zip(wavs, evaluation):  # the grid's order: the evaluation rows'
        waveform, rate = heard[prompt]
        samples, file_rate = read_wav(path.read_bytes())
        assert file_rate == rate == 16000 and samples.shape == waveform.shape
        np.testing.assert_allclose(samples / 32767, np.clip(waveform, -1, 1), atol=1 / 32767)
    assert np.abs(read_wav(wavs[0].read_bytes())[0]).max() > 30  # not silence

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"audio": 0}).Reload()
    assert sorted(events.Tags()["audio"]) == ["eval_audio/00", "eval_audio/01"]
    for i, prompt in enumerate(evaluation):
        (event,) = events.Audio(f"eval_audio/{i:02d}")
        waveform, rate = heard[prompt]
        assert event.step == 1 and event.sample_rate == rate and event.length_frames == waveform.shape[-1]

    run_file = test_tracking.wandb_run_file(wandb_offline)
    history = test_tracking.wandb_history(run_file)
    for i, path in enumerate(wavs):  # wandb copies each WAV into the run
        assert history[f"eval_audio/{i:02d}/_type"] == "audio-file"
        assert (run_file.parent / "files" / history[f"eval_audio/{i:02d}/path"]).read_bytes() == path.read_bytes()

    (database,) = trackio_dir.glob("*.db")
    with sqlite3.connect(database) as connection:
        rows = [json.loads(metrics) for (metrics,) in connection.execute("SELECT metrics FROM metrics ORDER BY id")]
    (row,) = [row for row in rows if "eval_audio/00" in row]
    for i, path in enumerate(wavs):
        assert row[f"eval_audio/{i:02d}"]["_type"] == "trackio.audio"
        stored = read_wav((trackio_dir / "media" / row[f"eval_audio/{i:02d}"]["file_path"]).read_bytes())
        np.testing.assert_array_equal(stored[0], read_wav(path.read_bytes())[0])


def test_group_rewards_receive_each_videos_audio(tiny_pipeline, prompts, tmp_path):
    """A group-wise reward, called once the round is sampled (in two micro-batches here), gets each group's videos
    with their audio (`audios=`), the same waveforms the per-sample rewards got, in the same order."""
    from trl_guard.rewards import group_reward

    per_sample, per_group = [], []

    def record(prompts, images, audios, **kwargs):
        per_sample.extend(audios)
        return loudness(prompts, images, audios)

    @group_reward
    def loudest_of_the_group(prompts, images, audios, **kwargs):
        per_group.append((list(prompts), audios))
        levels = loudness(prompts, images, audios)
        return [float(level == max(levels)) for level in levels]

    trainer = make_trainer(
        tiny_pipeline,
        [record, loudest_of_the_group],
        prompts,
        tmp_path,
        max_steps=1,
        steps_per_generation=1,
        num_generations=2,
        per_device_train_batch_size=4,
        per_device_sample_batch_size=2,  # the round's four videos come from two decodes
        num_inference_steps=2,
        timestep_fraction=0.5,  # train one of the 2 steps
        **LTX2,
    )
    trainer.train()
    assert [len(audios) for _, audios in per_group] == [2, 2]
    assert [prompts[0] == prompts[1] for prompts, _ in per_group] == [True, True]  # one prompt's group a call
    grouped = [audio for _, audios in per_group for audio in audios]
    assert len(grouped) == len(per_sample) == 4
    for (waveform, rate), (expected, expected_rate) in zip(grouped, per_sample):
        assert rate == expected_rate == 16000
        np.testing.assert_array_equal(waveform, expected)
    assert logged(trainer, "rewards/loudest_of_the_group/mean") == [0.5]  # one loudest video in each pair
