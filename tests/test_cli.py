"""`trl-guard grpo` trains from a YAML recipe, with flags overriding it."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from trl_guard.cli import main
from trl_guard.scripts.grpo import load_prompts


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
    assert script_args.reward_funcs and model_args.model_name_or_path and model_args.use_peft
    assert config.generation_batch_size % config.num_generations == 0
