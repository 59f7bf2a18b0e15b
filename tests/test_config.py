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
    assert args.model_init_kwargs == {"dtype": "float32"}  # the deprecated key, renamed

    from trl import TrlParser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path}\nloss_type: ratio_norm\nnum_generations: 4\nper_device_train_batch_size: 8\n"
        "noise_schedule: dance_grpo\nreport_to: none\n"
    )
    (args,) = TrlParser((GuardConfig,)).parse_args_and_config(["--config", str(recipe), "--num_generations", "2"])
    assert args.loss_type == "ratio_norm" and args.noise_schedule == "dance_grpo"
    assert args.num_generations == 2  # the command line overrides the YAML


@pytest.mark.parametrize("cls_path", ["trl_guard.config.GuardConfig", "trl_guard.scripts.grpo.GuardScriptArguments"])
def test_command_line_help_is_the_docstring_entry(cls_path):
    import dataclasses
    import importlib

    from trl_guard.config import docstring_entries

    module, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    entries = docstring_entries(cls.__doc__)
    parents = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    helps = {action.dest: action.help for action in HfArgumentParser(cls)._actions}
    own = [f.name for f in dataclasses.fields(cls) if f.name not in parents or f.name in entries]
    assert own, "no fields of its own?"
    for field_name in own:
        assert entries.get(field_name), f"{field_name} has no docstring entry"
        assert helps[field_name].replace("%%", "%") == entries[field_name], field_name


def test_docstring_entries_are_read_whole():
    from trl_guard.config import docstring_entries

    entries = docstring_entries(GuardConfig.__doc__)
    assert entries["num_generations"] == (
        "Images sampled per prompt (the group size). The generation batch must be a multiple of it. Must be >= 2."
    )
    assert entries["log_timestep_grad_norm"].endswith("with full fine-tuning, log less often or turn it off.")


def test_an_undocumented_field_fails_at_definition():
    from dataclasses import dataclass

    from trl_guard.config import document_fields

    with pytest.raises(TypeError, match="Settings.undocumented has no entry"):

        @document_fields
        @dataclass
        class Settings:
            """Args:
            documented (`int`):
                Has an entry.
            """

            documented: int = 1
            undocumented: int = 2
