"""Train a diffusers flow-matching pipeline with GRPO-Guard (or a baseline: `loss_type`) from a YAML recipe and
flags. Flags override the recipe.

example:
  trl-guard grpo --config examples/recipes/sd35m_pickscore_guard.yaml --learning_rate 2e-4
  accelerate launch -m trl_guard.scripts.grpo --config examples/recipes/sd35m_pickscore_guard.yaml

The recipe (`--config`) is a YAML mapping of field: value, one per line, with any field listed below; an `env:`
mapping in it sets environment variables. The fields come in four groups, in this order:
  - this script's own: the recipe, the model, the prompts, the rewards and the gold-score alarm;
  - GuardConfig, the diffusion-RL fields trl_guard adds (sampling, loss_type, clipping, rollouts);
  - TRL's ModelConfig: model loading and LoRA (`use_peft`, `lora_r`, `lora_alpha`, `lora_target_modules`);
  - transformers' TrainingArguments: output_dir, learning_rate, batch sizes, logging, saving, ...

`lora_dropout` defaults to 0 here, not to TRL's 0.05: dropout is on in the training forward pass and off while
sampling, so with it even the first update after sampling is off-policy and gets clipped. LoRA fields need
`use_peft: true` (without it they are refused, not ignored by a full fine-tune), and `lora_target_modules` is a list
(`[attn.to_q, attn.to_v]`). Every value must have its field's type: `4.0` is read as 4 where an int is expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ..checkpoints import resolve_resume
from ..config import GuardConfig, check_field_types, document_fields
from ..distributed import end_run, prepare_run_end

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
            `jpeg_incompressibility`, `vlm_judge`, `win_rate`), the URL of a remote scorer (`http://host:port/score`),
            or a dotted import path of a function (`my_package.rewards.my_reward`).
        reward_kwargs (`list[dict]`, *optional*):
            The arguments of each entry of `reward_funcs`, in order: one mapping per reward, `{}` for one that takes
            none. A built-in reward takes its class's arguments (`vlm_judge` needs `base_url` and `model`), a URL
            `RemoteReward`'s (`timeout`, `name`, ...). On the command line, a JSON list.
        eval_dataset_name (`str`, *optional*):
            The evaluation prompts, in any form `dataset_name` takes (for a Hub id or folder, the split
            `dataset_test_split` is used). If unset while `eval_strategy` is not `"no"`, the `dataset_test_split`
            split of `dataset_name` is used.
        gold_reward_funcs (`list[str]`, *optional*):
            Rewards scored at evaluation only, never trained on, in the forms `reward_funcs` takes; each is logged
            as `eval_gold/<name>`. Watching them against `eval_reward` shows reward over-optimisation.
        gold_reward_kwargs (`list[dict]`, *optional*):
            The arguments of each entry of `gold_reward_funcs`, as `reward_kwargs` gives them to `reward_funcs`.
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
    reward_kwargs: list[dict] | str | None = None
    eval_dataset_name: str | None = None
    gold_reward_funcs: list[str] = field(default_factory=list)
    gold_reward_kwargs: list[dict] | str | None = None
    overoptimization_gold_metric: str | None = None
    overoptimization_tolerance: float = 0.02
    overoptimization_patience: int = 2
    overoptimization_restore_best: bool = True


def load_prompts(name: str, split: str = "train", config: str | None = None, field: str = "dataset_name"):
    """Load a prompt dataset from the Hub, a local folder or a file; a `.txt` file's lines become `prompt`. `field`
    is the argument that named it, for the messages."""
    from datasets import load_dataset

    extension = os.path.splitext(name)[1].lower()
    looks_local = os.path.sep in name or name.startswith(".") or extension in _FILE_BUILDERS
    if looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"{field}={name!r} does not exist. Give an existing file or folder, or a Hub id.")
    if os.path.isfile(name):
        if extension not in _FILE_BUILDERS:
            raise ValueError(f"{field}={name!r}: unsupported file type; use one of {sorted(_FILE_BUILDERS)}.")
        if not _has_content(name):  # datasets would fail on it with a schema-inference error that names no file
            raise ValueError(
                f"{field}={name!r} has no prompts: the file is empty. Give a file with at least one prompt (one per "
                "line in a .txt file)."
            )
        dataset = load_dataset(_FILE_BUILDERS[extension], data_files=name, split="train")
        dataset = _read_image_paths(dataset, os.path.dirname(os.path.abspath(name)))
    else:
        dataset = load_dataset(name, config, split=split)
    if "prompt" not in dataset.column_names and "text" in dataset.column_names:
        dataset = dataset.rename_column("text", "prompt")
    return dataset


def _has_content(path: str) -> bool:
    """Whether the file holds anything but whitespace."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _read_image_paths(dataset, folder: str):
    """An `image` column of file paths (editing datasets such as Flow-GRPO's counting_edit) becomes images, with
    relative paths taken from the prompt file's folder; a column of lists of paths (several source images per row, as
    Qwen-Image-Edit-Plus edits them; a JSON list in a `.json` / `.jsonl` file) becomes lists of images. A column
    naming no existing file is left as it is (ids, not paths); one naming some missing files is refused."""
    from datasets import Image, List, Value

    feature = dataset.features.get("image")
    nested = isinstance(feature, List) and feature.feature == Value("string")
    if feature != Value("string") and not nested:
        return dataset

    def resolve(path):
        return os.path.join(folder, path) if isinstance(path, str) else None

    rows = dataset["image"]
    paths = [[resolve(p) for p in row] if isinstance(row, list) else resolve(row) for row in rows]
    # (path as written, path resolved) of every file named; a missing list (None) names none, and is left for the
    # trainer's check of the column to refuse
    named = [
        pair
        for row, resolved in zip(rows, paths)
        for pair in (zip(row, resolved) if isinstance(row, list) else [] if nested else [(row, resolved)])
    ]
    missing = [given for given, path in named if path is None or not os.path.isfile(path)]
    if len(missing) == len(named):
        return dataset
    if missing:
        raise FileNotFoundError(
            f"The 'image' column names {len(missing)} files that do not exist, for example {missing[0]!r} "
            f"(relative paths are read from {folder}). Fix the paths or put the images there."
        )
    images = List(Image()) if nested else Image()
    return dataset.remove_columns("image").add_column("image", paths).cast_column("image", images)


