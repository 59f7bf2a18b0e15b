"""Issue 32, part A: config and YAML-recipe values that used to pass the checks and fail (or silently do something
else) after the pipeline was loaded. Each is now refused, or read as meant, with a message that names the field."""

import dataclasses
import math

import pytest
from helpers import tiny_config

from trl_guard import GuardConfig
from trl_guard.scripts.grpo import load_eval_prompts, load_prompts, parse_arguments


def flags(tmp_path, *extra):
    """The flags a run needs, without `--use_peft`; nothing here loads a model, so the model id need not exist."""
    return [
        "--model_name_or_path", "some/model", "--dataset_name", str(tmp_path / "p.txt"),
        "--reward_funcs", "jpeg_compressibility", "--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra,
    ]  # fmt: skip


def with_recipe(tmp_path, text, *extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return flags(tmp_path, "--config", str(recipe), *extra)


# ---- 4. LoRA fields without use_peft ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "named"),
    [
        ("recipe", "lora_r=8"),
        ("flag", "lora_alpha=8"),
        ("target_modules", "lora_target_modules=\\['attn.to_q', 'attn.to_k'\\]"),
    ],
)
def test_lora_fields_without_use_peft_are_refused(where, named, tmp_path):
    if where == "flag":
        argv = flags(tmp_path, "--lora_alpha", "8")
    else:
        argv = with_recipe(
            tmp_path, "lora_r: 8\n" if where == "recipe" else "lora_target_modules: [attn.to_q, attn.to_k]\n"
        )
    with pytest.raises(ValueError, match=f"{named}.*use_peft") as error:
        parse_arguments(argv)
    assert "use_peft: true" in str(error.value) and "transformer/" in str(error.value)
    # the same fields with use_peft train a LoRA, and LoRA fields left at the parser's defaults (lora_dropout: 0.0
    # is trl-guard's default) train in full
    parse_arguments([*argv, "--use_peft"])
    _, _, model_args = parse_arguments(with_recipe(tmp_path, "use_peft: false\nlora_dropout: 0.0\nlora_r: 16\n"))
    assert not model_args.use_peft


def test_a_lora_recipe_turned_into_a_full_fine_tune_on_purpose_warns(tmp_path):
    """`--use_peft false` over a LoRA recipe is a choice, not an omission: it trains in full, saying the LoRA fields
    are ignored."""
    argv = with_recipe(tmp_path, "use_peft: true\nlora_r: 8\n", "--use_peft", "false")
    with pytest.warns(UserWarning, match="lora_r=8: LoRA settings, but use_peft is false"):
        _, _, model_args = parse_arguments(argv)
    assert not model_args.use_peft


# ---- 5 and 6. Types of every field ---------------------------------------------------------------------------------


def test_integral_floats_are_read_as_ints():
    config = GuardConfig(
        output_dir="unused", report_to="none", num_generations=4.0, num_inference_steps=3.0,
        per_device_train_batch_size=4.0, sde_window_range=[0.0, 1.0],
    )  # fmt: skip
    values = (config.num_generations, config.num_inference_steps, config.per_device_train_batch_size)
    assert values == (4, 3, 4) and all(type(value) is int for value in values)
    assert config.generation_batch_size == 4 and [type(v) for v in config.sde_window_range] == [int, int]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_generations=4.5), "num_generations=4.5 must be an int"),
        (dict(per_device_train_batch_size=4.5), "per_device_train_batch_size=4.5 must be an int"),
        (dict(learning_rate=[0.1, 0.2]), r"learning_rate=\[0.1, 0.2\] must be a float, not list"),
        (dict(learning_rate="1e-4"), r"learning_rate='1e-4' must be a float, not str .*write 1.0e-4"),
        (dict(num_inference_steps=True), "num_inference_steps=True must be an int, not bool"),
        (dict(init_same_noise="yes"), "init_same_noise='yes' must be a bool"),
        (dict(negative_prompt=3), "negative_prompt=3 must be a str, not int"),
        (dict(epsilon="small"), "epsilon='small' must be a float or None"),
        (dict(reward_weights=[1.0, "1e-1"]), r"reward_weights=\[1.0, '1e-1'\] must be a list of float"),
        (dict(reward_weights=1.0), r"reward_weights=1.0 must be a list of float or None, not float"),
        (dict(sde_window_size=2, sde_window_range=[0, 2.5]), r"sde_window_range=\[0, 2.5\] must be a list of int"),
        (dict(max_steps=2.5), "max_steps=2.5 must be an int"),  # an inherited TrainingArguments field
    ],
)
def test_values_of_the_wrong_type_are_refused_naming_the_field(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **fields)


