"""The SDE window (Flow-GRPO-Fast, MixGRPO): which steps are ODE, SDE and trained; every loss type; exact resume."""

import copy

import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer, resume_mid_round, tiny_config

from trl_guard.adapters import SamplingSettings, get_adapter
from trl_guard.algorithms.sde_ratio import window
from trl_guard.losses import SDE_LOSS_TYPES
from trl_guard.rollout import sample_ode, sample_sde
from trl_guard.schedule import SDESchedule


def test_window_defaults_and_bad_ranges(tmp_path):
    assert tiny_config(tmp_path, sde_window_size=2, num_inference_steps=10).sde_window_range == [0, 5]
    assert window(tiny_config(tmp_path), 0) is None  # off by default
    for window_range, size in (([3, 4], 2), ([0, 11], 2), ([4, 2], 1), ([1], 1)):
        with pytest.raises(ValueError, match="sde_window_range=.*must be \\[start, end\\)"):
            tiny_config(tmp_path, num_inference_steps=10, sde_window_size=size, sde_window_range=window_range)
    with pytest.raises(ValueError, match="CPS's last step"):
        tiny_config(tmp_path, noise_schedule="cps", sde_window_size=1, sde_window_range=[5, 8], num_inference_steps=8)


def test_random_window_is_a_function_of_seed_and_round(tmp_path):
    config = tiny_config(tmp_path, num_inference_steps=10, sde_window_size=2, sde_window_range=[1, 7])

    starts = [window(config, r)[0] for r in range(200)]
    assert starts == [window(config, r)[0] for r in range(200)]  # again, as after a resume
    assert set(starts) == {1, 2, 3, 4, 5}  # uniform over [1, 7 - 2]
    assert window(config, 3) == range(starts[3], starts[3] + 2)
    config.seed = 1
    assert [window(config, r)[0] for r in range(200)] != starts  # and a function of the seed


def test_sliding_window_moves_then_stops(tmp_path):
    config = tiny_config(
        tmp_path, num_inference_steps=10, sde_window_size=3, sde_window_range=[0, 6], sde_window_schedule="sliding"
    )
    config.sde_window_shift_interval = 2
    assert [window(config, r)[0] for r in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]


def test_steps_outside_the_window_are_ode_steps(tiny_pipeline):
    adapter = get_adapter(tiny_pipeline)
    adapter.configure(SamplingSettings(32, 32, 1.0, max_sequence_length=16))
    embeds = adapter.encode_prompts(["a red square", "a blue circle"])
    sigmas = adapter.sigmas(6)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    rollout = sample_sde(
        adapter, embeds, None, noise, sigmas, SDESchedule(0.7), generators=generators, sde_steps=range(2, 4)
    )
    assert rollout.steps == range(2, 4) and rollout.latents.shape[1] == 3 and len(rollout.sigmas) == 3
    # before the window: the ODE from the noise; after it: the ODE from the window's last state
    torch.testing.assert_close(rollout.latents[:, 0], sample_ode(adapter, embeds, None, noise, sigmas[:3]))
    after = sample_ode(adapter, embeds, None, rollout.latents[:, -1], sigmas[4:])
    torch.testing.assert_close(rollout.final_latents, after)
    assert not torch.allclose(rollout.latents[:, 1], sample_ode(adapter, embeds, None, noise, sigmas[:4]))  # SDE
    with pytest.raises(IndexError, match="step 1 was not recorded"):
        rollout.step(1)


@pytest.mark.parametrize("noise_schedule", ["flow_grpo", "cps"])
@pytest.mark.parametrize("loss_type", SDE_LOSS_TYPES)
def test_every_loss_type_trains_only_the_window(tiny_pipeline, prompts, tmp_path, loss_type, noise_schedule):
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        loss_type=loss_type,
        noise_schedule=noise_schedule,
        num_inference_steps=6,
        sde_window_size=2,
        sde_window_range=[2, 6],
        beta=0.01,
        max_steps=4,  # two rounds of two optimizer steps
    )
    trainer.train()
    starts = logged(trainer, "sde_window_start")
    assert len(starts) == 2 and all(2 <= s <= 4 for s in starts)
    trained = {k.split("/")[1] for entry in trainer.state.log_history for k in entry if k.startswith("timestep/")}
    assert trained and trained <= {f"{i:02d}" for i in range(2, 6)}
    for entry, start in zip([e for e in trainer.state.log_history if "sde_window_start" in e], starts):
        steps = {int(k.split("/")[1]) for k in entry if k.startswith("timestep/") and k.endswith("/clip_frac_high")}
        window = set(range(int(start), int(start) + 2))
        assert steps == (window - {5} if noise_schedule == "cps" else window)  # CPS's last step has no noise
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))


def test_window_resume_in_the_middle_of_a_round_is_exact(_base_pipeline, prompts, tmp_path):
    settings = dict(sde_window_size=2, num_inference_steps=6)
    full, resumed = resume_mid_round(lambda: copy.deepcopy(_base_pipeline), [blueness], prompts, tmp_path, **settings)
    assert logged(resumed, "sde_window_start") == logged(full, "sde_window_start")
