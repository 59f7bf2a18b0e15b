"""Wan2.1 text-to-video through the same adapter interface and trainer: the adapter reproduces `WanPipeline`, training
is exactly on-policy on its first pass, the LoRA loads with `WanPipeline.load_lora_weights`, and image rewards lift
to videos."""

import contextlib
import copy

import numpy as np
import pytest
import torch
from conftest import blueness
from diffusers import UniPCMultistepScheduler, WanPipeline
from helpers import logged, lora_config, make_trainer
from PIL import Image

from trl_guard.adapters import SamplingSettings, WanAdapter, get_adapter
from trl_guard.images import make_grid
from trl_guard.rewards import resolve_reward_func, video_reward
from trl_guard.rollout import sample_ode
from trl_guard.testing import build_tiny_sd3_pipeline, build_tiny_wan_pipeline

PROMPTS = ["a red cat", "two blue dogs"]
FRAMES = 5  # two latent frames: the VAE compresses time by 4
# Default LoRA targets (the family's attention projections) and 5-frame videos.
WAN = dict(num_frames=FRAMES, peft_config=lora_config(target_modules=None))


@pytest.fixture(scope="module")
def _base_wan_pipeline():
    return build_tiny_wan_pipeline(seed=0)


@pytest.fixture
def tiny_wan_pipeline(_base_wan_pipeline):
    return copy.deepcopy(_base_wan_pipeline)


@pytest.fixture(scope="module")
def tiny_wan_pipeline_dir(_base_wan_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan")
    _base_wan_pipeline.save_pretrained(path)
    return str(path)


def video_blueness(**kwargs):
    return video_reward(blueness, **kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_wan_adapter_sampling_matches_the_pipeline(guidance_scale, tiny_wan_pipeline):
    adapter = get_adapter(tiny_wan_pipeline)
    assert isinstance(adapter, WanAdapter)
    adapter.configure(SamplingSettings(32, 32, guidance_scale, max_sequence_length=16, num_frames=FRAMES))
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 2, 4, 4)  # (B, C, F, H, W)
    negative = adapter.encode_prompts([""]) if adapter.uses_cfg else None
    final = sample_ode(adapter, adapter.encode_prompts(PROMPTS), negative, latents, adapter.sigmas(4))
    videos = adapter.decode(final)
    assert len(videos) == 2 and all(len(v) == FRAMES and v[0].size == (32, 32) for v in videos)
    ours = np.stack([[np.asarray(frame, dtype=np.float32) / 255 for frame in video] for video in videos])

    tiny_wan_pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_frames=FRAMES, num_inference_steps=4, max_sequence_length=16)
    reference = tiny_wan_pipeline(
        PROMPTS, negative_prompt="", latents=latents.clone(), guidance_scale=guidance_scale, output_type="np", **kwargs
    ).frames
    assert reference.shape == ours.shape == (2, FRAMES, 32, 32, 3)
    assert np.abs(ours - reference).max() <= 1.5 / 255  # PIL's 8-bit rounding
    # Before decoding, the latents agree to float32 rounding (bit for bit on this CPU).
    reference_latents = tiny_wan_pipeline(
        PROMPTS,
        negative_prompt="",
        latents=latents.clone(),
        guidance_scale=guidance_scale,
        output_type="latent",
        **kwargs,
    ).frames
    torch.testing.assert_close(final, reference_latents, rtol=0, atol=1e-5)