def test_recipe_values_are_type_checked_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match=r"learning_rate=\[0.1, 0.2\] must be a float, not list"):
        parse_arguments(with_recipe(tmp_path, "learning_rate: [0.1, 0.2]\n"))
    with pytest.raises(ValueError, match="num_generations=4.5 must be an int"):
        parse_arguments(with_recipe(tmp_path, "num_generations: 4.5\nper_device_train_batch_size: 9\n"))
    with pytest.raises(ValueError, match="lora_alpha=16.5 must be an int"):  # ModelConfig's fields
        parse_arguments(with_recipe(tmp_path, "use_peft: true\nlora_alpha: 16.5\n"))
    with pytest.raises(ValueError, match=r"dataset_test_split=\['a', 'b'\] must be a str"):  # the script's fields
        parse_arguments(with_recipe(tmp_path, "dataset_test_split: [a, b]\n"))
    # PyYAML reads 1e-4 (no dot) as a string; the parser's float conversion of recipe values still applies
    recipe = "learning_rate: 1e-4\nnum_generations: 4.0\nnum_inference_steps: 3.0\nper_device_train_batch_size: 4.0\n"
    _, config, model_args = parse_arguments(with_recipe(tmp_path, recipe + "use_peft: true\nlora_r: 4.0\n"))
    assert config.learning_rate == 1e-4 and (config.num_generations, config.num_inference_steps) == (4, 3)
    assert type(config.per_device_train_batch_size) is int and type(model_args.lora_r) is int


# ---- 7. Empty prompt files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n"])
@pytest.mark.parametrize("extension", [".txt", ".jsonl", ".csv"])
def test_an_empty_prompt_file_is_named(content, extension, tmp_path):
    from trl_guard.scripts.grpo import GuardScriptArguments

    empty = tmp_path / f"empty{extension}"
    empty.write_text(content)
    with pytest.raises(ValueError, match=f"dataset_name='{empty}' has no prompts"):
        load_prompts(str(empty))
    script_args = GuardScriptArguments(dataset_name="unused", reward_funcs=["x"], eval_dataset_name=str(empty))
    with pytest.raises(ValueError, match=f"eval_dataset_name='{empty}' has no prompts"):
        load_eval_prompts(script_args, evaluates=True)


# ---- 8. Non-finite floats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(loss_type="nft", nft_beta=math.nan),
        dict(loss_type="awm", awm_lagged_weight=math.nan),
        dict(loss_type="awm", awm_ghuber_power=math.inf),
        dict(beta=math.nan),
        dict(guidance_scale=math.inf),
        dict(epsilon=math.nan),
        dict(learning_rate=math.inf),
        dict(weight_decay=math.nan),
        dict(max_grad_norm=math.nan),
        dict(adam_beta1=math.nan),
        dict(adam_epsilon=math.inf),
        dict(reward_weights=[1.0, math.nan]),
    ],
    ids=lambda fields: next(reversed(fields)),
)
def test_non_finite_floats_are_refused(fields, tmp_path):
    name = next(reversed(fields))
    with pytest.raises(ValueError, match=f"{name}=.*must be finite"):
        tiny_config(tmp_path, **fields)


