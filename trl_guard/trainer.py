"""GuardGRPODiffusionTrainer: online RL for flow-matching pipelines, GRPO-Guard by default.

The trainer orchestrates one loop for every algorithm family: sample a generation round, score it, turn the rewards
(gathered from all processes) into the algorithm's training signal (group advantages by default), then train over
(micro-batch, unit) pairs with one backward per unit, so memory does not grow with the number of sampling steps; log.
What a rollout records and how a unit's loss is computed belong to the algorithm (`trl_guard.algorithms`); what a
model family's call looks like belongs to its adapter (`trl_guard.adapters`); pre-flight checks and checkpoint files
have their own modules.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from datasets import Dataset
from PIL import Image
from transformers import Trainer, TrainerCallback, TrainerState, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl.trainer.utils import RepeatSampler, identity

from . import checkpoints, context_parallel, distributed, preflight
from .adapters import PipelineAdapter, PromptEmbeddings, SamplingSettings, get_adapter
from .adapters.base import VideosWithAudio
from .algorithms import Algorithm, algorithm_class, get_algorithm, path_kl_to_reference
from .callbacks import adapt_tracker_callbacks
from .conditioning import PromptEncoder, on_device
from .config import GuardConfig
from .ema import EMAWeights
from .hub import check_hub_setup, write_model_card
from .images import log_audio, log_image_grid, make_grid
from .metrics import (
    Stat,
    advantage_key,
    eval_gold_key,
    eval_keys,
    eval_kl_key,
    eval_reward_key,
    eval_rewards_key,
    parse_timestep_key,
    reward_key,
    timestep_key,
)
from .overoptimization import OverOptimizationCallback, check_alarm_metric
from .rollout import (
    TrainBatch,
    buffer_layout,
    load_rollout_buffer,
    rollout_buffer_name,
    sample_ode,
    save_rollout_buffer,
)
from .schedule import SDESchedule
from .scoring import RewardSet
from .seeding import Stream, keyed_generator

logger = logging.getLogger(__name__)


class _EMAUpdate(TrainerCallback):
    """Folds the weights into the EMA after each optimizer step (before that step's evaluation or checkpoint)."""

    def __init__(self, ema: EMAWeights):
        self.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step(state.global_step)


class _AlgorithmStepEnd(TrainerCallback):
    """Tells the algorithm each optimizer step has been taken (`Algorithm.on_optimizer_step`), on every process and
    before that step's checkpoint, with a mean over the processes to reduce what the step measured."""

    def __init__(self, trainer: GuardGRPODiffusionTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        self.trainer.algorithm.on_optimizer_step(
            state.global_step, lambda tensor: accelerator.reduce(tensor, reduction="mean")
        )


class _FollowShardedWeights(TrainerCallback):
    """Under FSDP2, points the copies of the weights (EMA, an algorithm's lagged policy) at the sharded parameters once
    accelerate has made them (a resume has done so already, before loading the copies' state)."""

    def __init__(self, trainer: GuardGRPODiffusionTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._follow_sharded_weights()


class TrainingDivergedError(FloatingPointError):
    """The loss or the gradients of an optimizer step are not finite: training stops before that step is taken."""


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler`, reseeded at each epoch from `(seed, epoch)`.

    `RepeatSampler` draws every epoch's order from one generator that advances as epochs pass, and the Trainer, when
    it resumes, neither replays the earlier epochs nor restores that generator: from a checkpoint past the first epoch
    the prompt order would change. Seeding each epoch from its index (the Trainer calls `set_epoch`) makes the order
    a function of the epoch alone, as `torch.utils.data.DistributedSampler` does.
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed(int(self.seed or 0) + epoch)


class GuardGRPODiffusionTrainer(Trainer):
    """Trainer for online RL of flow-matching text-to-image pipelines (GRPO-Guard, Flow-GRPO, DanceGRPO, ...).

    Args:
        model (`str` or `DiffusionPipeline`):
            A Hub id or local folder loaded with `DiffusionPipeline.from_pretrained(model, **args.model_init_kwargs)`,
            or a pipeline object. Only its denoiser is trained (LoRA if `peft_config` is given, else in full); text
            encoders and VAE are frozen.
        reward_funcs (callable, `str`, or a list of them):
            Reward functions `f(prompts, images, **columns, trainer_state) -> list[float | None]`, a built-in reward
            name, or a dotted import path. Rewards are summed with `args.reward_weights`.
        args ([`GuardConfig`], *optional*):
            Training configuration; defaults to `GuardConfig(f"{model_name}-GuardGRPO")`.
        train_dataset ([`~datasets.Dataset`] or `list[dict]`):
            Prompts in a `prompt` column; other columns are passed to the reward functions. A list of dicts is checked
            and turned into a `Dataset`. An `IterableDataset` is refused (prompt groups are sampled by index).
        eval_dataset ([`~datasets.Dataset`] or `list[dict]`, *optional*):
            Prompts for `evaluate()`, which samples one image per prompt with the ODE and fixed seeds.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Extra callbacks, as for `transformers.Trainer`.
        optimizers (`tuple`, *optional*):
            `(optimizer, lr_scheduler)`; created from `args` when `(None, None)`.
        peft_config ([`~peft.LoraConfig`], *optional*):
            LoRA configuration for the denoiser; `target_modules=None` picks the model family's default.

    Example:
        ```python
        from datasets import Dataset
        from peft import LoraConfig
        from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
        from trl_guard.rewards import jpeg_compressibility

        trainer = GuardGRPODiffusionTrainer(
            model="stabilityai/stable-diffusion-3.5-medium",
            reward_funcs=[jpeg_compressibility],
            args=GuardConfig(
                output_dir="sd35m-guard",
                num_generations=16,
                per_device_train_batch_size=16,
                steps_per_generation=2,  # two optimizer steps per round: the second is off-policy and clipped
                bf16=True,
            ),
            train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"]}),
            peft_config=LoraConfig(r=32, lora_alpha=64),
        )
        trainer.train()
        ```
    """

    def __init__(
        self,
        model: str | Any,
        reward_funcs: Callable | str | Sequence[Callable | str],
        args: GuardConfig | None = None,
        train_dataset: Dataset | list[dict] | None = None,
        eval_dataset: Dataset | list[dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        peft_config: Any | None = None,
        gold_reward_funcs: Callable | str | Sequence[Callable | str] | None = None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else type(model).__name__
            args = GuardConfig(f"{model_name.rstrip('/').split('/')[-1]}-GuardGRPO")
        if not isinstance(args, GuardConfig):
            raise TypeError(f"args must be a GuardConfig, got {type(args).__name__}.")

        # Everything that can be checked cheaply is checked before the pipeline is loaded.
        self.rewards = RewardSet(reward_funcs, args.reward_weights)
        algorithm_class(args.loss_type).check_setup(args, self.rewards.names)
        self.gold_rewards = RewardSet(gold_reward_funcs, field="gold_reward_funcs") if gold_reward_funcs else None
        self._check_alarm_metrics(callbacks or [], args)
        preflight.check_prompt_dataset(train_dataset, "train_dataset")
        preflight.check_prompt_dataset(eval_dataset, "eval_dataset")
        train_dataset, eval_dataset = preflight.as_dataset(train_dataset), preflight.as_dataset(eval_dataset)
        datasets = {"train_dataset": train_dataset, "eval_dataset": eval_dataset}
        preflight.check_reward_columns(datasets)
        self.rewards.check_columns(datasets)
        if self.gold_rewards is not None:  # scored at evaluation only
            self.gold_rewards.check_columns({"eval_dataset": eval_dataset})
        preflight.check_generation_batch(train_dataset, args)
        check_hub_setup(args)
        if isinstance(model, str):
            preflight.check_model_path(model)
        settings = SamplingSettings(
            height=args.height,
            width=args.width,
            guidance_scale=args.guidance_scale,
            true_cfg_scale=args.true_cfg_scale,
            guidance_scale_2=args.guidance_scale_2,
            max_sequence_length=args.max_sequence_length,
            num_frames=args.num_frames,
            sequence_multiple=args.context_parallel_degree,
        )
        pipeline_class = preflight.pipeline_class_name(model)
        if pipeline_class is not None:  # before loading, for pipeline objects and local folders
            preflight.check_condition_columns(datasets, pipeline_class)
            preflight.check_resolution(model, pipeline_class, args)
            preflight.check_family_settings(model, pipeline_class, settings, args)
            context_parallel.check_before_loading(model, pipeline_class, args)

        pipeline = preflight.load_pipeline(model, args.model_init_kwargs)
        self._base_model = model if isinstance(model, str) else getattr(pipeline, "name_or_path", None)
        self._model_fingerprint = checkpoints.model_fingerprint(model)
        self.adapter: PipelineAdapter = get_adapter(pipeline)
        if pipeline_class is None:  # a Hub id: its class is known only now
            preflight.check_condition_columns(datasets, type(pipeline).__name__)
            parts = {name: type(part) for name, part in self.adapter.denoiser_parts.items()}
            context_parallel.check_family(parts, type(pipeline).__name__, args.context_parallel_degree)
        self.adapter.configure(settings)
        self.pipeline = pipeline
        set_seed(args.seed)  # LoRA initialisation draws from the global RNG
        denoiser = self._prepare_denoiser(peft_config, args)
        self.algorithm: Algorithm = get_algorithm(args, self.adapter)  # after the trainable weights exist

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=identity,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        distributed.check_distributed_setup(self.accelerator)
        # diffusers' hooks split every forward over a context-parallel group: set up before accelerate wraps the model
        self.context_parallel = context_parallel.enable(
            context_parallel.denoiser_modules(self.adapter),
            args.context_parallel_degree,
            args.context_parallel_mode,
            self.accelerator,
        )
        # Preflight can only guess whether the launch shards with FSDP2; the accelerator knows. Refused before sampling.
        if distributed.is_fsdp2(self.accelerator) and self.adapter.fsdp2_refusal is not None:
            raise NotImplementedError(self.adapter.fsdp2_refusal)
        adapt_tracker_callbacks(self)
        self.ema: EMAWeights | None = None
        if args.ema_decay > 0:
            trainable = {n: p for n, p in self.adapter.denoiser.named_parameters() if p.requires_grad}
            self.ema = EMAWeights(trainable, decay=args.ema_decay, update_interval=args.ema_update_interval)
            self.add_callback(_EMAUpdate(self.ema))
        self.add_callback(_AlgorithmStepEnd(self))
        self._copies_follow_shards = False
        if distributed.is_fsdp2(self.accelerator):
            self.add_callback(_FollowShardedWeights(self))
        if not args.offload_frozen_modules:
            for module in self.adapter.frozen_modules:
                module.to(self.accelerator.device)
        if self.adapter.reference_denoiser is not None and not distributed.is_fsdp2(self.accelerator):
            # (under FSDP2 it is sharded like the policy when training begins, `_follow_sharded_weights`: sharding
            # puts each process's part on the device, and a whole copy there first could not fit)
            self.adapter.reference_denoiser.to(self.accelerator.device)
        reward_dtype = torch.bfloat16 if args.bf16 else torch.float32
        for rewards in (self.rewards, self.gold_rewards):
            if rewards is not None:
                rewards.place(self.accelerator.device, reward_dtype)

        # Statistics per mode, as TRL keeps them: "train" is reduced into the next training log, "eval" into the
        # evaluation's metrics.
        self._metrics: dict[str, dict[str, list[torch.Tensor | float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._buffered_batches: list[TrainBatch] | None = None
        self._step: int | None = None
        # The loss of the optimizer step being accumulated, and the last finite step's (step, loss, grad norm): what
        # `_check_finite_step` reads and names.
        self._step_loss: torch.Tensor | None = None
        self._last_finite_step: tuple[int, float, float] | None = None
        self._negative_embeds: PromptEmbeddings | None = None
        self._staging_checkpoint = False
        self._scoring_pool: ThreadPoolExecutor | None = None  # made by `_scorer` when a rollout first needs it
        self.prompt_encoder = PromptEncoder(self.adapter, self.accelerator.device, args.offload_frozen_modules)
        if args.precompute_prompt_embeds:
            prompts = [p for d in (train_dataset, eval_dataset) if isinstance(d, Dataset) for p in d["prompt"]]
            negative = [args.negative_prompt] if self.adapter.uses_cfg else []
            self.prompt_encoder.precompute(prompts + negative)

    # ---- setup --------------------------------------------------------------------------------------------------
    def _check_alarm_metrics(self, callbacks: Sequence[TrainerCallback], args: GuardConfig) -> None:
        """Refuse an `OverOptimizationCallback` whose metrics evaluation will not log, before any training (its first
        evaluation would raise after training steps, with nothing saved)."""
        gold_names = self.gold_rewards.names if self.gold_rewards is not None else []
        logged = eval_keys(self.rewards.names, gold_names, args.eval_kl)
        for alarm in (cb for cb in callbacks if isinstance(cb, OverOptimizationCallback)):
            check_alarm_metric(alarm.gold_metric, logged, "OverOptimizationCallback gold_metric")
            check_alarm_metric(alarm.proxy_metric, logged, "OverOptimizationCallback proxy_metric")

    def _prepare_denoiser(self, peft_config: Any | None, args: GuardConfig) -> torch.nn.Module:
        for module in self.adapter.frozen_modules:
            module.requires_grad_(False)
            module.eval()
        denoiser = self.adapter.denoiser
        if peft_config is not None:
            denoiser.requires_grad_(False)
            self.adapter.add_lora(peft_config)
            # LoRA weights train in float32 even when the base model is loaded in half precision.
            for param in denoiser.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            denoiser.requires_grad_(True)
            # (LoRA's reference is the model with the adapter disabled: no copy)
            if algorithm_class(args.loss_type).needs_reference(args) or args.eval_kl:
                self.adapter.reference_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            # diffusers models expose `enable_gradient_checkpointing`, not the transformers hook the Trainer calls.
            denoiser.enable_gradient_checkpointing()
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False
        return denoiser

    @property
    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.adapter.denoiser.parameters() if p.requires_grad]

    # ---- data: each prompt repeated num_generations times, each generation batch reused -----------------------
    def _get_train_sampler(self, dataset: Dataset | None = None) -> RepeatSampler:
        sampler = EpochSeededRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.generation_batch_size // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )
        # the processes of a context-parallel group draw the same prompts
        return self.context_parallel.repeat_for_groups(
            sampler, self._train_batch_size * self.args.steps_per_generation
        )

    def get_train_dataloader(self):
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    # ---- generation round ---------------------------------------------------------------------------------------
    def _negative_embeddings(self) -> PromptEmbeddings | None:
        if not self.adapter.uses_cfg:
            return None
        if self._negative_embeds is None:  # the text encoders are frozen: encode once per run
            self._negative_embeds, _ = self.prompt_encoder([self.args.negative_prompt])
        return self._negative_embeds

    def _decode(self, latents: torch.Tensor) -> list:
        with on_device([self.pipeline.vae], self.accelerator.device, self.args.offload_frozen_modules):
            return self.adapter.decode(latents)

    def _initial_latents(self, global_indices: list[int], stream: Stream, rollout_index: int) -> torch.Tensor:
        shape = self.adapter.latent_shape()
        keys = global_indices
        if self.args.init_same_noise and stream == Stream.INIT_NOISE:
            keys = [i // self.args.num_generations for i in global_indices]
        noise = [torch.randn(shape, generator=keyed_generator(self.args.seed, stream, rollout_index, k)) for k in keys]
        return torch.stack(noise).to(self.accelerator.device)

    def _show_phase(self, phase: str) -> None:
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "set_phase"):
                callback.set_phase(phase)

    def _generate_and_score(self, rows: list[dict[str, Any]], rollout_index: int) -> list[TrainBatch]:
        """Sample, score and build the round's training micro-batches, complete with their advantages."""
        args, device = self.args, self.accelerator.device
        self._show_phase("sampling")
        prompts = [row["prompt"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        local_size = len(prompts)
        offset = self.context_parallel.data_parallel_rank * local_size  # a context-parallel group samples as one
        global_indices = list(range(offset, offset + local_size))

        plan = self.algorithm.plan(rollout_index)
        row_embeds = self.prompt_encoder.rows(prompts, columns)  # once per distinct prompt (and source image)
        negative_embeds = self._negative_embeddings()
        latents = self._initial_latents(global_indices, Stream.INIT_NOISE, rollout_index)
        generators = [keyed_generator(args.seed, Stream.SDE_NOISE, rollout_index, i) for i in global_indices]

        # By default sampling runs in the micro-batches training will use: the first training pass then repeats the
        # sampling forwards exactly, so its ratio is exactly 1.
        chunks = _chunks(local_size, args.per_device_sample_batch_size)
        chunk_embeds = [row_embeds.index(chunk) for chunk in chunks]
        rollouts, scored = [], []  # scored: futures or score tensors, one per sampled batch
        local_images: list = []  # kept for group-wise rewards, scored once the round is complete
        local_audios: list = []  # and each video's sound, for a family that makes it (LTX-2)
        signal_inputs = type(self.algorithm).signal_inputs(args)
        local_features = []  # for an algorithm whose training signal reads image features
        self.adapter.denoiser.eval()
        for chunk, embeds in zip(chunks, chunk_embeds):
            rollout = self.algorithm.sample(embeds, negative_embeds, latents[chunk], generators[chunk], plan)
            rollouts.append(rollout)
            decoded = self._decode(rollout.final_latents)
            if self.rewards.has_group_rewards:
                local_images.extend(decoded)
                local_audios.extend(getattr(decoded, "audios", []))
            if "image_features" in signal_inputs:
                local_features.append(self.algorithm.image_features(decoded).to(device))
            score = partial(
                self.rewards,
                prompts[chunk],
                decoded,
                {key: values[chunk] for key, values in columns.items()},
                trainer_state=self.state,
            )
            # Scoring a micro-batch in the worker thread overlaps it with sampling the next one (as Flow-GRPO does).
            scored.append(self._scorer().submit(score) if self.args.overlap_reward_scoring else score())
        self._show_phase("scoring")
        local_rewards = torch.cat([s.result() if isinstance(s, Future) else s for s in scored]).to(device)
        if not self.rewards.has_group_rewards:
            _refuse_unscored(local_rewards, prompts)
        # (generation batch, num_funcs), in global order; each context-parallel group's once
        rewards = self.context_parallel.one_per_group(self.accelerator.gather(local_rewards))
        if self.rewards.has_group_rewards:
            if local_audios:  # group-wise rewards get `audios=` as per-sample ones do
                local_images = VideosWithAudio(local_images, local_audios)
            rewards = self._score_groups(rewards, prompts, local_images, columns)
        total = self.rewards.total(rewards)
        inputs: dict[str, Any] = {}
        if "reward_names" in signal_inputs:
            inputs["reward_names"] = list(self.rewards.names)
        if "image_features" in signal_inputs:
            features = self.accelerator.gather(torch.cat(local_features))  # in global order
            inputs["image_features"] = self.context_parallel.one_per_group(features)
        # on the algorithm object: a signal that keeps state across rounds is a method
        signal = self.algorithm.training_signal(rewards, self.rewards.weights, args, **inputs)
        advantages, reward_advantages = signal[0], signal[1]
        extras = signal[2] if len(signal) > 2 else {}
        if not bool(torch.isfinite(advantages).all()):  # the same on every process: computed from the gathered rewards
            raise ValueError(
                f"The advantages of generation round {rollout_index} are not finite: the weighted reward totals "
                f"(from {total.min().item():.4g} to {total.max().item():.4g}) overflow float32 when summed, centred "
                "and scaled. Scale the rewards down (the reward functions' values or reward_weights)."
            )
        self._log_rewards(rewards, total, advantages, reward_advantages)
        for key, value in plan.metrics.items():
            self._metrics["train"][key].append(value)
        local_advantages = advantages[offset : offset + local_size]
        local_totals = total[offset : offset + local_size]
        local_groups = torch.tensor(global_indices, device=device) // args.num_generations
        local_extras = {key: values[offset : offset + local_size] for key, values in extras.items()}
        train_chunks = _chunks(local_size, args.per_device_train_batch_size)
        if train_chunks != chunks:  # sampled in batches of another size: cut the round into training micro-batches
            whole = type(rollouts[0]).cat(rollouts)
            rollouts = [whole.select(chunk) for chunk in train_chunks]
            chunks, chunk_embeds = train_chunks, [row_embeds.index(chunk) for chunk in train_chunks]
        return [
            TrainBatch(
                rollout,
                embeds,
                negative_embeds,
                local_advantages[chunk],
                plan.train_steps,
                rewards=local_totals[chunk],
                group_ids=local_groups[chunk],
                extras={key: values[chunk] for key, values in local_extras.items()},
            )
            for rollout, embeds, chunk in zip(rollouts, chunk_embeds, chunks)
        ]

    def _score_groups(
        self, rewards: torch.Tensor, prompts: list[str], images: list, columns: dict[str, list]
    ) -> torch.Tensor:
        """Fill the group-wise rewards' columns of the round's gathered `rewards`: every process gathers the round's
        images, scores its share of the groups (group `g` on process `g % num_processes`), and the shares are
        gathered back, so that each group is scored once, whatever the process layout. Videos with their audio
        (`VideosWithAudio`) keep it: the audio is gathered as the frames are."""
        accelerator, n = self.accelerator, self.args.num_generations
        if accelerator.num_processes > 1:
            audios = getattr(images, "audios", None)
            once = self.context_parallel.one_per_group  # a context-parallel group's processes hold the same rows
            prompts, images = once(gather_object(prompts)), once(gather_object(list(images)))  # plain lists
            if audios is not None:
                images = VideosWithAudio(images, once(gather_object(audios)))
            columns = {key: once(gather_object(values)) for key, values in columns.items()}
        groups = range(accelerator.process_index, len(images) // n, accelerator.num_processes)
        scores = self.rewards.score_groups(
            prompts, images, columns, num_generations=n, groups=groups, trainer_state=self.state
        ).to(rewards.device)
        if accelerator.num_processes > 1:
            shares = accelerator.gather(scores.unsqueeze(0))  # (processes, N, F): NaN outside each one's groups
            scored = ~torch.isnan(shares)
            scores = torch.where(scored.any(dim=0), shares.nan_to_num().sum(dim=0), float("nan"))
        groupwise = torch.tensor(self.rewards.groupwise, device=rewards.device)
        rewards = torch.where(groupwise, scores, rewards)
        _refuse_unscored(rewards, prompts)  # the same tensor on every process: all raise together
        return rewards

    def _log_rewards(
        self, rewards: torch.Tensor, total: torch.Tensor, advantages: torch.Tensor, reward_advantages: torch.Tensor
    ) -> None:
        metrics = self._metrics["train"]
        for j, name in enumerate(self.rewards.names):
            metrics[reward_key(name, "mean")].append(torch.nanmean(rewards[:, j]))
            valid = rewards[:, j][~torch.isnan(rewards[:, j])]
            metrics[reward_key(name, "std")].append(valid.std(unbiased=False) if len(valid) else 0.0)
            if len(self.rewards) > 1:
                # How much each reward drives the advantage trained on: under "sum", a reward on a small scale
                # correlates with it only weakly, whatever its weight.
                metrics[advantage_key(name, "abs_mean")].append(reward_advantages[:, j].abs().mean())
                metrics[advantage_key(name, "corr")].append(_correlation(reward_advantages[:, j], advantages))
        grouped = total.view(-1, self.args.num_generations)
        metrics[Stat.REWARD].append(total.mean())
        metrics[Stat.REWARD_STD].append(total.std(unbiased=False))
        metrics[Stat.FRAC_REWARD_ZERO_STD].append((grouped.std(dim=1) == 0).float().mean())
        metrics[Stat.ADVANTAGES_ABS_MEAN].append(advantages.abs().mean())
        metrics[Stat.ADVANTAGES_MAX].append(advantages.max())
        metrics[Stat.ADVANTAGES_MIN].append(advantages.min())

    # ---- training -----------------------------------------------------------------------------------------------
    def training_step(
        self, model: torch.nn.Module, inputs: list[dict[str, Any]], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step is None:  # fresh start or resume: derive the micro-step counter from the restored state
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
        if self._step % generate_every == 0 or self._buffered_batches is None:
            round_index = self._step // generate_every
            self.algorithm.on_round_start(round_index, self.state.global_step)
            self._buffered_batches = self._generate_and_score(inputs, rollout_index=round_index)
            self.adapter.denoiser.train()  # as the training forwards run
            self.algorithm.before_first_update(self._buffered_batches)
        batch = self._buffered_batches[self._step % self.args.steps_per_generation]
        self._step += 1

        self.adapter.denoiser.train()
        # DDP's wrapper: the policy's forwards go through it, so its hooks average the gradients (FSDP2 shards the
        # module in place, and `model` is then the denoiser itself).
        self.adapter.distributed_denoiser = model if model is not self.adapter.denoiser else None
        self._show_phase("training")
        loss = self._train_on_batch(batch, model)
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss  # read before the step
        return loss

    def _train_on_batch(self, batch: TrainBatch, model: torch.nn.Module) -> torch.Tensor:
        """One backward per training unit, so activations of only one unit are alive at a time. The loss is the mean
        over units and accumulated micro-batches.

        Gradients are synchronised across processes once per optimizer step: the Trainer already disables it for
        every micro-batch but the last, and here every unit but the last of that micro-batch runs under `no_sync`."""
        scale = 1.0 / (len(batch.train_steps) * self.current_gradient_accumulation_steps)
        params = self._trainable_parameters
        metrics = self._metrics["train"]
        total = torch.zeros((), device=self.accelerator.device)
        # FSDP2 keeps the gradients of unsynchronised backwards outside `.grad`, where no difference can see them.
        # Nor can a context-parallel process, which holds its own tokens' share of each gradient only.
        measure_grad_norm = (
            self.args.log_timestep_grad_norm
            and self._logs_this_step()
            and not distributed.is_fsdp2(self.accelerator)
            and not self.context_parallel.enabled
        )
        # DDP and FSDP2 average over every process, and a context-parallel group's gradient is the sum of its own
        grad_scale = scale * self.context_parallel.degree
        last = len(batch.train_steps) - 1
        for index, unit in enumerate(batch.train_steps):
            defer_sync = self.accelerator.sync_gradients and index < last
            with self.accelerator.no_sync(model) if defer_sync else contextlib.nullcontext():
                loss, stats = self.algorithm.loss(batch, unit)
                if measure_grad_norm:
                    stats[Stat.GRAD_NORM] = self._unit_grad_norm(loss * scale, params, defer_sync) / scale
                else:
                    self.accelerator.backward(loss * grad_scale)
            for key, value in stats.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                metrics[timestep_key(unit, key)].append(value)
                # the plain `grad_norm` is the Trainer's: the norm of the whole step's gradient, which
                # `max_grad_norm` clips; a mean of the units' norms under that key would replace it in the logs
                if key != Stat.GRAD_NORM:
                    metrics[key].append(value)
            total += loss.detach()
        return total * scale

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step being accumulated will be logged: per-timestep gradient norms, which cost a
        copy of the gradients per timestep, are measured only then."""
        every = self.state.logging_steps or self.args.logging_steps
        return self.args.logging_strategy == "steps" and (self.state.global_step + 1) % max(1, int(every)) == 0

    def _unit_grad_norm(self, loss: torch.Tensor, params: list[torch.nn.Parameter], defer_sync: bool) -> torch.Tensor:
        """Backpropagate `loss` and return the norm of the gradient it added on this process.

        Read as the change of `.grad`, unless this backward averages gradients over processes (the change would then
        mix in the other processes' earlier units): that unit's gradient is taken once more with `autograd.grad`,
        one extra backward per logged optimizer step."""
        if self.accelerator.num_processes > 1 and not defer_sync:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            self.accelerator.backward(loss)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
        else:
            before = [p.grad.clone() if p.grad is not None else None for p in params]
            self.accelerator.backward(loss)
            squares = [
                ((p.grad - g).float() if g is not None else p.grad.float()).pow(2).sum()
                for p, g in zip(params, before)
                if p.grad is not None
            ]
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=loss.device)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """`Trainer._get_grad_norm`: the step's gradient norm (the one `max_grad_norm` clips), measured right before
        each optimizer step, which makes it the place to refuse a non-finite step before it reaches the weights."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_finite_step(grad_norm)
        return grad_norm

    def _check_finite_step(self, grad_norm: Any) -> None:
        """Raise `TrainingDivergedError` when the loss or the gradient norm of the optimizer step about to be taken is
        not finite (on any process), naming the step and the last finite one.

        transformers would log a NaN loss as the mean of the earlier ones and step the optimizer with NaN gradients,
        after which every sample, reward and saved weight is garbage. Raised before the step, it leaves the weights,
        the EMA and the checkpoints as the earlier steps made them. It costs one host transfer per optimizer step (and
        with several processes one all-reduce of two flags, so that all of them stop together), none per unit."""
        device = self.accelerator.device
        loss = self._step_loss if self._step_loss is not None else torch.zeros((), device=device)
        self._step_loss = None
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP2
        values = torch.stack(
            [loss.detach().float().reshape(()), torch.as_tensor(norm, dtype=torch.float32, device=device).reshape(())]
        )
        flags = (~torch.isfinite(values)).float()
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        loss_value, norm_value, loss_flag, norm_flag = torch.cat([values, flags]).tolist()
        step = self.state.global_step + 1
        if not (loss_flag or norm_flag):
            self._last_finite_step = (step, loss_value, norm_value)
            return
        where = " (on at least one process)" if self.accelerator.num_processes > 1 else ""
        if self._last_finite_step is not None:
            last_step, last_loss, last_norm = self._last_finite_step
            last = f"The last finite step was {last_step}: loss {last_loss:.4g}, gradient norm {last_norm:.4g}."
        else:
            last = "It is the first step of this run (or since its resume)."
        raise TrainingDivergedError(
            f"Training diverged at optimizer step {step}: the loss is {loss_value:.4g} and the gradient norm "
            f"{norm_value:.4g}{where}. {last} Step {step} was not taken, so the weights and the checkpoints in "
            f"{self.args.output_dir} are those of the earlier steps. Lower learning_rate (it is "
            f"{self.args.learning_rate:g}), keep max_grad_norm > 0 (it is {self.args.max_grad_norm:g}), and start "
            "again or resume from the last checkpoint."
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`transformers.Trainer.train`, which first refuses, naming the fix, to train without a train_dataset, to
        start afresh over `output_dir`'s checkpoints or finished model (unless `args.overwrite_output_dir`), or to
        resume from a damaged checkpoint or under settings that change what the checkpoint means (model, loss type,
        group size, LoRA rank or targets, or for a mid-round checkpoint how the round is cut into micro-batches).

        A fresh run with `overwrite_output_dir` first moves an earlier run's checkpoints and model into
        `output_dir/previous-run-K/`; a resume restores the over-optimisation alarms' state from the checkpoint. A
        resume from the checkpoint that ended its run (at `max_steps`, or where an alarm stopped it) takes no step: it
        loads that checkpoint's weights and state and ends training as the run did (a stopped alarm restores its
        best weights); raise `max_steps` to train on."""
        if self.train_dataset is None:
            raise ValueError(
                "train() needs a train_dataset: pass the prompts as GuardGRPODiffusionTrainer(train_dataset=...), a "
                "datasets.Dataset with a 'prompt' column."
            )
        self._check_alarm_metrics(self.callback_handler.callbacks, self.args)  # also those added by add_callback
        checkpoint = checkpoints.resolve_resume(
            self.args.output_dir, resume_from_checkpoint, self.args.overwrite_output_dir
        )
        if checkpoint is None:
            checkpoints.check_no_finished_run(self.args.output_dir, self.args.overwrite_output_dir)
            if self.args.overwrite_output_dir:
                if self.args.should_save:  # the process that writes output_dir's files
                    checkpoints.move_previous_run(self.args.output_dir)
                self.accelerator.wait_for_everyone()
        else:
            state = checkpoints.verify_checkpoint(checkpoint)
            checkpoints.check_run_settings(checkpoint, self.run_settings())
            self._check_mid_round_buffer(checkpoint, state.get("global_step", 0))
            self._restore_alarms(checkpoint, state)
            if self._run_ended_at(state):
                return self._end_from(checkpoint)
        try:
            output = super().train(checkpoint, *args, **kwargs)
        finally:
            self._close_scorer()
        self._after_alarm_restore()
        return output

    def _run_ended_at(self, trainer_state: dict[str, Any]) -> bool:
        """Whether the checkpoint whose `trainer_state` this is ends the run: it is at this run's `max_steps`, or a
        callback (an over-optimisation alarm) stopped the run there before its `max_steps`. transformers' loop checks
        for the end only after a step, so it would train one more."""
        step = trainer_state.get("global_step", 0)
        control = (trainer_state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
        control = control[0] if isinstance(control, list) else control
        stopped = control.get("args", {}).get("should_training_stop", False)
        return 0 < self.args.max_steps <= step or (stopped and step < trainer_state.get("max_steps", 0))

    def _end_from(self, checkpoint: str) -> TrainOutput:
        """Finish a run resumed from the checkpoint that ends it, without a step: its weights, state and log are the
        checkpoint's, and the callbacks see the end of training (a stopped alarm restores its best weights)."""
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        self._load_checkpoint_weights(checkpoint, sharded=False)  # nothing is sharded before the training loop
        logger.warning(f"{checkpoint} ends the run (step {self.state.global_step}): nothing is left to train.")
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        self._after_alarm_restore()
        losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        return TrainOutput(self.state.global_step, float(np.mean(losses)) if losses else 0.0, {})

    def _after_alarm_restore(self) -> None:
        restored = any(alarm.restore_best and alarm.stop_reason is not None for alarm in self._alarms())
        if restored and self.ema is not None:
            self.ema.reset()  # the restored weights were the evaluated EMA: keep averaging from them

    def _scorer(self) -> ThreadPoolExecutor:
        """The worker thread that scores a micro-batch while the next one samples (`overlap_reward_scoring`)."""
        if self._scoring_pool is None:
            self._scoring_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-guard-scoring")
        return self._scoring_pool

    def _close_scorer(self) -> None:
        """Join the scoring thread when training ends, so that no thread of ours outlives `train()`: one still
        alive while the interpreter and torch.distributed shut down is a hazard, not a saving."""
        if self._scoring_pool is not None:
            self._scoring_pool.shutdown(wait=True)
            self._scoring_pool = None

    def _alarms(self) -> list[OverOptimizationCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, OverOptimizationCallback)]

    def _restore_alarms(self, checkpoint: str, trainer_state: dict[str, Any]) -> None:
        """Put each over-optimisation alarm back in the state `checkpoint` saved (its counts, from `trainer_state`'s
        `stateful_callbacks`, and its kept best weights): a fresh alarm would count anew and stop at another step.
        Alarms are matched in order, as transformers matches stateful callbacks of one class."""
        saved = trainer_state.get("stateful_callbacks") or {}
        taken: dict[str, int] = defaultdict(int)
        for index, alarm in enumerate(self._alarms()):
            name = type(alarm).__name__
            states = saved.get(name, [])
            states = states if isinstance(states, list) else [states]
            if taken[name] >= len(states):
                logger.warning(f"{checkpoint} holds no state for {name} #{taken[name]}: it starts counting afresh.")
                continue
            weights_path = os.path.join(checkpoint, checkpoints.alarm_weights_name(index))
            weights = checkpoints.read_safetensors(weights_path) if os.path.exists(weights_path) else None
            alarm.load_state(states[taken[name]], weights)
            taken[name] += 1

    def _load_callback_state(self) -> None:
        """transformers' restore of stateful callbacks (with `restore_callback_states_from_checkpoint`), except for the
        alarms, which `train()` restored in place: transformers would replace them by new instances, without their
        kept weights and unknown to whoever holds the alarm."""
        saved = self.state.stateful_callbacks
        kept = {name: saved.pop(name) for name in {type(cb).__name__ for cb in self._alarms()} if name in saved}
        try:
            super()._load_callback_state()
        finally:
            saved.update(kept)

    def _round_is_open(self, global_step: int) -> bool:
        """Whether optimizer step ``global_step`` ends in the middle of a generation round."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return (global_step * self.args.gradient_accumulation_steps) % generate_every != 0

    def _check_mid_round_buffer(self, checkpoint: str, global_step: int) -> None:
        """A checkpoint saved in the middle of a round resumes only from its rollout buffer: refuse when it is missing
        (resampling would train the rest of the round on data from the already-updated policy)."""
        buffer = os.path.join(checkpoint, rollout_buffer_name(self.accelerator.process_index))
        if self._round_is_open(global_step) and not os.path.exists(buffer):
            raise ValueError(
                f"Cannot resume from {checkpoint}: it was saved in the middle of a generation round (step "
                f"{global_step}), and the round's rollout buffer {buffer} is missing, so the rest of the round cannot "
                "be trained on the data it was sampled with. Resume from a checkpoint at the end of a round, or "
                "restore the file."
            )

    def compute_loss(self, *args, **kwargs):
        raise NotImplementedError("GuardGRPODiffusionTrainer computes its loss per training unit in `training_step`.")

    # ---- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Sample one image per eval prompt with the ODE (`eval_num_inference_steps`, seeds fixed by the prompt's
        row) and log the mean of each training reward, `{prefix}_rewards/{name}`, of their weighted sum,
        `{prefix}_reward`, and of each gold reward, `{prefix}_gold/{name}`. A grid of the first images is written to
        `{output_dir}/eval_images/` and sent to the trackers that take images (tensorboard, wandb, trackio)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (pass it to the trainer or to evaluate()).")
        preflight.check_prompt_dataset(dataset, "eval_dataset")
        dataset = preflight.as_dataset(dataset)
        preflight.check_condition_columns({"eval_dataset": dataset}, type(self.pipeline).__name__)
        preflight.check_reward_columns({"eval_dataset": dataset})
        with self._ema_weights():  # callbacks see the weights that were evaluated
            metrics = self._evaluate_dataset(dataset, metric_key_prefix)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _ema_weights(self):
        """The EMA weights in the model for the duration of a block (nothing changes without an EMA)."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _evaluate_dataset(self, dataset: Dataset, metric_key_prefix: str) -> dict[str, float]:
        args, adapter = self.args, self.adapter
        reward_sets = [self.rewards] + ([self.gold_rewards] if self.gold_rewards is not None else [])
        layout = self.context_parallel  # a context-parallel group evaluates its rows together
        indices, real_rows = distributed.balanced_rows(
            len(dataset), layout.data_parallel_rank, layout.data_parallel_size
        )
        sigmas = adapter.sigmas(args.eval_num_inference_steps)
        adapter.denoiser.eval()
        rows_scores, grid_images, rows_kl = [], [], []
        grid_audios = []  # each grid video's sound, for a family that makes it (LTX-2)
        for start in range(0, len(indices), args.per_device_eval_batch_size):
            chunk = indices[start : start + args.per_device_eval_batch_size]
            rows = dataset.select(chunk)
            prompts = list(rows["prompt"])
            columns = {key: list(rows[key]) for key in rows.column_names if key != "prompt"}
            prompt_embeds = self.prompt_encoder.rows(prompts, columns)
            latents = sample_ode(
                adapter,
                prompt_embeds,
                self._negative_embeddings(),
                self._initial_latents(chunk, Stream.EVAL_NOISE, 0),
                sigmas,
            )
            images = self._decode(latents)
            shown = max(0, 16 - len(grid_images))
            grid_images.extend(self._grid_entries(images, columns)[:shown])
            grid_audios.extend(getattr(images, "audios", [])[:shown])
            scores = [rewards(prompts, images, columns, trainer_state=self.state) for rewards in reward_sets]
            rows_scores.extend(torch.cat(scores, dim=1).tolist())
            if args.eval_kl:
                rows_kl.extend(self._kl_to_reference(prompt_embeds, chunk).tolist())
        rows_scores, rows_kl = rows_scores[:real_rows], rows_kl[:real_rows]  # without the padding rows
        if self.accelerator.num_processes > 1:
            rows_scores, rows_kl = layout.gather_rows(rows_scores), layout.gather_rows(rows_kl)
        scores = torch.tensor(rows_scores, dtype=torch.float32).view(-1, sum(len(r) for r in reward_sets))
        proxy, gold = scores[:, : len(self.rewards)], scores[:, len(self.rewards) :]
        metrics = {
            eval_rewards_key(n, metric_key_prefix): torch.nanmean(proxy[:, j]).item()
            for j, n in enumerate(self.rewards.names)
        }
        metrics[eval_reward_key(metric_key_prefix)] = self.rewards.total(proxy).mean().item()
        if self.gold_rewards is not None:
            metrics.update(
                {
                    eval_gold_key(n, metric_key_prefix): torch.nanmean(gold[:, j]).item()
                    for j, n in enumerate(self.gold_rewards.names)
                }
            )
        if rows_kl:
            metrics[eval_kl_key(metric_key_prefix)] = float(np.mean(rows_kl))
        if self.is_world_process_zero() and grid_images:
            log_image_grid(self, grid_images, f"{metric_key_prefix}_images")
            if grid_audios:
                log_audio(self, grid_audios, f"{metric_key_prefix}_audio")
        return metrics

    def _grid_entries(self, images: list, columns: dict[str, list]) -> list:
        """What the evaluation grid shows per sample: the sample, or for an editing family the row's source image (or
        each of its several, in order) at the training resolution and the edit, side by side. For an image-to-video
        family the source leads the video's frames, so that the strip (and the GIF) shows it first."""
        if "image" not in self.adapter.condition_columns:
            return images
        size = (self.args.width, self.args.height)
        entries = []
        for sources, edit in zip(columns["image"], images):
            sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
            tiles = [source.convert("RGB").resize(size, Image.LANCZOS) for source in sources]
            is_video = isinstance(edit, (list, tuple))
            entries.append([*tiles, *edit] if is_video else make_grid([*tiles, edit], columns=len(tiles) + 1))
        return entries

    def _kl_to_reference(self, prompt_embeds: PromptEmbeddings, indices: list[int]) -> torch.Tensor:
        """Per prompt: the policy's path KL from the reference (`path_kl_to_reference`) along one SDE trajectory of
        the configured schedule, with noise fixed by the prompt's row."""
        args = self.args
        return path_kl_to_reference(
            self.adapter,
            SDESchedule.from_config(args),
            prompt_embeds,
            self._negative_embeddings(),
            self._initial_latents(indices, Stream.EVAL_NOISE, 0),
            self.adapter.sigmas(args.num_inference_steps),
            [keyed_generator(args.seed, Stream.EVAL_NOISE, 1, i) for i in indices],
        )

    # ---- logging ------------------------------------------------------------------------------------------------
    def _reduce_metrics(self, mode: str) -> dict[str, float]:
        """The mean of each statistic of ``mode`` since the last log, over the whole batch of every process, then
        cleared. A collective when there are several processes: every process calls it (as `Trainer.log` runs on each).

        Each logged value is one micro-batch's statistic (of one training unit). Statistics stay tensors on the device
        while training and reach the host here in one transfer (each `.item()` on a GPU is a synchronisation); with
        several processes they first cross in one gather (`_whole_batch`), which turns each micro-batch's values on
        the processes into the whole micro-batch's. The values are then averaged over the logging window, so that one
        process logs exactly what it always has."""
        device = self.accelerator.device
        series = {
            key: torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])
            for key, values in self._metrics[mode].items()
        }
        self._metrics[mode].clear()
        if self.accelerator.num_processes > 1:
            series = self._whole_batch(series)
        if not series:
            return {}
        return dict(zip(series, torch.stack([values.mean() for values in series.values()]).tolist()))

    def _whole_batch(self, series: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every process's values of each statistic, combined micro-batch by micro-batch into the whole batch's.

        The processes train the same units on as many samples each, so they log the same keys with as many values:
        the mean of their values is the whole batch's mean (the rewards, gathered before they are logged, are the same
        on every process and stay as they are), and a log-ratio spread is pooled from the processes' spreads and
        means. Should the processes' statistics differ all the same, each key is the mean of the processes'
        window means, over the processes that have it."""
        keys = sorted(series)
        lengths = [len(series[key]) for key in keys]
        layouts = gather_object([(keys, lengths)])
        if any(layout != (keys, lengths) for layout in layouts):
            windows = gather_object([{key: values.mean().item() for key, values in series.items()}])
            union = sorted({key for window in windows for key in window})
            return {
                key: torch.tensor(
                    [float(np.mean([w[key] for w in windows if key in w]))], device=self.accelerator.device
                )
                for key in union
            }
        if not keys:
            return {}
        table = self.accelerator.gather(torch.cat([series[key] for key in keys]).unsqueeze(0))  # (processes, values)
        per_key = dict(zip(keys, table.split(lengths, dim=1)))
        whole = {key: values.mean(dim=0) for key, values in per_key.items()}
        for key, spreads in per_key.items():
            step = parse_timestep_key(key)
            stat = step[1] if step is not None else key
            means_key = timestep_key(step[0], Stat.LOG_RATIO_MEAN) if step is not None else Stat.LOG_RATIO_MEAN
            if stat == Stat.LOG_RATIO_STD and means_key in per_key:
                means = per_key[means_key]
                whole[key] = (spreads.square() + (means - means.mean(dim=0)).square()).mean(dim=0).sqrt()
        return whole

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if any(key.startswith("eval_") for key in logs):
            logs = {**logs, **{f"eval_{k}": v for k, v in self._reduce_metrics("eval").items()}}
        else:
            logs = {**logs, **self._reduce_metrics("train")}
        super().log(logs, start_time)

    # ---- saving -------------------------------------------------------------------------------------------------
    def run_settings(self) -> dict[str, Any]:
        """What a checkpoint of this run only makes sense under; a resume compares it with the checkpoint's."""
        lora = getattr(self.adapter.denoiser, "peft_config", {}).get("default")
        settings = {
            "model": self._base_model if isinstance(self._base_model, str) else None,
            "model_fingerprint": self._model_fingerprint,
            "model_family": type(self.adapter).__name__,
            **self.algorithm.describe(),
            "num_generations": self.args.num_generations,
            "lora_r": lora.r if lora is not None else None,
            "lora_target_modules": sorted(lora.target_modules) if lora is not None else None,
            "trains_lora": lora is not None,
        }
        return json.loads(json.dumps(settings))  # as it reads back from the checkpoint

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the LoRA in the family's diffusers format (or the full denoiser in the pipeline's `from_pretrained`
        layout): the adapter names the files. `state_dict` is the denoiser's full state gathered by the Trainer when
        FSDP shards it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.adapter.has_lora:
            self.adapter.save_lora(output_dir, state_dict=state_dict)
        else:
            self.adapter.save_full(output_dir, state_dict=state_dict)
        # JSON rather than the Trainer's pickled training_args.bin: tokens are redacted and nothing needs unpickling.
        with open(os.path.join(output_dir, "guard_config.json"), "w") as f:
            f.write(self.args.to_json_string())
        with open(os.path.join(output_dir, "log_history.json"), "w") as f:  # what `trl-guard report` draws
            json.dump(self.state.log_history, f)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, with the EMA weights in the model while it saves (and while FSDP2 gathers them)."""
        with self._ema_weights():
            super().save_model(output_dir, _internal_call)

    def _get_output_dir(self, trial: Any) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, checkpoints.STAGING) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write the checkpoint under `{output_dir}/.staging/` and move it into place only once complete, so a run
        killed while saving leaves the previous checkpoints untouched and no half-written `checkpoint-N`."""
        from safetensors.torch import save_file

        run_dir = self._get_output_dir(trial)
        for value in self.state.stateful_callbacks.values():
            # transformers appends each save's states of a class it holds several callbacks of to the last save's:
            # start the list afresh, so the checkpoint holds this step's states only
            if isinstance(value, list):
                value.clear()
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_checkpoint = False
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = os.path.join(run_dir, checkpoints.STAGING, name)
        if self._buffered_batches is not None and self._round_is_open(self.state.global_step):
            # Saved in the middle of a generation round: keep the round's data so a resume trains on it unchanged
            # instead of resampling it with the already-updated policy.
            path = os.path.join(staged, rollout_buffer_name(self.accelerator.process_index))
            save_rollout_buffer(self._buffered_batches, path, buffer_layout(self.args))
        # Gathered on every process: under FSDP2 each tensor is a collective.
        ema_state = self.ema.state_dict() if self.ema is not None else None
        algorithm_state = self.algorithm.state_dict()
        if self.args.should_save:
            checkpoints.write_run_settings(staged, self.run_settings())
            if ema_state is not None:  # the model files hold the EMA; training resumes from the live weights kept here
                save_file(ema_state, os.path.join(staged, checkpoints.EMA_STATE_NAME))
            if algorithm_state:
                save_file(algorithm_state, os.path.join(staged, checkpoints.ALGORITHM_STATE_NAME))
            for index, alarm in enumerate(self._alarms()):  # the best-gold weights a resumed alarm must restore
                # (under FSDP2 the alarm keeps each process's shards, which one file cannot hold: not saved there)
                if alarm.best_weights and not distributed.is_fsdp2(self.accelerator):
                    save_file(alarm.best_weights, os.path.join(staged, checkpoints.alarm_weights_name(index)))
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state into the staging folder
        if self.args.should_save:
            checkpoints.publish_checkpoint(run_dir, name, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _follow_sharded_weights(self) -> None:
        """Rebind the EMA and the algorithm's copies to the parameters FSDP2 made, and shard full fine-tuning's frozen
        reference as the policy is (once, after `prepare`)."""
        if self._copies_follow_shards:
            return
        trainable = {n: p for n, p in self.adapter.denoiser.named_parameters() if p.requires_grad}
        if self.ema is not None:
            self.ema.rebind(trainable, self.adapter.denoiser)
        self.algorithm.bind_parameters(trainable, self.adapter.denoiser)
        if self.adapter.reference_denoiser is not None:
            distributed.shard_like_policy(self.accelerator, self.adapter.reference_denoiser)
        self._copies_follow_shards = True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        sharded = distributed.is_fsdp2(self.accelerator)
        if sharded:  # called after `prepare`: the copies must hold shards first
            self._follow_sharded_weights()
        self._load_checkpoint_weights(resume_from_checkpoint, sharded)

    def _load_checkpoint_weights(self, resume_from_checkpoint: str, sharded: bool) -> None:
        """The checkpoint's rollout buffer, trainable weights, algorithm state and EMA; `sharded` when FSDP2 has
        sharded the denoiser (the files hold full tensors either way)."""
        device = str(self.accelerator.device)
        buffer = os.path.join(resume_from_checkpoint, rollout_buffer_name(self.accelerator.process_index))
        if os.path.exists(buffer):
            self._buffered_batches = load_rollout_buffer(
                buffer, device, buffer_layout(self.args), type(self.algorithm).rollout_type
            )
        if self.adapter.has_lora:
            self.adapter.load_lora(resume_from_checkpoint, sharded=sharded)
        else:
            state = self.adapter.full_weights(resume_from_checkpoint)
            distributed.load_full_state(self.adapter.denoiser, state)
        algorithm_state = os.path.join(resume_from_checkpoint, checkpoints.ALGORITHM_STATE_NAME)
        if os.path.exists(algorithm_state):
            self.algorithm.load_state_dict(checkpoints.read_safetensors(algorithm_state, device))
        if self.ema is not None:
            ema_state = os.path.join(resume_from_checkpoint, checkpoints.EMA_STATE_NAME)
            if os.path.exists(ema_state):
                self.ema.load_state_dict(checkpoints.read_safetensors(ema_state, device))
            else:  # a checkpoint written without an EMA: start averaging from its weights
                self.ema.reset()

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Write the diffusers-flavoured model card (`README.md`) into `output_dir`."""
        if self.is_world_process_zero():
            write_model_card(self, self.args.output_dir, self._base_model, type(self.pipeline).__name__)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """Upload the LoRA (diffusers format), `guard_config.json`, the model card and sample images. A failed upload
        leaves `output_dir` as it is and says so."""
        try:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)
        except Exception as error:
            repo = self.hub_model_id or self.args.hub_model_id
            raise RuntimeError(
                f"Uploading {self.args.output_dir} to the Hub repository {repo!r} failed ({type(error).__name__}: "
                f"{error}). The trained model and its card are intact in {self.args.output_dir}; retry with "
                "trainer.push_to_hub() or `hf upload`."
            ) from error


def _refuse_unscored(rewards: torch.Tensor, prompts: list[str]) -> None:
    missing = torch.isnan(rewards).all(dim=1)
    if missing.any():
        prompt = prompts[int(missing.nonzero()[0])]
        raise ValueError(
            f"Every reward function returned None for prompt {prompt!r}: at least one must score each sample."
        )


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson's correlation of two vectors; 0 when either is constant. Stays on the device (no host sync)."""
    a, b = a.float() - a.float().mean(), b.float() - b.float().mean()
    scale = (a.square().sum() * b.square().sum()).sqrt()
    return torch.where(scale > 0, (a * b).sum() / scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def _chunks(size: int, chunk: int) -> list[slice]:
    """``range(size)`` cut into consecutive slices of ``chunk``."""
    return [slice(start, start + chunk) for start in range(0, size, chunk)]