_USAGE = "trl-guard grpo [--config RECIPE.yaml] [--FIELD VALUE ...]"
# RatioNorm and the clip ranges assume that the policy which sampled a round is the one that first trains on it.
TRAINING_LORA_DROPOUT = 0.0
_LORA_DROPOUT_HELP = (
    "LoRA dropout. trl-guard grpo defaults it to 0, not to TRL's 0.05: dropout is active in the training forward pass "
    "but not while sampling, so with dropout even the first update after sampling is off-policy (8-17%% of its "
    "samples got clipped in our runs where none should). A value > 0 is accepted with a warning."
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's lines and lists (raw) and shows each field's default."""


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build_parser() -> TrlParser:
    """The `trl-guard grpo` parser: TRL's, with `--config` listed, `lora_dropout` defaulting to 0, and `--help` in
    the order a newcomer needs it (this script's fields, then GuardConfig's, then TRL's and transformers')."""
    parser = TrlParser(
        (GuardScriptArguments, GuardConfig, ModelConfig),
        prog="trl-guard grpo",
        usage=_USAGE,
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults(lora_dropout=TRAINING_LORA_DROPOUT)
    for action in parser._actions:
        if action.dest == "lora_dropout":
            action.help = _LORA_DROPOUT_HELP
        elif action.dest == "model_name_or_path":  # ModelConfig's help speaks of a causal LM checkpoint
            action.help = (
                "The pipeline to train: a Hub id (for example `stabilityai/stable-diffusion-3.5-medium`) or a local "
                "diffusers pipeline folder."
            )

    training_fields = set(_field_names(TrainingArguments))
    plain_defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    changed = [
        f"{f.name}={f.default!r}"
        for f in dataclasses.fields(GuardConfig)
        if f.name in plain_defaults and f.default is not dataclasses.MISSING and f.default != plain_defaults[f.name]
    ]
    script = parser.add_argument_group(
        "this script: the recipe, the model, the prompts and the rewards",
        "`model_name_or_path`, `dataset_name` and `reward_funcs` are required (in the recipe or as flags).",
    )
    # TrlParser reads --config itself, before argparse sees the command line; this entry only documents it, and its
    # SUPPRESS default keeps it out of the parsed namespace.
    script.add_argument(
        "--config",
        metavar="RECIPE.yaml",
        default=argparse.SUPPRESS,
        help="A YAML recipe: a mapping of field: value with any field below. Flags given with it override it.",
    )
    groups = [
        (script, {"model_name_or_path", *_field_names(GuardScriptArguments)}),
        (
            parser.add_argument_group("GuardConfig: diffusion RL (what trl_guard adds to TrainingArguments)"),
            {name for name in _field_names(GuardConfig) if name not in training_fields},
        ),
        (parser.add_argument_group("TRL ModelConfig: model loading and LoRA"), set(_field_names(ModelConfig))),
        (
            parser.add_argument_group(
                "transformers TrainingArguments",
                textwrap.fill(f"GuardConfig changes these defaults: {', '.join(changed)}.", 100) if changed else None,
            ),
            training_fields,
        ),
    ]
    # HfArgumentParser puts every field into one "options" group in dataclass order, which buries our fields after
    # ~150 of TrainingArguments'. Moving the actions between groups changes only the help; parsing uses
    # parser._actions, which is untouched.
    options = parser._optionals
    for action in list(options._group_actions):
        group = next((group for group, names in groups if action.dest in names), None)
        if group is not None:
            options._group_actions.remove(action)
            group._group_actions.append(action)
    # the model first, right after --config: it comes from ModelConfig, the last class parsed
    script._group_actions.sort(key=lambda action: {"config": 0, "model_name_or_path": 1}.get(action.dest, 2))
    return parser


def _config_path(argv: list[str]) -> str | None:
    """The recipe path after `--config`, or None; a `--config` with no path is refused here, because TrlParser would
    fail with an IndexError."""
    if "--config" not in argv:
        return None
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise ValueError("--config needs a path: `--config RECIPE.yaml`.")
    return argv[index + 1]


def _split_config_equals(argv: list[str]) -> list[str]:
    """`--config=recipe.yaml` as `--config recipe.yaml`, the only form TrlParser reads."""
    split: list[str] = []
    for arg in argv:
        split.extend(["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg])
    return split


def read_recipe(path: str) -> dict[str, Any]:
    """The YAML recipe at `path` as a mapping, refusing anything else with a message that names the file.

    TrlParser reads the recipe too, but a list crashes it with `unhashable type` and a scalar is read as its
    characters; reading it here first turns both into a message that says what the file must hold.
    """
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file. Give the path of a YAML recipe.")
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path} is not valid YAML: {error}") from error
    example = "for example `learning_rate: 1e-4`, one field per line"
    if recipe is None:
        raise ValueError(f"--config {path} is empty: a recipe must be a YAML mapping of field: value ({example}).")
    if not isinstance(recipe, dict):
        shown = repr(recipe)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(
            f"--config {path} must be a YAML mapping of field: value ({example}); it holds a "
            f"{type(recipe).__name__}: {shown}."
        )
    return recipe


def check_recipe_keys(argv: list[str], dataclass_types: tuple) -> dict[str, Any]:
    """Refuse a YAML recipe that is not a mapping, or that has keys no argument class knows, before any of them is
    built: a typo such as `num_generation: 2` otherwise surfaces as another field's error (the default it left in
    place). Returns the recipe as written (empty without `--config`)."""
    path = _config_path(argv)
    if path is None:
        return {}
    import difflib

    recipe = read_recipe(path)
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)} | {"env"}  # TrlParser reads env
    unknown = sorted((key for key in recipe if key not in known), key=str)
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            if isinstance(key, str) and (close := difflib.get_close_matches(key, known, n=1))
            else repr(key)
            for key in unknown
        ]
        raise ValueError(f"Unknown keys in {path}: {', '.join(hints)}.")
    return recipe


#: ModelConfig's LoRA settings: none of them does anything unless `use_peft` is on.
_LORA_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(ModelConfig)
    if f.name.startswith("lora_") or f.name in ("use_rslora", "use_dora")
)
#: Characters that make a `lora_target_modules` string a regular expression, as peft reads a string.
_REGEX_CHARACTERS = frozenset("*+?[](){}|^$\\")


def _is_target_pattern(value: str) -> bool:
    """Whether a `lora_target_modules` string is one peft means as a string: `all-linear`, or a regular expression
    matched against each module's full name. A plain module name (`attn.to_q`) is neither."""
    return value.lower() == "all-linear" or any(c in _REGEX_CHARACTERS for c in value)


