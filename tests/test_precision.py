"""The first training pass repeats the sampling forwards only when they ran in the same batch shape.

A round sampled in batches of another size than training's (`per_device_sample_batch_size`) gives forwards that differ
in the last bits, so the first pass starts off-policy by noise alone; `recompute_old_means` recomputes the old means
in the training shape before the first update and the ratio is exactly 1 again. benchmarks/precision_drift.py
measures the size of the drift per dtype (docs/launching.md, "Precision").
"""

import pytest
import torch
from conftest import blueness
from helpers import logged, make_trainer

# Every micro-batch of a round is trained before the round's only optimizer step: every one is a first pass.
ONE_UPDATE_PER_ROUND = dict(
    loss_type="flow_grpo",
    per_device_train_batch_size=2,
    steps_per_generation=4,
    gradient_accumulation_steps=4,
    max_steps=1,
)


def first_pass_log_ratios(trainer) -> list[float]:
    """Train, then every logged log-ratio statistic (per timestep and averaged), as magnitudes."""
    trainer.train()
    keys = [key for key in trainer.state.log_history[0] if "log_ratio" in key]
    return [abs(value) for key in keys for value in logged(trainer, key)]


def test_sampling_in_larger_batches_moves_the_first_pass_off_policy(tiny_pipeline, prompts, tmp_path):
    trainer = make_trainer(
        tiny_pipeline, [blueness], prompts, tmp_path, per_device_sample_batch_size=8, **ONE_UPDATE_PER_ROUND
    )
    drift = first_pass_log_ratios(trainer)
    assert max(drift) > 0  # float32, batch 8 sampled and 2 trained: the last bits differ
    assert max(drift) < 1e-4  # noise, not a policy change


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_old_means_makes_the_first_pass_exactly_on_policy(tiny_pipeline, prompts, tmp_path, dtype):
    tiny_pipeline.transformer.to(dtype)
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        tmp_path,
        per_device_sample_batch_size=8,
        recompute_old_means=True,
        **ONE_UPDATE_PER_ROUND,
    )
    ratios = first_pass_log_ratios(trainer)
    assert ratios and max(ratios) == 0.0


def test_sampling_batch_must_divide_the_round(tmp_path):
    from helpers import tiny_config

    with pytest.raises(ValueError, match="per_device_sample_batch_size=3 must divide"):
        tiny_config(tmp_path, per_device_sample_batch_size=3)


def test_recompute_old_means_is_an_sde_field(tmp_path):
    from helpers import tiny_config

    with pytest.raises(ValueError, match="recompute_old_means"):
        tiny_config(tmp_path, loss_type="nft", recompute_old_means=True)