def test_wan_samples_on_the_checkpoints_unipc_flow_grid(tiny_wan_pipeline):
    """Wan's checkpoints ship UniPC with flow sigmas: the adapter takes its shifted grid and hands the denoiser the
    scheduler's own (integer) timesteps."""
    tiny_wan_pipeline.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    adapter = get_adapter(tiny_wan_pipeline)
    adapter.configure(SamplingSettings(32, 32, 5.0, num_frames=FRAMES))
    sigmas = adapter.sigmas(20)
    scheduler = tiny_wan_pipeline.scheduler
    base = np.linspace(1, 1 / 1000, 21)[:-1]
    np.testing.assert_allclose(sigmas[:-1].numpy(), 3 * base / (1 + 2 * base), atol=2e-6)  # flow_shift 3
    assert sigmas[-1] == 0 and torch.all(sigmas[1:] < sigmas[:-1])
    assert torch.equal(adapter._timestep(sigmas[:-1]), scheduler.timesteps.float())


def test_wan_refuses_frame_counts_and_sizes_it_cannot_take(tiny_wan_pipeline):
    adapter = get_adapter(tiny_wan_pipeline)
    with pytest.raises(ValueError, match="num_frames=6 .* for example, 5"):
        adapter.configure(SamplingSettings(32, 32, num_frames=6))
    with pytest.raises(ValueError, match="width=40 .* for example, 32"):
        adapter.configure(SamplingSettings(32, 40, num_frames=FRAMES))
    with pytest.raises(ValueError, match="num_frames=5, but StableDiffusion3Pipeline makes images"):
        get_adapter(build_tiny_sd3_pipeline()).configure(SamplingSettings(32, 32, num_frames=FRAMES))


@pytest.mark.parametrize(("loss_type", "noise_schedule"), [("flow_grpo", "flow_grpo"), ("grpo_guard", "linear")])
def test_wan_trains_and_its_first_pass_is_exactly_on_policy(
    loss_type, noise_schedule, tiny_wan_pipeline, prompts, tmp_path
):
    seen = []

    def record_blueness(prompts, images, **kwargs):
        seen.append(images)
        return blueness(prompts, images, **kwargs)

    # 0.98 is Flow-GRPO's noise level for 20 steps, not for these 4: the trainer says so
    warns = pytest.warns(UserWarning, match="second sigma") if noise_schedule == "linear" else contextlib.nullcontext()
    with warns:
        trainer = make_trainer(
            tiny_wan_pipeline,
            [video_reward(record_blueness)],
            prompts,
            tmp_path,
            eval_dataset=prompts.select(range(3)),
            loss_type=loss_type,
            noise_schedule=noise_schedule,  # "linear": Flow-GRPO's Wan schedule, at its noise level for 20 steps
            noise_level=0.98 if noise_schedule == "linear" else 0.7,
            steps_per_generation=1,
            max_steps=2,
            guidance_scale=4.5,  # CFG: both branches batched in one forward, in sampling and in training
            **WAN,
        )
    assert {"to_q", "to_out.0"} <= set(trainer.adapter.denoiser.peft_config["default"].target_modules)
    before = {n: p.detach().clone() for n, p in trainer.adapter.denoiser.named_parameters() if p.requires_grad}
    trainer.train()
    # The image reward saw every frame of every video: 8 videos of 5 frames per round.
    assert len(seen[0]) == 8 * FRAMES and seen[0][0].size == (32, 32)
    for key in ("log_ratio_mean", "log_ratio_std", "clip_frac_high", "clip_frac_low"):
        assert all(v == 0.0 for v in logged(trainer, key)), key
    assert logged(trainer, "rewards/video_mean_record_blueness/mean")
    assert all(np.isfinite(logged(trainer, "loss")))
    after = dict(trainer.adapter.denoiser.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)

    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_reward"])
    grid = Image.open(tmp_path / "eval_images" / f"step-{trainer.state.global_step:06d}.png")
    assert grid.size == (FRAMES * 32, 3 * 32)  # one frame strip per video, one video per row


