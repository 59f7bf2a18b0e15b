import pytest
from transformers import HfArgumentParser

from trl_guard import GuardConfig


def config(**kwargs):
    kwargs.setdefault("output_dir", "unused")
    kwargs.setdefault("report_to", "none")
    return GuardConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("loss_type", "ppo"),
        ("noise_schedule", "ddpm"),
        ("scale_rewards", "global"),
        ("dance_weighting", "both"),
        ("num_generations", 1),
        ("epsilon", 0.0),
        ("epsilon", -1e-4),
        ("timestep_fraction", 0.0),
        ("timestep_fraction", 1.5),
        ("num_inference_steps", 0),
        ("noise_level", 0.0),
        ("beta", -0.1),
    ],
)
def test_bad_fields_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        config(**{field: value})


def test_generation_batch_must_hold_whole_groups():
    with pytest.raises(ValueError, match="num_generations"):
        config(per_device_train_batch_size=6, num_generations=4)
    ok = config(per_device_train_batch_size=6, num_generations=4, steps_per_generation=2)
    assert ok.generation_batch_size == 12


def test_defaults_follow_the_papers():
    assert config().loss_type == "grpo_guard"
    assert config().epsilon == 2e-6
    assert config(loss_type="flow_grpo").epsilon == 1e-4
    assert config(loss_type="flow_grpo", epsilon=3e-4).epsilon == 3e-4
    assert config().beta == 0.0
    assert config(gradient_accumulation_steps=3).steps_per_generation == 3


def test_parses_from_command_line_and_yaml(tmp_path):
    parser = HfArgumentParser(GuardConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--loss_type",
            "flow_grpo",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--model_init_kwargs",
            '{"torch_dtype": "float32"}',
            "--report_to",
            "none",
        ]
    )
    assert args.loss_type == "flow_grpo" and args.num_generations == 4
    assert args.model_init_kwargs == {"torch_dtype": "float32"}

    from trl import TrlParser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path}\nloss_type: ratio_norm\nnum_generations: 4\nper_device_train_batch_size: 8\n"
        "noise_schedule: dance_grpo\nreport_to: none\n"
    )
    (args,) = TrlParser((GuardConfig,)).parse_args_and_config(["--config", str(recipe), "--num_generations", "2"])
    assert args.loss_type == "ratio_norm" and args.noise_schedule == "dance_grpo"
    assert args.num_generations == 2  # the command line overrides the YAML
