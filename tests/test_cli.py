"""`trl-guard grpo` trains from a YAML recipe, with flags overriding it."""

import json
import os
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trl_guard.cli import main
from trl_guard.scripts.grpo import load_prompts
from trl_guard.scripts.grpo import main as grpo_main


def write_recipe(tmp_path, pipeline_dir, prompts_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
model_name_or_path: {pipeline_dir}
model_init_kwargs: {{"text_encoder_3": null, "tokenizer_3": null}}
dataset_name: {prompts_file}
reward_funcs: [jpeg_compressibility]
output_dir: {tmp_path / "out"}
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
loss_type: grpo_guard
num_generations: 4
per_device_train_batch_size: 8
max_steps: 5
height: 32
width: 32
num_inference_steps: 3
max_sequence_length: 16
guidance_scale: 1.0
report_to: none
save_strategy: "no"
disable_tqdm: true
"""
    )
    return recipe


def test_grpo_command_trains_from_a_recipe(tiny_pipeline_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(f"a drawing number {i}" for i in range(6)))
    recipe = write_recipe(tmp_path, tiny_pipeline_dir, prompts_file)
    main(["grpo", "--config", str(recipe), "--max_steps", "2"])  # the flag overrides the YAML's 5
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("lora_A" in key for key in lora)
    state = (tmp_path / "out" / "guard_config.json").read_text()
    assert '"max_steps": 2' in state and '"loss_type": "grpo_guard"' in state


def test_same_recipe_trains_flux_by_changing_model_and_schedule(tiny_pipeline_dir, tiny_flux_pipeline_dir, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(f"a drawing number {i}" for i in range(6)))
    recipe = write_recipe(tmp_path, tiny_pipeline_dir, prompts_file)
    main(
        [
            "grpo",
            "--config",
            str(recipe),
            "--max_steps",
            "1",
            "--model_name_or_path",
            tiny_flux_pipeline_dir,
            "--noise_schedule",
            "dance_grpo",
        ]
    )
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("single_transformer_blocks" in key for key in lora)  # a FLUX-only module


def test_missing_local_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing/prompts.txt"):
        load_prompts(str(tmp_path / "missing" / "prompts.txt"))


def test_unknown_yaml_key_is_an_error(tiny_pipeline_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\na dog\n")
    recipe = write_recipe(tmp_path, tiny_pipeline_dir, prompts_file)
    recipe.write_text(recipe.read_text() + "learnig_rate: 0.1\n")
    with pytest.raises((SystemExit, ValueError)) as error:
        main(["grpo", "--config", str(recipe)])
    assert "learnig_rate" in str(error.value) + capsys.readouterr().err


def test_yaml_typo_is_named_before_other_fields_are_checked(tmp_path):
    recipe = write_recipe(tmp_path, str(tmp_path / "no-model"), tmp_path / "prompts.txt")
    # num_generation (no s) would leave num_generations at 8, which 8 images per round cannot hold
    recipe.write_text(recipe.read_text().replace("num_generations: 4", "num_generation: 4"))
    with pytest.raises(ValueError, match="'num_generation' \\(did you mean 'num_generations'\\?\\)"):
        main(["grpo", "--config", str(recipe)])


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml")))
def test_example_recipes_parse(recipe):
    from trl import ModelConfig, TrlParser

    from trl_guard import GuardConfig
    from trl_guard.scripts.grpo import GuardScriptArguments

    parser = TrlParser((GuardScriptArguments, GuardConfig, ModelConfig))
    # bf16 needs the GPU the recipes are written for; everything else is checked as on that machine.
    script_args, config, model_args = parser.parse_args_and_config(["--config", str(recipe), "--bf16", "false"])
    assert script_args.reward_funcs and model_args.model_name_or_path
    assert model_args.use_peft != recipe.name.startswith("full_")  # full_*: the recipes that train in full
    assert config.generation_batch_size % config.num_generations == 0
    if recipe.name.startswith("sd35m"):  # evaluated on the official test prompts with gold rewards
        assert script_args.eval_dataset_name.endswith(("_test.txt", "_test.jsonl")) and script_args.gold_reward_funcs
        assert config.eval_strategy == "steps" and not set(script_args.gold_reward_funcs) & set(
            script_args.reward_funcs
        )


def prompt_files(tmp_path):
    train, evaluation = tmp_path / "prompts.txt", tmp_path / "eval_prompts.txt"
    train.write_text("\n".join(f"a drawing number {i}" for i in range(6)))
    evaluation.write_text("a red square\na blue circle\n")
    return train, evaluation


def test_killed_run_resumes_from_the_command_line_and_trains_only_the_rest(tiny_pipeline_dir, tmp_path, monkeypatch):
    import subprocess
    import sys
    from collections import Counter

    train, _ = prompt_files(tmp_path)
    recipe = write_recipe(tmp_path, tiny_pipeline_dir, train)
    flags = ["--config", str(recipe), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    flags += ["--reward_funcs", "cli_rewards.step_recording_blueness"]
    tests_dir = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=tests_dir, REWARD_LOG=str(tmp_path / "killed.log"), KILL_AT_STEP="3")
    killed = subprocess.run([sys.executable, "-m", "trl_guard.scripts.grpo", *flags], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]  # SIGKILLed while scoring step 4's round
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2"]
    first = Counter(int(line) for line in (tmp_path / "killed.log").read_text().split())

    # a fresh start over the killed run's checkpoint refuses, before the model loads
    with pytest.raises(ValueError, match="already holds checkpoints"):
        grpo_main([*flags, "--model_name_or_path", str(tmp_path / "no-such-model")])

    monkeypatch.setenv("REWARD_LOG", str(tmp_path / "resumed.log"))
    monkeypatch.delenv("KILL_AT_STEP", raising=False)
    trainer = grpo_main([*flags, "--resume_from_checkpoint", "true"])
    resumed = Counter(int(line) for line in (tmp_path / "resumed.log").read_text().split())
    assert trainer.state.global_step == 4
    assert resumed == {2: first[0], 3: first[0]}  # only steps 3 and 4, each scored as often as step 1 was
    assert (tmp_path / "out" / "checkpoint-4").is_dir()


def test_resume_under_another_loss_type_is_refused_from_the_command_line(tiny_pipeline_dir, tmp_path):
    train, _ = prompt_files(tmp_path)
    recipe = write_recipe(tmp_path, tiny_pipeline_dir, train)
    flags = ["--config", str(recipe), "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]
    grpo_main(flags)
    with pytest.raises(ValueError, match="loss_type: 'grpo_guard' in the checkpoint, 'flow_grpo' now"):
        grpo_main([*flags, "--max_steps", "2", "--resume_from_checkpoint", "true", "--loss_type", "flow_grpo"])


def test_command_line_run_evaluates_with_gold_rewards_and_the_alarm(tiny_pipeline_dir, tmp_path):
    from trl_guard import OverOptimizationCallback

    train, evaluation = prompt_files(tmp_path)
    recipe = write_recipe(tmp_path, tiny_pipeline_dir, train)
    flags = ["--config", str(recipe), "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1"]
    flags += ["--eval_dataset_name", str(evaluation), "--eval_num_inference_steps", "2"]
    flags += ["--gold_reward_funcs", "jpeg_incompressibility", "conftest.blueness"]
    flags += ["--overoptimization_gold_metric", "gold/blueness", "--overoptimization_patience", "3"]
    trainer = grpo_main(flags)
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    evals = [entry for entry in history if "eval_reward" in entry]
    assert [entry["step"] for entry in evals] == [1, 2]
    assert all(
        0 <= entry["eval_gold/blueness"] <= 1 and entry["eval_gold/jpeg_incompressibility"] > 0 for entry in evals
    )
    alarm = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, OverOptimizationCallback))
    assert (alarm.gold_metric, alarm.patience) == ("eval_gold/blueness", 3)
    assert alarm.best_gold == max(entry["eval_gold/blueness"] for entry in evals)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval_strategy", "steps", "--eval_steps", "1"], "no eval prompts: dataset_name=.*is a file"),
        (["--gold_reward_funcs", "jpeg_incompressibility"], "gold_reward_funcs and overoptimization_gold_metric act"),
    ],
)
def test_evaluation_settings_without_what_they_need(extra, message, tmp_path, capsys):
    train, _ = prompt_files(tmp_path)
    recipe = write_recipe(tmp_path, str(tmp_path / "no-such-model"), train)
    with pytest.raises((SystemExit, ValueError)) as error:
        grpo_main(["--config", str(recipe), *extra])
    assert re.search(message, str(error.value) + capsys.readouterr().err)


def test_help_lists_the_reward_forms():
    from trl import ModelConfig, TrlParser

    from trl_guard import GuardConfig
    from trl_guard.rewards import BUILTIN_REWARDS
    from trl_guard.scripts.grpo import GuardScriptArguments

    parser = TrlParser((GuardScriptArguments, GuardConfig, ModelConfig))
    text = " ".join(parser.format_help().split())  # renders: no stray % in any help text
    reward_help = next(a.help for a in parser._actions if a.dest == "reward_funcs")
    assert all(f"`{name}`" in reward_help for name in BUILTIN_REWARDS)
    assert "http://" in reward_help and "dotted import path" in reward_help and "--reward_funcs" in text


@pytest.mark.parametrize(
    ("builder", "family_flags", "reward"),
    [
        ("build_tiny_qwenimage_pipeline", ["--true_cfg_scale", "1.0"], "jpeg_compressibility"),
        (
            "build_tiny_wan_pipeline",
            ["--num_frames", "5", "--max_sequence_length", "16"],
            "cli_rewards.video_blueness",
        ),
    ],
)
def test_more_families_train_from_the_command_line(builder, family_flags, reward, tmp_path):
    """Only the model folder and the family's own fields change: the recipe, the script and the trainer are shared."""
    import trl_guard.testing

    model_dir = tmp_path / "model"
    getattr(trl_guard.testing, builder)(seed=0).save_pretrained(model_dir)
    train, _ = prompt_files(tmp_path)
    recipe = write_recipe(tmp_path, str(model_dir), train)
    recipe.write_text(
        recipe.read_text().replace('model_init_kwargs: {"text_encoder_3": null, "tokenizer_3": null}\n', "")
    )
    trainer = grpo_main(["--config", str(recipe), "--max_steps", "1", "--reward_funcs", reward, *family_flags])
    assert trainer.state.global_step == 1 and type(trainer.pipeline).__name__ in (
        "QwenImagePipeline",
        "WanPipeline",
    )
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("lora_A" in key for key in lora)


# `trl-guard grpo --help` and the recipe, as a newcomer meets them.


def option_position(text, name):
    """Where the help line of option `--name` starts; -1 when it is not listed."""
    match = re.search(rf"\n  --{name}\b", text)
    return match.start() if match else -1


def test_grpo_help_leads_with_an_example_our_fields_and_config(capsys):
    import dataclasses

    from transformers import TrainingArguments
    from trl import ModelConfig

    from trl_guard import GuardConfig

    with pytest.raises(SystemExit) as error:
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    assert error.value.code == 0
    assert (
        out.index("example:") < out.index("trl-guard grpo --config examples/recipes/") < option_position(out, "config")
    )
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    first_guard = next(f.name for f in dataclasses.fields(GuardConfig) if f.name not in inherited)
    first_plain = dataclasses.fields(TrainingArguments)[0].name
    first_lora = next(f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("lora_"))
    positions = [option_position(out, name) for name in ("config", "model_name_or_path", "reward_funcs", first_guard)]
    assert -1 not in positions and positions == sorted(positions)
    assert option_position(out, first_guard) < option_position(out, first_lora) < option_position(out, first_plain)
    assert out.startswith("usage: trl-guard grpo [--config RECIPE.yaml]")  # not 170 lines of every option


def test_help_order_changes_nothing_that_is_parsed(tmp_path):
    """The regrouped parser reads a recipe and flags as TRL's plain parser does."""
    from trl import ModelConfig, TrlParser

    from trl_guard import GuardConfig
    from trl_guard.scripts.grpo import GuardScriptArguments, build_parser

    recipe = write_recipe(tmp_path, "some/model", tmp_path / "prompts.txt")
    argv = ["--config", str(recipe), "--learning_rate", "3e-4", "--loss_type", "flow_grpo"]
    ours = build_parser().parse_args_and_config(list(argv))
    plain = TrlParser((GuardScriptArguments, GuardConfig, ModelConfig)).parse_args_and_config(list(argv))
    assert [dataclasses_dict(a) for a in ours] == [dataclasses_dict(a) for a in plain]
    assert ours[1].learning_rate == 3e-4 and ours[1].loss_type == "flow_grpo" and ours[2].lora_r == 4


def dataclasses_dict(arguments):
    import dataclasses

    return {f.name: str(getattr(arguments, f.name)) for f in dataclasses.fields(arguments)}


def minimal_flags(tmp_path):
    return ["--model_name_or_path", "some/model", "--dataset_name", str(tmp_path / "p.txt")] + [
        "--reward_funcs",
        "jpeg_compressibility",
        "--output_dir",
        str(tmp_path / "out"),
        "--use_peft",
    ]


def test_lora_dropout_defaults_to_zero_and_says_why(tmp_path, recwarn):
    from trl_guard.scripts.grpo import build_parser, parse_arguments

    _, _, model_args = parse_arguments(minimal_flags(tmp_path))
    assert model_args.lora_dropout == 0.0
    assert not [w for w in recwarn if "lora_dropout" in str(w.message)]
    dropout_help = next(a.help for a in build_parser()._actions if a.dest == "lora_dropout")
    assert "defaults it to 0" in dropout_help and "off-policy" in dropout_help


@pytest.mark.parametrize("where", ["flag", "recipe"])
def test_lora_dropout_set_above_zero_is_kept_with_a_warning(where, tmp_path):
    from trl_guard.scripts.grpo import parse_arguments

    argv = minimal_flags(tmp_path)
    if where == "flag":
        argv += ["--lora_dropout", "0.05"]
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("lora_dropout: 0.05\nlora_r: 4\n")
        argv += ["--config", str(recipe)]
    with pytest.warns(UserWarning, match="lora_dropout=0.05: .*off-policy"):
        _, _, model_args = parse_arguments(argv)
    assert model_args.lora_dropout == 0.05


@pytest.mark.parametrize(
    ("content", "holds"), [("- a\n- b\n", "it holds a list"), ("hello\n", "it holds a str"), ("", "is empty")]
)
def test_a_recipe_that_is_not_a_mapping_is_refused_naming_the_file(content, holds, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    with pytest.raises(ValueError, match="mapping of field: value") as error:
        main(["grpo", "--config", str(recipe)])
    assert str(recipe) in str(error.value) and holds in str(error.value)
    assert "unhashable" not in str(error.value) and "'h'" not in str(error.value)


def test_config_forms_a_newcomer_types(tmp_path, monkeypatch):
    from trl_guard.scripts.grpo import parse_arguments

    recipe = write_recipe(tmp_path, "some/model", tmp_path / "prompts.txt")
    monkeypatch.setenv("TRL_GUARD_RECIPE_ENV", "unset")
    recipe.write_text(recipe.read_text() + "env:\n  TRL_GUARD_RECIPE_ENV: from-the-recipe\n")
    _, config, _ = parse_arguments([f"--config={recipe}"])  # the = form, and TRL's env mapping
    assert config.num_generations == 4 and os.environ["TRL_GUARD_RECIPE_ENV"] == "from-the-recipe"
    with pytest.raises(ValueError, match="--config needs a path"):
        parse_arguments(["--config"])
    with pytest.raises(FileNotFoundError, match="missing.yaml: no such file"):
        parse_arguments(["--config", str(tmp_path / "missing.yaml")])


def test_full_fine_tuning_recipe_is_the_lora_recipe_trained_in_full():
    from trl import ModelConfig, TrlParser

    from trl_guard import GuardConfig
    from trl_guard.scripts.grpo import GuardScriptArguments

    recipes = Path(__file__).parents[1] / "examples" / "recipes"

    def values(name):
        parser = TrlParser((GuardScriptArguments, GuardConfig, ModelConfig))
        parsed = parser.parse_args_and_config(["--config", str(recipes / name), "--bf16", "false"])
        return {k: v for part in parsed for k, v in vars(part).items()}

    lora, full = values("sd35m_ocr_guard.yaml"), values("full_sd35m_ocr_guard.yaml")
    differing = {k for k in lora if lora[k] != full[k] and k not in ("logging_dir", "run_name", "distributed_state")}
    assert differing == {
        "use_peft", "model_init_kwargs", "ema_decay", "learning_rate", "output_dir", "lora_r", "lora_alpha",
        "lora_dropout",
    }  # fmt: skip
    assert not full["use_peft"] and full["ema_decay"] == 0 and full["model_init_kwargs"] is None
