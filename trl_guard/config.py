"""Training arguments for online RL of flow-matching diffusion models."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import textwrap
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from transformers import TrainingArguments

from . import algorithms, context_parallel
from .algorithms import ALGORITHM_ARGUMENTS, algorithm_class
from .distributed import DEEPSPEED_REFUSAL, launch_refusal
from .losses.advantages import MULTI_REWARD_NORMALIZATIONS, SCALE_REWARDS

_ENTRY = re.compile(r"^(\s+)(\w+) \(`[^\n]*\):$")


def docstring_entries(doc: str) -> dict[str, str]:
    """The `name (`type`, ...):` entries of a Google-style docstring, each description joined into one line."""
    entries: dict[str, str] = {}
    lines = (doc or "").splitlines()
    for i, line in enumerate(lines):
        match = _ENTRY.match(line)
        if not match:
            continue
        indent, description = len(match.group(1)), []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            description.append(following.strip())
        entries[match.group(2)] = " ".join(" ".join(description).split())
    return entries


def document_fields(cls: type) -> type:
    """Give each field a dataclass adds to its parents (or redefines and documents) the command-line help of its
    docstring entry, so `--help` and the documentation cannot drift apart; a new field without an entry fails at
    import."""
    entries = docstring_entries(cls.__doc__)
    inherited = {
        f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)
    }
    redefined = set(cls.__dict__.get("__annotations__", {}))
    for f in dataclasses.fields(cls):
        if f.name in inherited and not (f.name in redefined and entries.get(f.name)):
            continue  # a parent's field keeps its parent's help unless this class documents it anew
        if not entries.get(f.name):
            raise TypeError(f"{cls.__name__}.{f.name} has no entry in the class docstring: document it there.")
        # argparse formats help with %, so a literal % must be doubled
        f.metadata = MappingProxyType({**f.metadata, "help": entries[f.name].replace("%", "%%")})
    return cls


def document_algorithm_arguments(cls: type) -> type:
    """Append each algorithm family's arguments (`ALGORITHM_ARGUMENTS`, which `cls` inherits) to `cls`'s documentation,
    under a heading per family, so that `help(GuardConfig)` documents every field; their command-line help comes from
    the same entries (`document_fields` on each arguments dataclass)."""
    sections = []
    for arguments in ALGORITHM_ARGUMENTS:
        document_fields(arguments)
        intro, _, entries = (arguments.__doc__ or "").partition("Parameters:\n")
        heading = f"        > Parameters of `{arguments.__module__}.{arguments.__name__}`"
        intro = textwrap.fill(" ".join(intro.split()), 119, initial_indent=" " * 8, subsequent_indent=" " * 8)
        sections.append(f"\n{heading}\n\n{intro}\n\n{entries.rstrip()}\n")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "".join(sections) + "    "
    return cls


@document_fields
@document_algorithm_arguments
@dataclass
class GuardConfig(*ALGORITHM_ARGUMENTS, TrainingArguments):
    r"""
    Configuration for [`GuardGRPODiffusionTrainer`]: GRPO-Guard and its baselines (Flow-GRPO, DanceGRPO,
    TempFlow-GRPO reweighting and the paper's ablations) for flow-matching text-to-image pipelines.

    Only the parameters specific to diffusion RL are listed here; every other field is a
    [`~transformers.TrainingArguments`] field with the same meaning. Defaults that differ from
    `TrainingArguments`: `learning_rate=1e-4`, `logging_steps=1`, `remove_unused_columns=False`,
    `dataloader_pin_memory=False` (the data loader yields prompt strings: there is nothing to pin). Refused, with a
    message: `auto_find_batch_size` (it halves the micro-batch, which would cut prompt groups apart, as TRL's GRPO
    refuses it too), `load_best_model_at_end` (evaluations here score sampled images, not a loss; use
    `OverOptimizationCallback(restore_best=True)` to end on the best gold score), `fp16` (use `bf16`: the SDE log-ratio
    needs float32's exponent range, which bf16 keeps and fp16 does not, and fp16 would need loss scaling) and
    `deepspeed` (shard with FSDP2: docs/launching.md). Every field's value is checked against its type when the config
    is built, naming the field: an int field reads an integral float such as `4.0` (a YAML recipe's) as `4` and
    refuses `4.5`, a float field refuses nan and inf, and a field with choices refuses any other value.

    Batch sizes follow TRL's `GRPOConfig`: `per_device_train_batch_size` counts *images* per device per micro-step.
    One *generation batch* of `per_device_train_batch_size * num_processes * steps_per_generation` images is sampled
    at once; it must divide into whole prompt groups of `num_generations`, and it is consumed in
    `steps_per_generation` micro-steps (`num_iterations` times). An optimizer step happens every
    `gradient_accumulation_steps` micro-steps, so the data is *off-policy*, and clipping can act, only when
    `steps_per_generation > gradient_accumulation_steps` or `num_iterations > 1` (Flow-GRPO takes two optimizer
    steps per sampling round). Within one micro-step every trained timestep gets its own backward pass, so memory
    does not grow with `num_inference_steps`.

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for `DiffusionPipeline.from_pretrained`, used when the `model` argument of the trainer
            is a string (for example `{"dtype": "bfloat16", "variant": "fp16"}`; the older key `torch_dtype`, which
            diffusers deprecates, is read as `dtype`). A JSON string is accepted
            from the command line. `trust_remote_code` stays off unless set here explicitly.

        > Parameters that control sampling

        num_generations (`int`, *optional*, defaults to `8`):
            Images sampled per prompt (the group size). The generation batch must be a multiple of it. Must be >= 2.
        num_inference_steps (`int`, *optional*, defaults to `10`):
            SDE sampling steps per rollout (the paper uses 10).
        eval_num_inference_steps (`int`, *optional*, defaults to `40`):
            ODE sampling steps used by `evaluate()`.
        guidance_scale (`float`, *optional*, defaults to `4.5`):
            For SD3, Wan and FLUX.2 [klein]: the classifier-free guidance scale (`<= 1` disables CFG; with CFG both
            branches run as one batched forward). Z-Image follows its pipeline: CFG is on above 0 (Turbo runs at 0).
            For guidance-distilled models such as FLUX.1-dev and FLUX.2 [dev]: the value fed to the guidance
            embedding (no CFG; DanceGRPO trains FLUX this way, typically at 3.5).
        guidance_scale_2 (`float`, *optional*):
            Two-expert families (Wan2.2 A14B): the CFG scale of the low-noise expert, as `WanPipeline`'s
            `guidance_scale_2`; unset, `guidance_scale` guides both.
        true_cfg_scale (`float`, *optional*, defaults to `1.0`):
            Real classifier-free guidance for guidance-distilled families (FLUX.1, Kontext) and Qwen-Image (Edit, 2.1),
            with `negative_prompt` as the unconditional branch; `<= 1` disables it. Ignored by SD3, whose CFG is
            `guidance_scale`.
        negative_prompt (`str`, *optional*, defaults to `""`):
            Prompt of the unconditional branch of CFG.
        height (`int`, *optional*, defaults to `512`):
            Image height in pixels; must map to a latent size the transformer accepts.
        width (`int`, *optional*, defaults to `512`):
            Image width in pixels.
        num_frames (`int`, *optional*, defaults to `1`):
            Frames per video, for video families (Wan2.1 takes `4k + 1`: Flow-GRPO trains it on 33). Image families
            take only 1. Reward functions then receive one list of frames per sample (docs/rewards.md).
        max_sequence_length (`int`, *optional*, defaults to `128`):
            Maximum number of T5 tokens (Flow-GRPO uses 128; SD3's pipeline default is 256). At most the family's
            pipeline limit (SD3 and FLUX.1 512, Qwen-Image 1024): refused above it, before loading when the model is a
            pipeline object or a local folder. Qwen-Image 2.1's pipeline reads every prompt whole, so a longer one is
            refused there rather than cut.
        noise_level (`float`, *optional*, defaults to `0.7`):
            SDE noise multiplier (`a` in Flow-GRPO, `eta` in DanceGRPO).
        init_same_noise (`bool`, *optional*, defaults to `False`):
            Start every image of a prompt group from the same initial noise (DanceGRPO); groups still differ.

        > Parameters that control the loss

        loss_type (`str`, *optional*, defaults to `"grpo_guard"`):
            `"flow_grpo"` (plain PPO-clipped log-ratio), `"temp_reweight"` (TempFlow-GRPO: per-step weight `std`),
            `"mean_revised"` (log-ratio with its negative mean removed), `"ratio_norm"` (RatioNorm: the mean-revised
            log-ratio times `std`) or `"grpo_guard"` (RatioNorm plus the per-step gradient reweighting): the SDE family,
            which samples with the SDE and clips an importance ratio; `"flow_dppo"` (Flow-DPPO) samples the same way
            but masks the unclipped ratio where the step's KL to the old policy is high (`dppo_*` fields). Or the
            forward-process family, which samples with the ODE, keeps only the clean samples and trains on them noised
            again: `"nft"` (DiffusionNFT) or `"awm"` (Advantage Weighted Matching). Or `"dpo"` (online Diffusion-DPO),
            which samples with its reference's SDE and trains one best-against-worst pair per prompt group, noised
            again (`dpo_*` fields). Or `"dgpo"` (DGPO), which samples with the ODE and weighs each prompt group's
            advantage-weighted flow matching by its group preference score (`dgpo_*` fields). The loss types are
            those of the registered algorithm families (`trl_guard.algorithms.ALGORITHMS`); each family's own fields
            are listed at the end of this documentation and refused, set away from their defaults, under a loss type
            that does not read them.
        epsilon (`float`, *optional*):
            Clip range: ratios are clipped to `[1 - epsilon, 1 + epsilon]`. Log-probabilities are per-element MEANs
            over the latent (not sums), so ratios sit within ~1e-3 of 1 and clip ranges are tiny. Defaults to `1e-4`
            for `flow_grpo`, `temp_reweight` and `mean_revised`, `2e-6` for `ratio_norm` and `grpo_guard` (the
            papers' values; GRPO-Guard used `4e-6` for PickScore), and `1.0` for `awm` (its surrogate ratio, AWM's
            released configs). `nft` has no ratio and `flow_dppo` no clip (its KL mask bounds the update): both
            refuse it.
        beta (`float`, *optional*, defaults to `0.0`):
            Weight of the KL penalty to the reference policy (the transformer with LoRA disabled, or a frozen copy of
            the starting weights for full fine-tuning). `0` (GRPO-Guard's setting) skips the reference forward. Under
            `nft` and `awm` it weighs the velocity-space penalty `MEAN((v - v_ref)**2)` instead (DiffusionNFT: `1e-4`;
            AWM: `1e-4` for PickScore, `1e-3` GenEval, `3e-3` OCR).
        timestep_fraction (`float`, *optional*, defaults to `1.0`):
            Fraction of the sampling steps trained on per rollout: `max(1, int(num_inference_steps *
            timestep_fraction))` steps. Flow-GRPO's configs use `0.99`, which with 10 steps trains steps 0-8. Under
            `nft`/`awm`: that many noise levels per sample, drawn as a permutation of the sampling grid (DiffusionNFT:
            `0.99`).
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-adv_clip_max, adv_clip_max]`.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            Advantage normalisation: divide by the group's reward std (`"group"`), by the whole generation batch's
            std (`"batch"`) or not at all (`"none"`). Rewards are always centred per group.
        reward_weights (`list[float]`, *optional*):
            Weight of each reward function in the summed reward; all `1.0` if unset.
        multi_reward_normalization (`str`, *optional*, defaults to `"sum"`):
            How several reward functions become one advantage. `"sum"`: their weighted sum is normalised within each
            group, so a reward on a large scale (a judge's 1-10 next to a CLIP score's 0.2-0.3) decides the ranking
            unless the weights make up the scale. `"decoupled"` (GDPO): each reward is normalised within its group
            first (as `scale_rewards` says), then the normalised rewards are weighted and summed, so each counts by
            its weight whatever its scale. With several rewards, each one's own normalised advantage is logged as
            `advantages/<name>/abs_mean`, with its correlation to the advantage trained on, `advantages/<name>/corr`.
        overlap_reward_scoring (`bool`, *optional*, defaults to `True`):
            Score each micro-batch's images in a worker thread while the next micro-batch is sampled (Flow-GRPO
            does the same). Plain reward functions are still called one at a time, in order; `async def` ones are
            awaited concurrently with each other.
        generation_batch_size (`int`, *optional*):
            Images sampled per generation round over all processes; it must be a multiple of the global micro-batch
            (`per_device_train_batch_size * num_processes`) and of `num_generations`. Set this or
            `steps_per_generation`, not both (TRL's rule): unset, it is `per_device_train_batch_size * num_processes *
            steps_per_generation`.
        steps_per_generation (`int`, *optional*):
            Micro-steps served by one generation batch. Set this or `generation_batch_size`, not both; with neither,
            `gradient_accumulation_steps`.
        num_iterations (`int`, *optional*, defaults to `1`):
            Passes over each generation batch (PPO epochs; `mu` in the GRPO paper).
        per_device_sample_batch_size (`int`, *optional*):
            Images sampled per forward during a generation round (Flow-GRPO's `sample.batch_size`); it must divide
            the round's images per process. Unset, it is `per_device_train_batch_size`, so that the first training
            pass repeats the sampling forwards exactly. Sampling runs without gradients, so a larger batch often
            fits and runs faster; in half precision a forward over a batch of another shape can differ in the last
            bits, and the first pass is then not exactly on-policy: see `recompute_old_means`.
        shuffle_dataset (`bool`, *optional*, defaults to `True`):
            Shuffle the prompts each epoch. The order of an epoch is drawn from `(seed, epoch)` alone, so a resumed run
            sees the prompts in the same order from any checkpoint.

        > Parameters that control evaluation

        eval_kl (`bool`, *optional*, defaults to `False`):
            Also log `eval_kl`, the KL of the policy from the base policy (LoRA disabled, or the starting weights when
            training in full) on the eval prompts: one SDE trajectory per prompt is sampled from the policy, and the
            exact Gaussian KL of each trained-kind step (per-element MEAN, as the log-probabilities) is summed over
            the steps and averaged over prompts. It costs about two extra sampling passes per evaluation. Reward
            over-optimisation is usually plotted against `sqrt(eval_kl)` (Gao et al., 2022).

        > Parameters that control the exponential moving average (EMA) of the weights

        ema_decay (`float`, *optional*, defaults to `0.0`):
            `0` turns the EMA off. Otherwise an EMA of the trained weights is kept and used by `evaluate()`,
            `save_model()`, the model weights of every checkpoint and `push_to_hub`; training itself continues from
            the live weights, which checkpoints keep in `ema_state.safetensors` (with the EMA) so that resume is exact. Every
            official Flow-GRPO and GRPO-Guard SD3.5 config uses `0.9`. The decay applied at optimizer step `n` is
            `min(ema_decay, n / (n + 9))`, as Flow-GRPO's, so early updates follow the weights closely.
        ema_update_interval (`int`, *optional*, defaults to `8`):
            Update the EMA every this many optimizer steps (Flow-GRPO: 8).

        > Parameters that control memory

        offload_frozen_modules (`bool`, *optional*, defaults to `False`):
            Keep the text encoders and the VAE on the CPU, moving each to the accelerator only while it encodes or
            decodes. Saves their memory (T5-XXL alone is ~9 GB in bf16) at the cost of transfers every round.
        precompute_prompt_embeds (`bool`, *optional*, defaults to `False`):
            Encode every distinct prompt of the train and eval datasets once, before training, and keep the
            embeddings on the CPU; rounds then never run the text encoders. Combine with `offload_frozen_modules`.
            Gradient checkpointing of the transformer is the Trainer's `activation_checkpointing` (or its alias
            `gradient_checkpointing`); bf16 autocast is
            `bf16=True` (the SDE math always runs in float32, where Flow-GRPO saw bf16 overflow).
        context_parallel_degree (`int`, *optional*, defaults to `1`):
            Split every denoiser forward's token sequence (sampling and training, forwards and backwards) over this
            many processes with diffusers' context parallelism (`ContextParallelConfig`, `enable_parallelism`), for
            long videos and large images. The processes form data-parallel groups of this size that hold the same
            samples, so the batch settings count data-parallel ranks (`num_processes / context_parallel_degree`), not
            processes. It must divide the number of processes of a distributed launch, and the family's transformer
            must have a context-parallel plan in diffusers (Wan2.1/2.2, FLUX.1, FLUX.2, Qwen-Image, LTX-2); both are
            checked before loading. `1` turns it off. (docs/launching.md)
        context_parallel_mode (`str`, *optional*, defaults to `"ulysses"`):
            `"ulysses"` (all-to-all over attention heads: the head count must be a multiple of the degree) or
            `"ring"` (key/value chunks passed round the group; needs an attention backend that returns the
            log-sum-exp, such as `DIFFUSERS_ATTN_BACKEND=_native_cudnn` or `flash`, on GPUs).

        > Parameters that control saving

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let a fresh run (no `resume_from_checkpoint`) start in an `output_dir` that already holds `checkpoint-N`
            folders or a finished model. Off, such a run is refused before its first step, so an earlier run's
            checkpoints are never written over by mistake. On, the earlier run's `checkpoint-N` folders and finished
            model (LoRA or `transformer/`, `guard_config.json`, `log_history.json`, `README.md`, `eval_images/`) are
            moved into `output_dir/previous-run-1/` (or the next free number) before the first step, with a warning
            saying where: nothing is deleted, and a later resume never takes one of them for this run's.
            (transformers 5 dropped this `TrainingArguments` field; it is ours now.)

        > Parameters that control logging

        log_timestep_grad_norm (`bool`, *optional*, defaults to `True`):
            Log the gradient norm of each timestep's loss (the paper's Fig. 3). Measured on the optimizer steps that
            are logged (every `logging_steps`), where it costs a copy of the trainable gradients per timestep: cheap
            for LoRA; with full fine-tuning, log less often or turn it off. On several processes, the mean of the
            processes' norms, each of the gradient of its own samples.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep dataset columns: reward functions receive them."}
    )
    dataloader_pin_memory: bool = field(
        default=False, metadata={"help": "Pin dataloader memory; the loader yields prompt strings, nothing to pin."}
    )

    model_init_kwargs: dict[str, Any] | str | None = None

    num_generations: int = 8
    num_inference_steps: int = 10
    eval_num_inference_steps: int = 40
    guidance_scale: float = 4.5
    guidance_scale_2: float | None = None
    true_cfg_scale: float = 1.0
    negative_prompt: str = ""
    height: int = 512
    width: int = 512
    num_frames: int = 1
    max_sequence_length: int = 128
    noise_level: float = 0.7
    init_same_noise: bool = False

    # the choices the command line offers: the families registered when this module is imported (`_check_choices`
    # reads the registry as it is then)
    loss_type: str = field(default="grpo_guard", metadata={"choices": list(algorithms.LOSS_TYPES)})
    epsilon: float | None = None
    beta: float = 0.0
    timestep_fraction: float = 1.0
    adv_clip_max: float = 5.0
    scale_rewards: str = field(default="group", metadata={"choices": list(SCALE_REWARDS)})
    reward_weights: list[float] | None = None
    multi_reward_normalization: str = field(default="sum", metadata={"choices": list(MULTI_REWARD_NORMALIZATIONS)})
    overlap_reward_scoring: bool = True
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    num_iterations: int = 1
    per_device_sample_batch_size: int | None = None
    shuffle_dataset: bool = True

    eval_kl: bool = False
    ema_decay: float = 0.0
    ema_update_interval: int = 8

    offload_frozen_modules: bool = False
    precompute_prompt_embeds: bool = False
    context_parallel_degree: int = 1
    context_parallel_mode: str = field(default="ulysses", metadata={"choices": ["ulysses", "ring"]})

    overwrite_output_dir: bool = False

    log_timestep_grad_norm: bool = True

    #: Fields whose annotation says less than transformers takes (`fsdp` is `str | None`, and a bool or a list of
    #: options works too): their values are left to transformers.
    _UNTYPED_FIELDS = ("fsdp",)

    def __post_init__(self):
        # First, before any check compares or counts with a value: a recipe's `4.0` or `[0.1, 0.2]` reaches here
        # as it is (argparse converts only the strings it is given), and would otherwise fail far from its field.
        check_field_types(self, skip=self._UNTYPED_FIELDS)
        self._check_choices()
        self.model_init_kwargs = _parse_model_init_kwargs(self.model_init_kwargs)
        self._refuse_unsupported()
        super().__post_init__()
        family = algorithm_class(self.loss_type)
        self._refuse_other_families_fields(family)
        self._validate()
        family.validate(self)
        if self.epsilon is None:
            self.epsilon = family.default_epsilon(self.loss_type)
        self._resolve_generation_batch()
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"The generation batch (per_device_train_batch_size={self.per_device_train_batch_size} x "
                f"{self.data_parallel_size} {self._ranks_word} x steps_per_generation={self.steps_per_generation} = "
                f"{self.generation_batch_size} images) must divide into whole prompt groups of "
                f"num_generations={self.num_generations}. Change per_device_train_batch_size, steps_per_generation "
                "or num_generations so that num_generations divides it."
            )
        if self.per_device_sample_batch_size is None:
            self.per_device_sample_batch_size = self.per_device_train_batch_size
        local_batch = self.per_device_train_batch_size * self.steps_per_generation
        if self.per_device_sample_batch_size < 1 or local_batch % self.per_device_sample_batch_size != 0:
            raise ValueError(
                f"per_device_sample_batch_size={self.per_device_sample_batch_size} must divide the images each process "
                f"samples per round (per_device_train_batch_size={self.per_device_train_batch_size} x "
                f"steps_per_generation={self.steps_per_generation} = {local_batch})."
            )
        if family.needs_whole_groups and self.per_device_train_batch_size % self.num_generations != 0:
            # the sampler lays each group's samples out consecutively and each process takes a consecutive slice of
            # the generation batch, so whole micro-batches of whole groups keep every group on one process too
            raise ValueError(
                f"loss_type={self.loss_type!r} compares the samples of a prompt group within one micro-batch, so "
                f"num_generations={self.num_generations} must divide per_device_train_batch_size="
                f"{self.per_device_train_batch_size}, or a group would be split across micro-batches or processes. "
                "Set per_device_train_batch_size to a multiple of num_generations (raise steps_per_generation or "
                "gradient_accumulation_steps to keep the generation batch), or lower num_generations."
            )

    @property
    def data_parallel_size(self) -> int:
        """The processes that sample different images: all of them, or with context parallelism one per group of
        `context_parallel_degree` (whose processes hold the same samples)."""
        return max(1, self.world_size // max(1, self.context_parallel_degree))

    @property
    def _ranks_word(self) -> str:
        return "processes" if self.context_parallel_degree == 1 else "data-parallel ranks"

    def _resolve_generation_batch(self) -> None:
        """TRL's either-or rule: `generation_batch_size` or `steps_per_generation` gives the other."""
        global_batch = self.per_device_train_batch_size * self.data_parallel_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                f"generation_batch_size={self.generation_batch_size} and steps_per_generation="
                f"{self.steps_per_generation} are both set; set only one (the other follows from "
                f"per_device_train_batch_size x processes = {global_batch})."
            )
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation
            return
        if self.generation_batch_size < 1 or self.generation_batch_size % global_batch != 0:
            raise ValueError(
                f"generation_batch_size={self.generation_batch_size} must be a positive multiple of the global "
                f"micro-batch, per_device_train_batch_size={self.per_device_train_batch_size} x {self.data_parallel_size} "
                f"processes = {global_batch}."
            )
        self.steps_per_generation = self.generation_batch_size // global_batch

    def _check_choices(self) -> None:
        """Every field of ours that has `choices`: argparse checks them for flags only, not for a recipe's values or
        the Python API. (Inherited fields are left to transformers, which takes more than some of its lists say.)"""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if f.name == "loss_type":  # the registry as it is now: a family registered since import counts
                choices = algorithms.loss_types()
            value = getattr(self, f.name)
            if choices is None or f.name in _TRAINING_FIELDS or (value is None and f.default is None):
                continue
            if value not in choices:
                raise ValueError(f"{f.name}={value!r} is unknown; use one of {tuple(choices)}.")

    def _refuse_unsupported(self) -> None:
        """Fields of `TrainingArguments` this trainer cannot honour, refused before the parent class's own checks (which
        would otherwise fail first with messages about other fields)."""

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(
            not self.auto_find_batch_size,
            "auto_find_batch_size=True is not supported: halving the micro-batch would cut prompt groups apart. Set "
            "it to False and lower per_device_train_batch_size (or use gradient_accumulation_steps) instead.",
        )
        check(
            not self.load_best_model_at_end,
            "load_best_model_at_end=True is not supported: evaluations score sampled images and keep no eval loss to "
            "pick a best checkpoint by. To end on the best gold score, add "
            "OverOptimizationCallback(gold_metric=..., restore_best=True).",
        )
        check(
            not self.fp16,
            "fp16=True is not supported: the SDE log-ratio needs float32's exponent range and fp16 would need loss "
            "scaling. Use bf16=True (mixed precision with float32's range), or load the pipeline in half precision "
            "with model_init_kwargs={'dtype': 'bfloat16'}.",
        )
        # transformers would try to import deepspeed here, and fail on a missing package rather than on the setting
        check(not self.deepspeed, f"deepspeed={self.deepspeed!r}: {DEEPSPEED_REFUSAL}")
        launch = launch_refusal(self.use_cpu)  # a DeepSpeed or FSDP1 `accelerate launch`, before any weight loads
        check(launch is None, f"this accelerate launch: {launch}")

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        # the fields with choices (loss_type, noise_schedule, ...) were checked by `_check_choices`
        check(
            self.learning_rate >= 0,
            f"learning_rate={self.learning_rate} must be >= 0 (GRPO-Guard's SD3.5-M recipe uses 1e-4).",
        )
        check(
            0 <= self.ema_decay < 1,
            f"ema_decay={self.ema_decay} must be in [0, 1): 0 turns the EMA off, Flow-GRPO's configs use 0.9.",
        )
        check(self.ema_update_interval >= 1, f"ema_update_interval={self.ema_update_interval} must be >= 1.")
        check(
            self.num_generations >= 2,
            f"num_generations={self.num_generations}: group advantages need at least 2 images per prompt; "
            "set num_generations >= 2.",
        )
        check(
            self.epsilon is None or self.epsilon > 0,
            f"epsilon={self.epsilon} must be > 0 (for example 2e-6 for grpo_guard, 1e-4 for flow_grpo).",
        )
        check(self.num_inference_steps >= 1, f"num_inference_steps={self.num_inference_steps} must be >= 1.")
        check(
            self.eval_num_inference_steps >= 1,
            f"eval_num_inference_steps={self.eval_num_inference_steps} must be >= 1.",
        )
        check(
            0 < self.timestep_fraction <= 1,
            f"timestep_fraction={self.timestep_fraction} must be in (0, 1]; 1.0 trains on every sampling step.",
        )
        check(self.noise_level > 0, f"noise_level={self.noise_level} must be > 0 for a stochastic policy.")
        check(self.beta >= 0, f"beta={self.beta} must be >= 0.")
        check(self.adv_clip_max > 0, f"adv_clip_max={self.adv_clip_max} must be > 0.")
        check(self.height > 0 and self.width > 0, f"height={self.height} and width={self.width} must be > 0.")
        check(self.num_frames >= 1, f"num_frames={self.num_frames} must be >= 1 (1 for image families).")
        check(self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1.")
        check(
            self.per_device_train_batch_size >= 1,
            f"per_device_train_batch_size={self.per_device_train_batch_size} must be >= 1: it counts the images each "
            "device samples and trains on per micro-step.",
        )
        check(
            self.steps_per_generation is None or self.steps_per_generation >= 1,
            f"steps_per_generation={self.steps_per_generation} must be >= 1.",
        )
        # the launch's process count is known here (before any weight loads): a degree that cannot split it is refused
        context_parallel.check_launch(self.context_parallel_degree, self.context_parallel_mode, self.world_size)

    def _refuse_other_families_fields(self, family: type[algorithms.Algorithm]) -> None:
        """Refuse, in one message naming them, the fields another registered family owns (or this family owns but
        this loss type does not read) that are set away from their defaults, and the shared settings the family
        says this loss type does not read."""
        owned = dict.fromkeys(name for cls in algorithms.ALGORITHMS for name in cls.config_fields)
        read = set(family.fields_read(self.loss_type))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unused = [
            f"{name}={getattr(self, name)!r}"
            for name in owned
            if name not in read and name in defaults and getattr(self, name) != defaults[name]
        ]
        unused += family.unread_settings(self)
        if unused:
            raise ValueError(
                f"loss_type={self.loss_type!r} ({family.description}) does not read {', '.join(unused)}: leave these "
                "fields at their defaults, or pick a loss_type they belong to (docs/method.md lists which fields each "
                "family reads)."
            )


_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


def _parse_model_init_kwargs(value: Any) -> dict[str, Any] | None:
    """`model_init_kwargs` as a dict: a JSON string from the command line is parsed, and `dtype` checked, with
    errors that name the field."""
    if value is None or isinstance(value, dict):
        kwargs = value
    elif isinstance(value, str):
        try:
            kwargs = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"model_init_kwargs={value!r} is not valid JSON ({error.msg}). Write it as a JSON object, for example "
                '\'{"dtype": "bfloat16"}\'.'
            ) from None
        if not isinstance(kwargs, dict):
            raise ValueError(
                f"model_init_kwargs={value!r} must be a JSON object (a dict), not {type(kwargs).__name__}."
            )
    else:
        raise ValueError(f"model_init_kwargs must be a dict or a JSON string, got {type(value).__name__}.")
    if kwargs and "torch_dtype" in kwargs:
        if "dtype" in kwargs:
            raise ValueError("model_init_kwargs sets both dtype and torch_dtype; keep only dtype.")
        kwargs = {("dtype" if k == "torch_dtype" else k): v for k, v in kwargs.items()}
    dtype = (kwargs or {}).get("dtype")
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ValueError(f"model_init_kwargs dtype={dtype!r} is unknown; use one of {_DTYPES}.")
    return kwargs


# ---- Field values against their type annotations ---------------------------------------------------------------

_TRAINING_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingArguments))
# What `_conform` returns for a value no part of the annotation takes, and for one that only a part this check does
# not model (an enum, a dict, another class) might take: that value is left to the class's own checks.
_MISMATCH = object()
_UNCHECKED = object()


def check_field_types(instance: Any, skip: Collection[str] = ()) -> None:
    """Check every field of a dataclass instance against its type annotation, naming the field and the type it takes.

    An int field takes an int, or an integral float, which is stored as the int (a YAML recipe's `4.0` is `4`); a
    float field takes an int or a float, and never nan or inf; a str field a str, a bool field a bool; `X | None`
    also None; a list field a list (or tuple) whose elements are checked the same way. Annotations this check does
    not model exactly (enums, dicts, other classes) leave their values to the class, so that nothing it takes is
    refused. Argparse converts only the strings a recipe or a flag gives, so this is what catches the rest.
    """
    annotations = _field_annotations(type(instance))
    for f in dataclasses.fields(instance):
        if not f.init or f.name in skip:
            continue
        value = getattr(instance, f.name)
        conformed = _conform(value, annotations[f.name])
        if conformed is _UNCHECKED:
            continue
        if conformed is _MISMATCH:
            raise ValueError(
                f"{f.name}={value!r} must be {_describe(annotations[f.name])}, not {type(value).__name__}"
                f"{_yaml_hint(value, annotations[f.name])}."
            )
        if _has_non_finite(conformed):
            raise ValueError(
                f"{f.name}={value!r} must be finite: a nan or inf setting does not fail, it turns the weights or the "
                "loss into nan (or silently into another setting). Give a finite number."
            )
        if conformed is not value:
            setattr(instance, f.name, conformed)


@functools.cache
def _field_annotations(cls: type) -> dict[str, Any]:
    # resolved once per class: this module's annotations are strings (`from __future__ import annotations`)
    return typing.get_type_hints(cls)


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _conform(value: Any, annotation: Any) -> Any:
    """`value` as a field annotated `annotation` takes it (itself, or an int for an integral float where an int is
    expected); `_MISMATCH` if it fits no part of the annotation, `_UNCHECKED` if it fits none this check models
    while the annotation has parts it does not model (an enum, a dict, another class: transformers also takes None
    for `debug`, which is `str | list[DebugOption]`)."""
    # every member as it is first, so that `4.0` stays a float where a float is also taken
    for convert in (False, True):
        for member in _members(annotation):
            result = _conform_member(value, member, convert)
            if result is not _MISMATCH:
                return result
    return _MISMATCH if _modelled(annotation) else _UNCHECKED


_SCALARS = (Any, type(None), bool, int, float, str)


def _modelled(annotation: Any) -> bool:
    """Whether `_conform_member` knows every value each part of `annotation` takes."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return all(_modelled(member) for member in typing.get_args(annotation))
    if annotation is list or origin is list:
        return all(_modelled(element) for element in typing.get_args(annotation))
    return origin is typing.Literal or any(annotation is scalar for scalar in _SCALARS)


def _conform_member(value: Any, member: Any, convert: bool) -> Any:
    origin = typing.get_origin(member)
    if member is Any:
        return value
    if member is type(None):
        return value if value is None else _MISMATCH
    if member is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if member is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if convert and isinstance(value, float) and value.is_integer():
            return int(value)
        return _MISMATCH
    if member is float:
        return value if isinstance(value, numbers.Real) and not isinstance(value, bool) else _MISMATCH
    if member is str:
        return value if isinstance(value, str) else _MISMATCH
    if origin is typing.Literal:
        return value if any(value == v and type(value) is type(v) for v in typing.get_args(member)) else _MISMATCH
    if (member is list or origin is list) and isinstance(value, (list, tuple)):
        (element,) = typing.get_args(member) or (Any,)
        items = [_conform(item, element) for item in value]
        if any(item is _MISMATCH or item is _UNCHECKED for item in items):
            return _MISMATCH  # `_conform` leaves a list of unmodelled elements to the class
        return type(value)(items)
    return _MISMATCH


def _has_non_finite(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(v) for v in values)


def _describe(annotation: Any) -> str:
    """How a message names the type: "an int", "a list of float or None"."""

    def name(member: Any) -> str:
        if member is type(None):
            return "None"
        if typing.get_origin(member) is typing.Literal:
            return " or ".join(repr(v) for v in typing.get_args(member))
        if member is list or typing.get_origin(member) is list:
            (element,) = typing.get_args(member) or (Any,)
            return f"a list of {getattr(element, '__name__', str(element))}"
        described = {int: "an int", float: "a float", str: "a str", bool: "a bool (true or false)"}
        return described.get(member, getattr(member, "__name__", str(member)))

    members = _members(annotation)
    # None last: "a float or None"
    return " or ".join(name(m) for m in sorted(members, key=lambda m: m is type(None)))


def _yaml_hint(value: Any, annotation: Any) -> str:
    """The fix for the two ways YAML gives a value of another type than the one written."""
    strings = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    # PyYAML reads a float only with a dot and a signed exponent: `1e-4` and `1.0e4` are strings
    numbers_written = (re.fullmatch(r"([+-]?\d+)(\.\d*)?[eE]([+-]?)(\d+)", s.strip()) for s in strings)
    match = next((m for m in numbers_written if m), None)
    if match is not None:
        mantissa, fraction, sign, exponent = match.groups()
        written = f"{mantissa}{fraction or '.0'}e{sign or '+'}{exponent}"
        return f" (YAML reads {match.group(0)} as a string: write {written}, with a dot and a signed exponent)"
    if str in _members(annotation) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return " (quote it in a YAML recipe)"
    return ""
