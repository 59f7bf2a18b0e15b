"""`trl-guard grpo`: train a diffusion pipeline with GRPO-Guard (or a baseline) from a YAML recipe and/or flags.

    trl-guard grpo --config recipe.yaml
    accelerate launch -m trl_guard.scripts.grpo --config recipe.yaml --learning_rate 2e-4

Arguments are TRL's: script arguments (`dataset_name`, `dataset_train_split`, `reward_funcs`, ...), `GuardConfig`
and TRL's `ModelConfig` (`model_name_or_path`, `use_peft`, `lora_r`, `lora_alpha`, `lora_target_modules`, ...).
Command-line flags override the YAML. Set `lora_dropout: 0.0` (ModelConfig's default is 0.05): with dropout the
first update after sampling is no longer exactly on-policy.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ..config import GuardConfig

_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class GuardScriptArguments(ScriptArguments):
    """Script arguments of `trl-guard grpo`.

    Args:
        dataset_name (`str`):
            A Hub dataset id, a local dataset folder, or a prompt file (`.txt` with one prompt per line, `.json`,
            `.jsonl`, `.csv`, `.parquet` with a `prompt` column).
        reward_funcs (`list[str]`):
            Built-in reward names or dotted import paths (`my_package.rewards.my_reward`).
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Hub id, local folder or prompt file."})
    reward_funcs: list[str] = field(default_factory=list, metadata={"help": "Reward names or dotted paths."})


def load_prompts(name: str, split: str = "train", config: str | None = None):
    """Load a prompt dataset from the Hub, a local folder or a file; a `.txt` file's lines become `prompt`."""
    from datasets import load_dataset

    extension = os.path.splitext(name)[1].lower()
    looks_local = os.path.sep in name or name.startswith(".") or extension in _FILE_BUILDERS
    if looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"dataset_name={name!r} does not exist. Give an existing file or folder, or a Hub id.")
    if os.path.isfile(name):
        if extension not in _FILE_BUILDERS:
            raise ValueError(f"dataset_name={name!r}: unsupported file type; use one of {sorted(_FILE_BUILDERS)}.")
        dataset = load_dataset(_FILE_BUILDERS[extension], data_files=name, split="train")
    else:
        dataset = load_dataset(name, config, split=split)
    if "prompt" not in dataset.column_names and "text" in dataset.column_names:
        dataset = dataset.rename_column("text", "prompt")
    return dataset


def check_recipe_keys(argv: list[str], dataclass_types: tuple) -> None:
    """Refuse a YAML recipe with keys no argument class knows, before any of them is built: a typo such as
    `num_generation: 2` otherwise surfaces as another field's error (the default it left in place)."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    import difflib

    import yaml

    with open(argv[argv.index("--config") + 1]) as f:
        recipe = yaml.safe_load(f) or {}
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(key, known, n=1))
            else repr(key)
            for key in unknown
        ]
        raise ValueError(f"Unknown keys in {argv[argv.index('--config') + 1]}: {', '.join(hints)}.")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    types = (GuardScriptArguments, GuardConfig, ModelConfig)
    check_recipe_keys(argv, types)
    parser = TrlParser(types, prog="trl-guard grpo")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if not script_args.dataset_name:
        parser.error("dataset_name is required (a Hub id, a local folder or a prompt file).")
    if not script_args.reward_funcs:
        parser.error("reward_funcs is required: at least one built-in reward name or dotted import path.")
    if not model_args.model_name_or_path:
        parser.error("model_name_or_path is required (a Hub id or a local pipeline folder).")

    from ..trainer import GuardGRPODiffusionTrainer

    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        peft_config.task_type = None  # a diffusion transformer is no causal LM: no PEFT task head applies
    train_dataset = load_prompts(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    trainer = GuardGRPODiffusionTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