def test_wan_lora_loads_with_wan_pipeline_and_changes_output(tiny_wan_pipeline_dir, prompts, tmp_path):
    trainer = make_trainer(
        tiny_wan_pipeline_dir, [video_blueness()], prompts, tmp_path / "run", max_steps=4, guidance_scale=4.5, **WAN
    )
    trainer.train()
    trainer.save_model()
    sample = dict(
        height=32, width=32, num_frames=FRAMES, num_inference_steps=4, guidance_scale=4.5, max_sequence_length=16
    )
    trainer.pipeline.set_progress_bar_config(disable=True)
    trained = trainer.pipeline("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).frames

    fresh = WanPipeline.from_pretrained(tiny_wan_pipeline_dir)
    fresh.set_progress_bar_config(disable=True)
    base = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).frames
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fresh("prompt number 1", generator=torch.Generator().manual_seed(0), **sample).frames
    assert np.abs(reloaded - base).mean() > 1e-3
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card and ".frames[0]" in card and "| `num_frames` | `5` |" in card


def _video(*levels: int) -> list[Image.Image]:
    """A video whose frames are flat grey at `levels`."""
    return [Image.new("RGB", (4, 4), (level, level, level)) for level in levels]


def _brightness(prompts, images, **kwargs):
    return [np.asarray(image, dtype=np.float64).mean() / 255 for image in images]


def test_video_reward_reduces_frames_by_mean_or_min():
    videos = [_video(0, 255, 255, 0, 255), _video(51, 102), _video(255)]
    mean = video_reward(_brightness)(PROMPTS + ["c"], videos)
    np.testing.assert_allclose(mean, [0.6, 0.3, 1.0])
    assert video_reward(_brightness, reduce="min")(PROMPTS + ["c"], videos) == [0.0, 0.2, 1.0]
    # Every 2nd frame (0, 2, 4) of the first video; a PIL image counts as a one-frame video.
    assert video_reward(_brightness, reduce="min", frame_stride=2)(["a", "b"], [videos[0], _video(255)[0]]) == [
        0.0,
        1.0,
    ]
    with pytest.raises(ValueError, match="reduce='max'"):
        video_reward(_brightness, reduce="max")


def test_video_reward_pairs_frames_with_their_prompt_and_columns():
    calls = []

    def reward(prompts, images, label, trainer_state=None, **kwargs):
        calls.append((prompts, label, trainer_state))
        # None (not applicable) for dark frames: they are left out of the video's score.
        return [None if image.getpixel((0, 0))[0] < 100 else float(lab) for image, lab in zip(images, label)]

    lifted = video_reward(reward, name="labelled")
    scores = lifted(["p0", "p1"], [_video(0, 200), _video(0, 0)], label=[7, 9], trainer_state="state")
    assert scores == [7.0, None]  # a video with no scored frame is None, like an image the reward skips
    assert calls == [(["p0", "p0", "p1", "p1"], [7, 7, 9, 9], "state")]
    assert lifted.__name__ == "labelled"


def test_video_reward_takes_builtin_names_and_forwards_placement():
    lifted = video_reward("jpeg_compressibility", reduce="min")
    assert lifted.__name__ == "video_min_jpeg_compressibility"
    assert len(lifted(["a"], [_video(0, 128)])) == 1
    model_reward = resolve_reward_func("pickscore")  # built, not loaded: loading waits for the first call
    assert video_reward(model_reward).place == model_reward.place


def test_video_ocr_is_a_builtin_name():
    pytest.importorskip("rapidocr")
    assert resolve_reward_func("video_ocr").__name__ == "video_ocr"


def test_grid_shows_videos_as_frame_strips():
    grid = make_grid([_video(0, 255, 0), _video(255, 255, 255)])
    assert grid.size == (3 * 4, 2 * 4)
    assert grid.getpixel((5, 1)) == (255, 255, 255) and grid.getpixel((1, 1)) == (0, 0, 0)
    long = make_grid([_video(*range(0, 33 * 7, 7))])  # 33 frames: at most 8, first and last kept
    assert long.size == (8 * 4, 4) and long.getpixel((0, 0))[0] == 0 and long.getpixel((31, 0))[0] == 224