# ---- 10. AWM options AWM does not read -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(awm_weighting="uniform", awm_ghuber_power=0.5), "does not read awm_ghuber_power=0.5"),
        (dict(awm_weighting="huber", awm_ghuber_power=0.5), "awm_weighting='huber'.*does not read awm_ghuber_power"),
        (dict(awm_lagged_weight=0, lagged_decay_schedule="nft_ocr"), "does not read lagged_decay_schedule='nft_ocr'"),
    ],
)
def test_awm_options_awm_will_not_read_are_refused(fields, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        tiny_config(tmp_path, loss_type="awm", **fields)
    # the same options where AWM reads them
    tiny_config(tmp_path, loss_type="awm", awm_ghuber_power=0.5)
    tiny_config(tmp_path, loss_type="awm", lagged_decay_schedule="nft_ocr")
    tiny_config(tmp_path, loss_type="awm", awm_lagged_weight=0, awm_weighting="uniform")


# ---- LATE. Choices of every field ------------------------------------------------------------------------------


def test_every_field_with_choices_refuses_an_unknown_value(tmp_path):
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    with_choices = [f for f in dataclasses.fields(GuardConfig) if "choices" in f.metadata and f.name not in inherited]
    assert {"lagged_decay_schedule", "awm_weighting", "loss_type"} <= {f.name for f in with_choices}
    accepted = []
    for f in with_choices:
        try:
            tiny_config(tmp_path, **{"loss_type": "awm", f.name: "bogus"})
        except ValueError as error:
            assert f"{f.name}='bogus' is unknown; use one of" in str(error), str(error)
        else:
            accepted.append(f.name)
    assert not accepted
    with pytest.raises(ValueError, match=r"awm_weighting='Ghuber' is unknown; use one of \('uniform'"):
        tiny_config(tmp_path, loss_type="awm", awm_weighting="Ghuber")


# ---- MISLEADING ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [{"zero_optimization": {"stage": 2}}, "ds_config.json"])
def test_deepspeed_is_refused_naming_fsdp2(value, tmp_path):
    with pytest.raises(ValueError, match="deepspeed=.*DeepSpeed is not supported.*FSDP2") as error:
        tiny_config(tmp_path, deepspeed=value)
    assert "examples/accelerate_configs/fsdp2.yaml" in str(error.value)


def test_deepspeed_in_a_recipe_is_refused_naming_fsdp2(tmp_path):
    with pytest.raises(ValueError, match="DeepSpeed is not supported.*FSDP2"):
        parse_arguments(with_recipe(tmp_path, "deepspeed:\n  zero_optimization:\n    stage: 2\n"))


def test_lora_target_modules_must_be_a_list(tmp_path):
    with pytest.raises(ValueError, match=r"lora_target_modules='attn.to_q' is a single string.*\[attn.to_q\]"):
        parse_arguments(with_recipe(tmp_path, "use_peft: true\nlora_target_modules: attn.to_q\n"))
    # a one-element list stays a list (TRL's ModelConfig turns it into its string, which peft reads as a regex)
    for argv in (
        with_recipe(tmp_path, "use_peft: true\nlora_target_modules: [attn.to_q]\n"),
        flags(tmp_path, "--use_peft", "--lora_target_modules", "attn.to_q"),
    ):
        _, _, model_args = parse_arguments(argv)
        assert model_args.lora_target_modules == ["attn.to_q"]
    # the strings peft means as strings: every linear layer, and a regular expression
    for value in ("all-linear", r".*attn\.to_[qkv]"):
        _, _, model_args = parse_arguments(with_recipe(tmp_path, f"use_peft: true\nlora_target_modules: '{value}'\n"))
        assert model_args.lora_target_modules == value


def test_awm_with_an_sde_window_names_the_window_size(tmp_path):
    with pytest.raises(ValueError, match="loss_type='awm'.*does not read sde_window_size=2"):
        tiny_config(tmp_path, loss_type="awm", sde_window_size=2, num_inference_steps=3)