def _refuse_target_module_string(argv: list[str], recipe: dict[str, Any]) -> None:
    """A recipe's `lora_target_modules: attn.to_q`: peft reads a string as a regular expression that must match a
    module's full name (`transformer_blocks.0.attn.to_q`), so a module name given as a string matches nothing, and
    fails only once the pipeline is loaded."""
    value = recipe.get("lora_target_modules")
    flag = any(arg == "--lora_target_modules" or arg.startswith("--lora_target_modules=") for arg in argv)
    if isinstance(value, str) and not flag and not _is_target_pattern(value):
        raise ValueError(
            f"lora_target_modules={value!r} is a single string, which peft reads as a regular expression over full "
            f"module names (such as `transformer_blocks.0.attn.to_q`), so it matches none. Give a list: "
            f"`lora_target_modules: [{value}]`."
        )


def _parse_reward_kwargs(value: Any, name: str) -> list[dict] | None:
    """`reward_kwargs` as a list of mappings: a recipe gives the list, a flag its JSON; a lone mapping is the list of
    one reward's arguments."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ValueError(
                f"{name}={value!r} is not valid JSON ({error}). Give a JSON list of objects, one per reward, for "
                'example \'[{}, {"base_url": "http://127.0.0.1:8000/v1", "model": "judge"}]\'.'
            ) from None
    if isinstance(value, dict):
        value = [value]
    if value is not None and (
        not isinstance(value, (list, tuple)) or not all(v is None or isinstance(v, dict) for v in value)
    ):
        raise ValueError(
            f"{name}={value!r} must be a list of mappings, one per reward in order (`{{}}` for a reward without "
            "arguments)."
        )
    return None if value is None else [dict(v or {}) for v in value]


def _check_script_and_model_args(
    script_args: GuardScriptArguments,
    model_args: ModelConfig,
    lora_defaults: dict[str, Any],
    use_peft_given: bool = False,
) -> None:
    """The script's and ModelConfig's fields, which no check of their own classes covers: their types (as
    GuardConfig checks its own), and LoRA settings without `use_peft`, which would train the whole transformer:
    refused when `use_peft` was never given, a warning when it was given as false on purpose (a LoRA recipe
    turned into a full fine-tune by `--use_peft false`)."""
    # a recipe's `reward_funcs: ocr` is one reward, as the trainer reads a string, so not refused as a non-list
    for name in ("reward_funcs", "gold_reward_funcs"):
        if isinstance(getattr(script_args, name), str):
            setattr(script_args, name, [getattr(script_args, name)])
    for name in ("reward_kwargs", "gold_reward_kwargs"):
        setattr(script_args, name, _parse_reward_kwargs(getattr(script_args, name), name))
    targets = model_args.lora_target_modules
    if isinstance(targets, str) and not _is_target_pattern(targets):
        # TRL's ModelConfig turns a one-element list into its element (meant for `all-linear`), which peft would
        # read as a regular expression: `[attn.to_q]` stays the list it was written as
        model_args.lora_target_modules = targets = [targets]
    check_field_types(script_args)
    check_field_types(model_args, skip=("lora_target_modules",) if isinstance(targets, str) else ())
    changed = [
        f"{name}={getattr(model_args, name)!r}"
        for name in _LORA_FIELDS
        if getattr(model_args, name) != lora_defaults[name]
    ]
    if changed and not model_args.use_peft and use_peft_given:
        warnings.warn(
            f"{', '.join(changed)}: LoRA settings, but use_peft is false: they are ignored and the whole transformer "
            "trains (saved as `transformer/`).",
            UserWarning,
            stacklevel=3,
        )
    elif changed and not model_args.use_peft:
        raise ValueError(
            f"{', '.join(changed)}: LoRA settings, but use_peft is false, so the run would ignore them and train the "
            "whole transformer (saved as `transformer/`). Set `use_peft: true` in the recipe (or pass `--use_peft`) "
            "to train a LoRA, or remove them to train in full."
        )


def parse_arguments(argv: list[str]) -> tuple[GuardScriptArguments, GuardConfig, ModelConfig]:
    """The three argument objects of a command line, after the checks that need no model: the recipe is a mapping
    of known fields, every field's value has its field's type, the required fields are set, LoRA settings come with
    `use_peft`, evaluation settings have what they need. Warns when LoRA dropout is on."""
    argv = _split_config_equals(argv)
    types = (GuardScriptArguments, GuardConfig, ModelConfig)
    recipe = check_recipe_keys(argv, types)
    _refuse_target_module_string(argv, recipe)
    parser = build_parser()
    # read before parsing: TrlParser makes the recipe's values the parser's defaults
    lora_defaults = {name: parser.get_default(name) for name in _LORA_FIELDS}
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    use_peft_given = "use_peft" in (recipe or {}) or any(
        a == "--use_peft" or a.startswith("--use_peft=") for a in argv
    )
    _check_script_and_model_args(script_args, model_args, lora_defaults, use_peft_given)
    if not script_args.dataset_name:
        parser.error("dataset_name is required (a Hub id, a local folder or a prompt file).")
    if not script_args.reward_funcs:
        parser.error("reward_funcs is required: at least one built-in reward name, URL or dotted import path.")
    if not model_args.model_name_or_path:
        parser.error("model_name_or_path is required (a Hub id or a local pipeline folder).")
    # Built (nothing loads, nothing is contacted) so that a wrong argument, a missing judge key or a count that does
    # not match fails now, not after the pipeline has loaded.
    from ..scoring import resolve_reward_funcs

    resolve_reward_funcs(script_args.reward_funcs, script_args.reward_kwargs, "reward_funcs")
    if script_args.gold_reward_funcs or script_args.gold_reward_kwargs:
        resolve_reward_funcs(script_args.gold_reward_funcs, script_args.gold_reward_kwargs, "gold_reward_funcs")
    evaluates = training_args.eval_strategy != "no"
    if (script_args.gold_reward_funcs or script_args.overoptimization_gold_metric) and not evaluates:
        parser.error(
            "gold_reward_funcs and overoptimization_gold_metric act at evaluation: set eval_strategy (for example "
            "`--eval_strategy steps --eval_steps 50`) and eval_dataset_name."
        )
    if script_args.overoptimization_gold_metric:  # refused now, not at the first evaluation after training steps
        from ..metrics import eval_keys
        from ..overoptimization import check_alarm_metric
        from ..scoring import reward_log_names

        logged = eval_keys(
            reward_log_names(script_args.reward_funcs, script_args.reward_kwargs),
            reward_log_names(script_args.gold_reward_funcs, script_args.gold_reward_kwargs),
            training_args.eval_kl,
        )
        try:
            check_alarm_metric(script_args.overoptimization_gold_metric, logged, "overoptimization_gold_metric")
        except ValueError as error:
            parser.error(str(error))
    if model_args.use_peft and model_args.lora_dropout > 0:
        warnings.warn(
            f"lora_dropout={model_args.lora_dropout}: dropout is active while training but not while sampling, so "
            "even the first update after each sampling round is off-policy and part of it gets clipped. Set "
            "`lora_dropout: 0` (trl-guard grpo's default) unless you want that.",
            UserWarning,
            stacklevel=2,
        )
    return script_args, training_args, model_args


def main(argv: list[str] | None = None):
    """Parse, check, train, save; returns the trainer."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prepare_run_end()
    script_args, training_args, model_args = parse_arguments(argv)
    evaluates = training_args.eval_strategy != "no"
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
    from ..scoring import resolve_reward_funcs

    gold_reward_funcs = None
    if script_args.gold_reward_funcs:
        gold_reward_funcs = resolve_reward_funcs(
            script_args.gold_reward_funcs, script_args.gold_reward_kwargs, "gold_reward_funcs"
        )
    trainer = GuardGRPODiffusionTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=resolve_reward_funcs(script_args.reward_funcs, script_args.reward_kwargs, "reward_funcs"),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        peft_config=peft_config,
        gold_reward_funcs=gold_reward_funcs,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    # Under gloo the process ends right after its exit handlers, before the interpreter's teardown: see end_run.
    end_run(trainer.accelerator)
    return trainer


def load_eval_prompts(script_args: GuardScriptArguments, evaluates: bool):
    """The eval prompts: `eval_dataset_name`, else the test split of a Hub or folder `dataset_name` when the run
    evaluates, else none."""
    if script_args.eval_dataset_name:
        return load_prompts(
            script_args.eval_dataset_name,
            script_args.dataset_test_split,
            script_args.dataset_config,
            field="eval_dataset_name",
        )
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
