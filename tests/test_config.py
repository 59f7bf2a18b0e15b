import pytest
from conftest import blueness
from helpers import tiny_config
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
    assert entries["log_timestep_grad_norm"].endswith(
        "the mean of the processes' norms, each of the gradient of its own samples."
    )


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


def test_generation_batch_size_follows_trls_either_or_rule(tmp_path):
    by_steps = tiny_config(tmp_path, per_device_train_batch_size=8, steps_per_generation=3)
    assert by_steps.generation_batch_size == 24
    by_size = tiny_config(tmp_path, per_device_train_batch_size=8, steps_per_generation=None, generation_batch_size=32)
    assert by_size.steps_per_generation == 4
    neither = tiny_config(tmp_path, steps_per_generation=None, gradient_accumulation_steps=2)
    assert (neither.steps_per_generation, neither.generation_batch_size) == (2, 16)
    with pytest.raises(ValueError, match="generation_batch_size=32 and steps_per_generation=2 are both set"):
        tiny_config(tmp_path, generation_batch_size=32, steps_per_generation=2)
    with pytest.raises(ValueError, match="generation_batch_size=12 must be a positive multiple of the global micro"):
        tiny_config(tmp_path, steps_per_generation=None, generation_batch_size=12)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(auto_find_batch_size=True), "auto_find_batch_size=True is not supported.*prompt groups"),
        (
            dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps"),
            "load_best_model_at_end=True is not supported.*OverOptimizationCallback",
        ),
        (dict(fp16=True), "fp16=True is not supported.*bf16=True"),
        (dict(learning_rate=-1e-4), "learning_rate=-0.0001 must be >= 0"),
        (dict(noise_schedule="cps", num_inference_steps=1), "num_inference_steps=1 with noise_schedule='cps'"),
    ],
)
def test_settings_the_trainer_cannot_honour_are_refused_by_name(tmp_path, fields, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(tmp_path, **fields)


def test_shuffle_dataset_and_each_epochs_order_depend_on_the_epoch_alone(tiny_pipeline, prompts, tmp_path):
    from helpers import make_trainer

    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path)
    sampler = trainer._get_train_sampler()

    def epoch_order(epoch):
        sampler.set_epoch(epoch)
        return list(sampler)

    first, second = epoch_order(0), epoch_order(1)
    assert first != second and epoch_order(0) == first  # any epoch's order again, as after a resume
    trainer.args.shuffle_dataset = False
    unshuffled = list(trainer._get_train_sampler())
    assert unshuffled[:: 4 * 2 * 4][:2] == [0, 4]  # prompts in dataset order: 4 per round, each 4x, 2 steps


def test_height_that_the_vae_cannot_take_is_refused_before_loading(tiny_pipeline_dir, prompts, tmp_path, monkeypatch):
    from helpers import make_trainer

    import trl_guard.preflight

    monkeypatch.setattr(trl_guard.preflight, "load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="height=33 does not fit StableDiffusion3Pipeline.*multiples of 2 pixels"):
        make_trainer(tiny_pipeline_dir, [blueness], prompts, tmp_path, height=33)


def test_the_readme_example_config_is_valid_and_off_policy():
    """The README's Python example builds its GuardConfig as written (bf16 aside, which needs a GPU) with whole prompt
    groups, and takes two optimizer steps per round, so that its clipping acts."""
    import ast
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    call = next(
        node
        for node in ast.walk(ast.parse(block))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "GuardConfig"
    )
    fields = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert fields.pop("bf16") is True
    config = GuardConfig(**fields, report_to="none")
    assert config.generation_batch_size % config.num_generations == 0
    assert config.steps_per_generation > config.gradient_accumulation_steps
    prompts = ast.literal_eval(
        next(
            n.value
            for n in ast.parse(block).body
            if getattr(n, "targets", [None])[0] and getattr(n.targets[0], "id", None) == "prompts"
        )
    )
    assert len(prompts) >= config.generation_batch_size // config.num_generations


@pytest.mark.parametrize(
    ("environment", "named", "on_gpus_only"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported", False),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP1 is not supported .*fsdp_version: 2", True),
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP1 is not supported", True),  # accelerate's default version is 1
    ],
)
def test_a_deepspeed_or_fsdp1_launch_is_refused_by_the_config(environment, named, on_gpus_only, monkeypatch, tmp_path):
    """`accelerate launch` tells its setup in the environment: the config refuses a DeepSpeed launch, and on GPUs an
    FSDP1 one (and so FSDP1's CPU offload), before the trainer loads any weight. On CPUs accelerate ignores an FSDP
    config and runs DDP, which passes; so does an FSDP2 launch."""
    import torch

    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    if on_gpus_only:
        assert tiny_config(tmp_path).output_dir == str(tmp_path)  # this machine has no GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=f"this accelerate launch: {named}"):
        tiny_config(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert tiny_config(tmp_path).output_dir == str(tmp_path)
