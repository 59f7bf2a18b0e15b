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

from ..checkpoints import resolve_resume
from ..config import GuardConfig, document_fields

_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@document_fields
@dataclass
class GuardScriptArguments(ScriptArguments):
    """Script arguments of `trl-guard grpo`.

    Args:
        dataset_name (`str`):
            The training prompts: a Hub dataset id, a local dataset folder, or a prompt file (`.txt` with one prompt
            per line, `.json`, `.jsonl`, `.csv`, `.parquet` with a `prompt` column).
        reward_funcs (`list[str]`):
            The rewards trained on, summed with `reward_weights`. Each is a built-in name (`pickscore`, `clip_score`,
            `aesthetic`, `ocr`, `video_ocr`, `image_similarity`, `image_reward`, `hpsv2`, `jpeg_compressibility`,
            `jpeg_incompressibility`), the URL
            of a remote scorer (`http://host:port/score`), or a dotted import path of a function
            (`my_package.rewards.my_reward`).
        eval_dataset_name (`str`, *optional*):
            The evaluation prompts, in any form `dataset_name` takes (for a Hub id or folder, the split
            `dataset_test_split` is used). If unset while `eval_strategy` is not `"no"`, the `dataset_test_split`
            split of `dataset_name` is used.
        gold_reward_funcs (`list[str]`, *optional*):
            Rewards scored at evaluation only, never trained on, in the forms `reward_funcs` takes; each is logged
            as `eval_gold/<name>`. Watching them against `eval_reward` shows reward over-optimisation.
        overoptimization_gold_metric (`str`, *optional*):
            Turn on `OverOptimizationCallback` for this logged gold metric (for example
            `eval_gold/clip_score`): training stops once it has stayed more than `overoptimization_tolerance` below
            its best for `overoptimization_patience` evaluations while `eval_reward` is above its value at the best.
        overoptimization_tolerance (`float`, *optional*, defaults to `0.02`):
            How far below its best the gold metric may fall before an evaluation counts against the run.
        overoptimization_patience (`int`, *optional*, defaults to `2`):
            Consecutive counting evaluations before the run stops.
        overoptimization_restore_best (`bool`, *optional*, defaults to `True`):
            End a stopped run with the weights of its best-gold evaluation, so the saved model is those.
    """

    dataset_name: str | None = None
    reward_funcs: list[str] = field(default_factory=list)
    eval_dataset_name: str | None = None
    gold_reward_funcs: list[str] = field(default_factory=list)
    overoptimization_gold_metric: str | None = None
    overoptimization_tolerance: float = 0.02
    overoptimization_patience: int = 2
    overoptimization_restore_best: bool = True


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
        dataset = _read_image_paths(dataset, os.path.dirname(os.path.abspath(name)))
    else:
        dataset = load_dataset(name, config, split=split)
    if "prompt" not in dataset.column_names and "text" in dataset.column_names:
        dataset = dataset.rename_column("text", "prompt")
    return dataset


def _read_image_paths(dataset, folder: str):
    """An `image` column of file paths (editing datasets such as Flow-GRPO's counting_edit) becomes images, with
    relative paths taken from the prompt file's folder. A column naming no existing file is left as it is."""
    from datasets import Image, Value

    if dataset.features.get("image") != Value("string"):
        return dataset
    paths = [os.path.join(folder, p) if isinstance(p, str) else None for p in dataset["image"]]
    exists = [p is not None and os.path.isfile(p) for p in paths]
    if not any(exists):
        return dataset
    if not all(exists):
        missing = dataset["image"][exists.index(False)]
        raise FileNotFoundError(
            f"The 'image' column names {exists.count(False)} files that do not exist, for example {missing!r} "
            f"(relative paths are read from {folder}). Fix the paths or put the images there."
        )
    return dataset.remove_columns("image").add_column("image", paths).cast_column("image", Image())


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


def main(argv: list[str] | None = None):
    """Parse, check, train, save; returns the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    types = (GuardScriptArguments, GuardConfig, ModelConfig)
    check_recipe_keys(argv, types)
    parser = TrlParser(types, prog="trl-guard grpo")
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    if not script_args.dataset_name:
        parser.error("dataset_name is required (a Hub id, a local folder or a prompt file).")
    if not script_args.reward_funcs:
        parser.error("reward_funcs is required: at least one built-in reward name, URL or dotted import path.")
    if not model_args.model_name_or_path:
        parser.error("model_name_or_path is required (a Hub id or a local pipeline folder).")
    evaluates = training_args.eval_strategy != "no"
    if (script_args.gold_reward_funcs or script_args.overoptimization_gold_metric) and not evaluates:
        parser.error(
            "gold_reward_funcs and overoptimization_gold_metric act at evaluation: set eval_strategy (for example "
            "`--eval_strategy steps --eval_steps 50`) and eval_dataset_name."
        )
    # Refused here, before the model loads: a fresh run over checkpoints, or a checkpoint that is not there.
    checkpoint = resolve_resume(
        training_args.output_dir, training_args.resume_from_checkpoint, training_args.overwrite_output_dir
    )

    from ..overoptimization import OverOptimizationCallback
    from ..trainer import GuardGRPODiffusionTrainer

    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        peft_config.task_type = None  # a diffusion transformer is no causal LM: no PEFT task head applies
    train_dataset = load_prompts(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    eval_dataset = load_eval_prompts(script_args, evaluates)
    callbacks = []
    if script_args.overoptimization_gold_metric:
        callbacks.append(
            OverOptimizationCallback(
                script_args.overoptimization_gold_metric,
                tolerance=script_args.overoptimization_tolerance,
                patience=script_args.overoptimization_patience,
                restore_best=script_args.overoptimization_restore_best,
            )
        )
    trainer = GuardGRPODiffusionTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=script_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        peft_config=peft_config,
        gold_reward_funcs=script_args.gold_reward_funcs or None,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


def load_eval_prompts(script_args: GuardScriptArguments, evaluates: bool):
    """The eval prompts: `eval_dataset_name`, else the test split of a Hub or folder `dataset_name` when the run
    evaluates, else none."""
    if script_args.eval_dataset_name:
        return load_prompts(script_args.eval_dataset_name, script_args.dataset_test_split, script_args.dataset_config)
    if not evaluates:
        return None
    if os.path.isfile(script_args.dataset_name):
        raise ValueError(
            f"eval_strategy is set but there are no eval prompts: dataset_name={script_args.dataset_name!r} is a file "
            "with no test split. Set eval_dataset_name (a prompt file, folder or Hub id)."
        )
    try:
        return load_prompts(script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_config)
    except ValueError as error:  # datasets names the splits it has
        raise ValueError(
            f"eval_strategy is set but dataset_name={script_args.dataset_name!r} has no split "
            f"dataset_test_split={script_args.dataset_test_split!r} ({error}). Set eval_dataset_name or "
            "dataset_test_split."
        ) from error


if __name__ == "__main__":
    main()
