"""The one interface the trainer uses to drive a text-to-image flow-matching pipeline.

An adapter wraps a diffusers pipeline object of one model family and exposes the few operations RL needs: encode
prompts once, draw initial latents, get the noise schedule, predict a velocity at one step (with batched CFG),
decode latents to PIL images, and save/load LoRA weights in the family's diffusers format. Nothing outside an
adapter knows a family's call signature.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image


@dataclass(frozen=True)
class SamplingSettings:
    """What an adapter needs to know about sampling, set once per run (from `GuardConfig`).

    `guidance_scale` is classifier-free guidance for families without a guidance embedding (SD3, Wan) and the
    guidance embedding's value for guidance-distilled ones (FLUX.1-dev); `true_cfg_scale` is real CFG for the latter.
    `num_frames` is the length of each sample for video families; image families take only 1.
    `sequence_multiple` is the context-parallel degree: diffusers splits each sequence a forward attends over into
    that many equal parts, so an adapter that trims a sequence per batch keeps its length a multiple of it.
    """

    height: int
    width: int
    guidance_scale: float = 1.0
    true_cfg_scale: float = 1.0
    max_sequence_length: int = 128
    num_frames: int = 1
    #: The low-noise expert's CFG scale for two-expert families (Wan2.2); None means `guidance_scale`.
    guidance_scale_2: float | None = None
    sequence_multiple: int = 1


@dataclass
class PromptEmbeddings:
    """Text conditioning for a batch: tensors keyed by the denoiser's argument names, batch dimension first."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def index(self, index: torch.Tensor | slice) -> PromptEmbeddings:
        return PromptEmbeddings({k: v[index] for k, v in self.tensors.items()})

    def expand(self, batch_size: int) -> PromptEmbeddings:
        return PromptEmbeddings({k: v.expand(batch_size, *v.shape[1:]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
        return PromptEmbeddings({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


class VideosWithAudio(list):
    """What `decode` returns for a family that makes sound with its videos (LTX-2): the videos, one list of PIL frames
    per sample as for every video family, that also carry `audios`, one `(waveform, sample_rate)` per sample
    (`waveform` a float32 numpy array `(channels, samples)`, as the pipeline's vocoder makes it).

    A list, so that everything that takes decoded videos takes these; slicing keeps each video's audio. Scoring passes
    `audios` to reward functions next to `images` (docs/rewards.md); families without audio never make one."""

    def __init__(self, videos: list, audios: list[tuple[np.ndarray, int]]):
        if len(videos) != len(audios):
            raise ValueError(f"{len(videos)} videos but {len(audios)} audios: give one audio per video.")
        super().__init__(videos)
        self.audios = list(audios)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return VideosWithAudio(list.__getitem__(self, index), self.audios[index])
        return list.__getitem__(self, index)


#: LoRA targets for MMDiT denoisers (SD3, FLUX): every attention projection of the image and text streams, as
#: Flow-GRPO trains SD3.5.
ATTENTION_PROJECTIONS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]

#: The registered adapter classes, in registration order: the order of the imports in `adapters/__init__.py`, the one
#: list of the families (see `get_adapter`).
ADAPTERS: list[type[PipelineAdapter]] = []


def register(cls: type[PipelineAdapter]) -> type[PipelineAdapter]:
    """Class decorator that adds a family's adapter to `ADAPTERS`: each adapter module registers its classes, and
    importing the module in `adapters/__init__.py` is what makes the family known. A subclass is not registered by
    subclassing (a test's or a family's intermediate class stays out)."""
    if not cls.pipeline_classes:
        raise ValueError(f"{cls.__name__} names no pipeline_classes: set the diffusers pipeline classes it drives.")
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def round_up(value: int, multiple: int) -> int:
    """The least multiple of `multiple` that is at least `value`.

    Example:
        >>> round_up(13, 2), round_up(14, 2), round_up(13, 1)
        (14, 14, 13)
    """
    return -(-value // multiple) * multiple


def rgb_image(image: Any, used_for: str) -> Image.Image:
    """A row's `image` as RGB, or a TypeError that says what it is `used_for` and how to give a column of PIL images.

    Example:
        >>> rgb_image("cat.png", "FLUX.1 Kontext edits the image")
        Traceback (most recent call last):
        ...
        TypeError: FLUX.1 Kontext edits the image in each row's `image` column, which holds a str. ...
    """
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"{used_for} in each row's `image` column, which holds a {type(image).__name__}. Give PIL images: a "
            "datasets.Image() column, or cast a column of file paths with `dataset.cast_column('image', "
            "datasets.Image())`."
        )
    return image.convert("RGB")


def check_resolution_multiple(
    height: int, width: int, multiple: int, *, model: str, reason: str, largest: int | None = None
) -> None:
    """Raise naming the field and a size that fits unless `height` and `width` are multiples of `multiple` pixels
    (and at most `largest`, if given). `reason` says where the multiple comes from, for the message."""
    limit = f" up to {largest}" if largest is not None else ""
    for name, value in (("height", height), ("width", width)):
        if value % multiple != 0 or (largest is not None and value > largest):
            suggestion = max(multiple, value // multiple * multiple)
            if largest is not None:
                suggestion = min(largest, suggestion)
            raise ValueError(
                f"{name}={value} does not fit {model}: it takes multiples of {multiple} pixels ({reason}){limit}. "
                f"Set {name} to, for example, {suggestion}."
            )


def check_frame_count(num_frames: int, temporal_factor: int, *, model: str) -> None:
    """Raise naming `num_frames` and a count that fits unless it is `temporal_factor * k + 1`: a video VAE that
    compresses time by `temporal_factor` keeps the first frame and encodes the rest in groups of that size."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor != 0:
        suggestion = max(0, num_frames - 1) // temporal_factor * temporal_factor + 1
        raise ValueError(
            f"num_frames={num_frames} does not fit {model}: its VAE compresses time by {temporal_factor}, so it takes "
            f"{temporal_factor}k + 1 frames. Set num_frames to, for example, {suggestion}."
        )


def loads_component(model_index: dict[str, Any], name: str) -> bool:
    """Whether a pipeline folder's `model_index.json` (with `model_init_kwargs` in place of its entries, as
    `from_pretrained` takes them) gives the pipeline the component `name`: `[null, null]` and `None` say it has none.

    Example:
        >>> loads_component({"transformer_2": [None, None]}, "transformer_2")
        False
    """
    entry = model_index.get(name)
    if isinstance(entry, (list, tuple)):
        return any(part is not None for part in entry)
    return entry is not None


class PipelineAdapter:
    """Base class of the model-family adapters. Subclasses fill in the family-specific methods."""

    #: Class names of the diffusers pipelines this adapter drives.
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: LoRA target modules used when a `peft_config` leaves `target_modules` unset.
    default_lora_target_modules: ClassVar[list[str]] = []
    #: Prefix of the denoiser's keys in the family's LoRA file (diffusers' `transformer_name`).
    lora_prefix: ClassVar[str] = "transformer"
    #: The pipeline components the trained denoiser spans, by their names in the pipeline. A full fine-tune saves
    #: each into the folder of its name (`save_full`), the layout `from_pretrained` reads a pipeline folder in.
    denoiser_components: ClassVar[tuple[str, ...]] = ("transformer",)
    #: Each component's LoRA file (`save_lora`). The first keeps diffusers' default name, so that the pipeline's
    #: `load_lora_weights(folder)` finds it alone.
    lora_weight_names: ClassVar[dict[str, str]] = {"transformer": "pytorch_lora_weights.safetensors"}
    #: The class whose `save_lora_weights` writes the LoRA files, or None for the pipeline's own class; set by a family
    #: whose pipeline has no LoRA loader mixin (HunyuanVideo 1.5 in diffusers 0.42) to one writing the same format.
    lora_file_writer: ClassVar[type | None] = None
    #: Whether `decode` returns videos (one list of frames per sample) rather than images.
    is_video: ClassVar[bool] = False
    #: Dataset columns the family is conditioned on besides the prompt, such as an editing model's source image
    #: (`("image",)`). The trainer requires them in its datasets and passes them to `encode_conditions`.
    condition_columns: ClassVar[tuple[str, ...]] = ()
    #: Whether the family has a second expert that `SamplingSettings.guidance_scale_2` guides (Wan2.2).
    takes_guidance_scale_2: ClassVar[bool] = False
    #: Whether diffusers' context-parallel plan splits the text tokens (`encoder_hidden_states`) as well as the
    #: latent ones, so that `max_sequence_length` must be a multiple of the degree (FLUX.1, FLUX.2, Qwen-Image, LTX-2).
    context_parallel_splits_text: ClassVar[bool] = False
    #: The largest `max_sequence_length` the family's pipeline takes: its own `__call__` refuses more (the check in
    #: its `check_inputs`), and the trainer would otherwise encode prompts the pipeline never could. None when the
    #: pipeline sets no limit.
    max_sequence_length_limit: ClassVar[int | None] = None
    #: Why the family cannot be sharded with FSDP2 (the error the trainer raises, before sampling), or None.
    fsdp2_refusal: ClassVar[str | None] = None

    @classmethod
    def saved_model_files(cls) -> tuple[str, ...]:
        """The files and folders a finished run or a checkpoint of this family keeps its model in: the LoRA files and
        a full fine-tune's component folders (`save_lora`, `save_full`). `checkpoints` reads them from every registered
        adapter, so that no other module lists a family's file names."""
        return (*cls.lora_weight_names.values(), *cls.denoiser_components)

    @classmethod
    def accepts(cls, pipeline: Any) -> bool:
        """Whether this adapter drives `pipeline`, among the pipelines of its `pipeline_classes`: a family sharing
        its pipeline class with another (Wan2.1 and Wan2.2 are both `WanPipeline`) tells them apart here."""
        return True

    @classmethod
    def accepts_model_index(cls, model_index: dict[str, Any]) -> bool:
        """`accepts` before loading, from a pipeline folder's `model_index.json`: its components (`[library, class]`,
        or `[null, null]` for an absent one, see `loads_component`) and its config values."""
        return True

    @classmethod
    def check_settings(cls, settings: SamplingSettings, pipeline_class: str) -> None:
        """The checks of `configure` that need the family only, not its weights: the trainer runs them before loading
        whenever the pipeline class is known (a pipeline object, or a local folder's `model_index.json`)."""
        if settings.guidance_scale_2 is not None and not cls.takes_guidance_scale_2:
            raise ValueError(
                f"guidance_scale_2={settings.guidance_scale_2}, but {pipeline_class} has one denoiser: leave "
                "guidance_scale_2 unset (it guides the low-noise expert of two-expert families such as Wan2.2)."
            )
        multiple = settings.sequence_multiple
        if cls.context_parallel_splits_text and settings.max_sequence_length % multiple:
            raise ValueError(
                f"max_sequence_length={settings.max_sequence_length} with context_parallel_degree={multiple}: "
                f"{pipeline_class}'s transformer splits its text tokens between the {multiple} processes of a group, "
                f"so their number must be a multiple of {multiple}. Set max_sequence_length to "
                f"{round_up(settings.max_sequence_length, multiple)}."
            )
        limit = cls.max_sequence_length_limit
        if limit is not None and settings.max_sequence_length > limit:
            raise ValueError(
                f"max_sequence_length={settings.max_sequence_length}, but {pipeline_class} takes at most {limit} "
                f"text tokens (its own __call__ refuses more). Set max_sequence_length to {limit} or less."
            )

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self.settings: SamplingSettings | None = None
        self.reference_denoiser: torch.nn.Module | None = None
        #: The denoiser as prepared for distributed training (its DDP wrapper), set by the trainer; None when the
        #: denoiser is called as it is (one process, or FSDP2, which shards the module in place).
        self.distributed_denoiser: torch.nn.Module | None = None
        self._use_reference = False
        self.check_scheduler()

    def configure(self, settings: SamplingSettings) -> None:
        """Set the sampling settings, checking the resolution, the family's limits (`check_settings`) and, for video
        families, the frame count."""
        if settings.num_frames != 1 and not self.is_video:
            raise ValueError(
                f"num_frames={settings.num_frames}, but {type(self.pipeline).__name__} makes images: leave num_frames "
                "at 1 (it sets the length of videos, for video families such as Wan)."
            )
        self.check_settings(settings, type(self.pipeline).__name__)
        self.check_resolution(settings.height, settings.width)
        self.settings = settings

    # ---- components -------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def active_denoiser(self) -> torch.nn.Module:
        """The module `predict_velocity` calls: the policy, or the reference inside `reference_policy()`."""
        return self.reference_denoiser if self._use_reference else self.denoiser

    @property
    def denoiser_parts(self) -> dict[str, torch.nn.Module]:
        """Each of `denoiser_components` as a module: the denoiser itself when it is one component, else its submodule
        of that name, whose keys in the denoiser's state dict are then prefixed `<component>.`."""
        if len(self.denoiser_components) == 1:
            return {self.denoiser_components[0]: self.denoiser}
        return {name: getattr(self.denoiser, name) for name in self.denoiser_components}

    def _part_state(self, state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        """The part of the denoiser's `state_dict` that belongs to component `name`, keyed as that module's own."""
        if len(self.denoiser_components) == 1:
            return state_dict
        return {k[len(name) + 1 :]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}

    def _denoiser_key(self, name: str, key: str) -> str:
        """The inverse of `_part_state` for one key: component `name`'s `key` as the denoiser's state dict has it."""
        return key if len(self.denoiser_components) == 1 else f"{name}.{key}"

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules never trained (text encoders, VAE)."""
        names = [n for n, c in self.pipeline.components.items() if isinstance(c, torch.nn.Module)]
        parts = list(self.denoiser_parts.values())
        return [getattr(self.pipeline, n) for n in names if all(getattr(self.pipeline, n) is not p for p in parts)]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [
            module
            for name, module in self.pipeline.components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        ]

    @property
    def device(self) -> torch.device:
        """Where the denoiser computes: its weights' device or, under FSDP2 with CPU offload (`fsdp_offload_params`),
        whose shards stay in host memory, the device they are gathered onto for each forward (the mesh's)."""
        parameter = next(self.denoiser.parameters())
        mesh = getattr(parameter, "device_mesh", None)
        if mesh is not None and mesh.device_type != parameter.device.type:
            return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
        return parameter.device

    def check_scheduler(self) -> None:
        scheduler = self.pipeline.scheduler
        if not type(scheduler).__name__.startswith("FlowMatch"):
            raise ValueError(
                f"The pipeline's scheduler is {type(scheduler).__name__}, not a flow-matching scheduler. GRPO-Guard "
                "trains flow-matching (rectified-flow) models: load a pipeline whose scheduler is, for example, "
                "FlowMatchEulerDiscreteScheduler."
            )

    # ---- family-specific ----------------------------------------------------------------------------------------
    @property
    def cfg_scale(self) -> float:
        """The classifier-free guidance scale; CFG is off at or below 1."""
        raise NotImplementedError

    @property
    def uses_cfg(self) -> bool:
        """Whether `predict_velocity` needs negative-prompt embeddings."""
        return self.cfg_scale > 1.0

    def check_resolution(self, height: int, width: int) -> None:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        """Text conditioning for `prompts`, computed without gradients."""
        raise NotImplementedError

    def encode_conditions(self, columns: dict[str, list]) -> PromptEmbeddings:
        """Conditioning other than text for each row, from the `condition_columns` of the dataset (one list per
        column, one entry per row), computed without gradients. Its tensors join the prompt's in `forward`."""
        raise NotImplementedError(f"{type(self).__name__} is conditioned on text only.")

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latents as the denoiser takes them (packed, for families that pack)."""
        raise NotImplementedError

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The (num_inference_steps + 1,) float32 noise levels from 1 down to 0, shifted as the family's pipeline does."""
        raise NotImplementedError

    def forward(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, sigma: torch.Tensor, conditioning: PromptEmbeddings
    ) -> torch.Tensor:
        """One call of the family's denoiser at noise levels `sigma` (B,): the only place its signature appears."""
        raise NotImplementedError

    def run_denoiser(self, denoiser: torch.nn.Module, **kwargs: Any) -> Any:
        """Call `denoiser` with `kwargs`: every `forward` calls its denoiser through this.

        The policy's forwards that carry gradients go through its distributed wrapper, whose hooks then average the
        gradients over processes on the backward that synchronises. Forwards without gradients (sampling, evaluation,
        old-policy and reference forwards) skip the wrapper, so they are no collective and ranks may run different
        numbers of them."""
        if denoiser is self.denoiser and self.distributed_denoiser is not None and torch.is_grad_enabled():
            denoiser = self.distributed_denoiser
        try:
            return denoiser(**kwargs)
        except AssertionError as error:
            # diffusers' context-parallel split asserts, naming neither the tensor nor a setting
            multiple = self.settings.sequence_multiple if self.settings is not None else 1
            if multiple == 1 or "divisible by mesh size" not in str(error):
                raise
            shapes = {name: tuple(value.shape) for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
            name = type(getattr(denoiser, "module", denoiser)).__name__  # the transformer, not its DDP wrapper
            raise ValueError(
                f"context_parallel_degree={multiple} splits the sequences {name} attends over (its latent tokens, "
                f"and its text tokens where diffusers splits them too) into {multiple} equal parts, and a sequence of "
                f"this forward is not a multiple of {multiple}: inputs {shapes}. Pick a height and width (and "
                f"num_frames) whose latent token count is a multiple of {multiple}, or set context_parallel_degree=1."
            ) from error

    def predict_velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
        negative_embeds: PromptEmbeddings | None,
    ) -> torch.Tensor:
        """The (guided) velocity at noise level `sigma` (B,); with CFG both branches run as one batched forward."""
        use_cfg = negative_embeds is not None and self.uses_cfg
        conditioning = prompt_embeds
        if use_cfg:
            # Only the text is negated: conditioning the negative prompt lacks (a source image) is the sample's own.
            negative = negative_embeds.expand(len(latents)).tensors
            negative = {k: negative.get(k, v) for k, v in prompt_embeds.tensors.items()}
            conditioning = PromptEmbeddings.cat([PromptEmbeddings(negative), prompt_embeds])
            latents, sigma = torch.cat([latents, latents]), torch.cat([sigma, sigma])
        velocity = self.forward(self.active_denoiser, latents, sigma, conditioning)
        if use_cfg:
            uncond, cond = velocity.chunk(2)
            velocity = self.combine_guidance(uncond, cond, sigma[: len(cond)])
        return velocity

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided velocity from the negative-prompt (`uncond`) and prompt (`cond`) velocities of one batch at
        noise levels `sigma` (B,).

        Families whose pipeline combines the two differently (Qwen-Image rescales the result) override this, so that
        the batching above stays in one place. `sigma` is for families whose scale differs per sample (Wan2.2's
        experts): the scale is a function of the arguments, never of state set around the call."""
        return uncond + self.cfg_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> list[Image.Image] | list[list[Image.Image]]:
        """One PIL image per sample; for video families (`is_video`), one list of frames per sample, in time order.
        This is what reward functions receive as `images` (docs/rewards.md)."""
        raise NotImplementedError

    # ---- full fine-tuning --------------------------------------------------------------------------------------
    def save_full(self, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the fully fine-tuned denoiser into `folder` (a run's `output_dir` or a checkpoint) in the pipeline's
        own layout: each of `denoiser_components` into the subfolder of its name, as `from_pretrained` reads it.
        `state_dict` is the denoiser's full state when the trainer gathered it (FSDP shards the module's own)."""
        from ..distributed import save_full_denoiser

        for name, module in self.denoiser_parts.items():
            target = os.path.join(folder, name)
            if state_dict is None:
                module.save_pretrained(target, safe_serialization=True)
            else:
                save_full_denoiser(self._part_state(state_dict, name), module, target)

    def full_weights(self, checkpoint_folder: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The weights `save_full` wrote into a checkpoint, keyed as `denoiser.state_dict()` (used on resume)."""
        from ..checkpoints import load_full_weights

        return {
            self._denoiser_key(name, key): value
            for name in self.denoiser_components
            for key, value in load_full_weights(os.path.join(checkpoint_folder, name)).items()
        }

    # ---- LoRA ---------------------------------------------------------------------------------------------------
    def add_lora(self, peft_config: Any) -> None:
        if not peft_config.target_modules:
            peft_config.target_modules = list(self.default_lora_target_modules)
        self.denoiser.add_adapter(peft_config)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    @contextlib.contextmanager
    def reference_policy(self):
        """Run `predict_velocity` with the reference policy: LoRA disabled, or the frozen copy set as
        `reference_denoiser` when the whole denoiser is trained."""
        if self.has_lora:
            self.denoiser.disable_adapters()
            try:
                yield
            finally:
                self.denoiser.enable_adapters()
            return
        if self.reference_denoiser is None:
            raise RuntimeError("No reference policy: train with LoRA or set `reference_denoiser`.")
        self._use_reference = True
        try:
            yield
        finally:
            self._use_reference = False

    def full_load_code(self, repo: str) -> str:
        """The lines of the model card's usage snippet that load a full fine-tune `save_full` wrote, from the Hub
        repository (or folder) `repo`, into the pipeline `pipe`: each component from the subfolder of its name."""
        return "\n".join(
            f'pipe.{name} = pipe.{name}.from_pretrained("{repo}", subfolder="{name}", dtype=torch.bfloat16).to("cuda")'
            for name in self.denoiser_components
        )

    def lora_load_code(self, repo: str) -> str:
        """The lines of the model card's usage snippet that load the LoRA `save_lora` wrote, from the Hub repository
        (or folder) `repo`, into the pipeline `pipe`."""
        return f'pipe.load_lora_weights("{repo}")'

    @property
    def lora_parts(self) -> dict[str, torch.nn.Module]:
        """The components that carry a LoRA, by name (one file each in `save_lora`)."""
        return {name: m for name, m in self.denoiser_parts.items() if getattr(m, "peft_config", None)}

    def _part_lora_state_dicts(
        self, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Each LoRA-carrying component's LoRA weights, keyed as peft saves them."""
        from peft.utils import get_peft_model_state_dict

        return {
            name: get_peft_model_state_dict(
                module, state_dict=None if state_dict is None else self._part_state(state_dict, name)
            )
            for name, module in self.lora_parts.items()
        }

    def lora_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The LoRA weights keyed as peft saves them (prefixed `<component>.` for a denoiser of several components),
        read from the denoiser or from `state_dict`, its full state (gathered by the trainer when it is sharded)."""
        return {
            self._denoiser_key(name, key): value
            for name, weights in self._part_lora_state_dicts(state_dict).items()
            for key, value in weights.items()
        }

    def save_lora(self, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write one file per LoRA-carrying component (`lora_weight_names`), each as the family's
        `Pipeline.load_lora_weights` reads it; `state_dict` as in `lora_state_dict`."""
        writer = self.lora_file_writer or type(self.pipeline)
        for name, weights in self._part_lora_state_dicts(state_dict).items():
            writer.save_lora_weights(
                folder,
                transformer_lora_layers=weights,
                transformer_lora_adapter_metadata=self.lora_parts[name].peft_config["default"].to_dict(),
                weight_name=self.lora_weight_names[name],
            )

    def load_lora(self, folder: str | os.PathLike, sharded: bool = False) -> None:
        """Restore the LoRA weights `save_lora` wrote into the already-added adapters (used on resume); `sharded` when
        FSDP2 has sharded the denoiser, whose weights then load through torch's distributed state-dict API."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..distributed import load_full_state, lora_keys_in_model

        prefix = f"{self.lora_prefix}."  # save_lora_weights keys every component's file under it
        for name, module in self.lora_parts.items():
            path = os.path.join(folder, self.lora_weight_names[name])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: it holds the LoRA of the pipeline's {name}.")
            state = {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}
            if sharded:
                load_full_state(module, lora_keys_in_model(state), strict=False)
                continue
            result = set_peft_model_state_dict(module, state)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{path} has keys the pipeline's {name} does not: {unexpected[:5]}")


def token_shifted_sigmas(
    scheduler: Any,
    num_inference_steps: int,
    image_seq_len: int,
    device: torch.device,
    base_sigmas: Sequence[float] | None = None,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> torch.Tensor:
    """The scheduler's sigmas for `base_sigmas` (default `linspace(1, 1/N, N)`) shifted by `mu`, which grows linearly
    with the token count from `base_shift` at the scheduler's `base_image_seq_len` to `max_shift` at its
    `max_image_seq_len` (diffusers' `calculate_shift`; the keyword defaults are used where the scheduler's config has no
    value): the schedule of the FLUX.1, Qwen-Image, Z-Image and LTX-2 pipelines, each with its own defaults."""
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", base_seq_len),
        config.get("max_image_seq_len", max_seq_len),
        config.get("base_shift", base_shift),
        config.get("max_shift", max_shift),
    )
    if base_sigmas is None:
        base_sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=np.asarray(base_sigmas), device=device, mu=mu)
    return scheduler.sigmas.detach().clone().float()


class PackedLatentsMixin:
    """For families whose transformer works on 2x2 patches of the VAE latents: FLUX, FLUX.2 and Qwen-Image take them
    packed into tokens (`pack`, `unpack`), Z-Image patchifies them itself. The one copy of the resolution check, the
    latent grid, the packed latent shape, `(H/16 * W/16, channels)` for a VAE factor of 8, and the schedule shifted by
    the image's token count."""

    family_name = "this model"
    #: Why sizes are multiples of twice the VAE factor, for the resolution error.
    patch_reason = "x 2 for latent packing"

    @property
    def _latent_hw(self) -> tuple[int, int]:
        """Unpacked latent height and width: the VAE's factor, rounded down to even for 2x2 packing."""
        factor = self.pipeline.vae_scale_factor * 2
        return 2 * (self.settings.height // factor), 2 * (self.settings.width // factor)

    def check_resolution(self, height: int, width: int) -> None:
        factor = self.pipeline.vae_scale_factor
        check_resolution_multiple(
            height, width, factor * 2, model=self.family_name, reason=f"VAE factor {factor} {self.patch_reason}"
        )

    @property
    def _image_tokens(self) -> int:
        """The number of 2x2 patches of the latent grid."""
        h, w = self._latent_hw
        return (h // 2) * (w // 2)

    def latent_shape(self) -> tuple[int, ...]:
        return (self._image_tokens, self.denoiser.config.in_channels)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """`token_shifted_sigmas` at the image's token count: what FluxPipeline, QwenImagePipeline and ZImagePipeline
        do (the last only reaches schedulers with dynamic shifting)."""
        return token_shifted_sigmas(self.pipeline.scheduler, num_inference_steps, self._image_tokens, self.device)

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) to tokens (B, (h/2)(w/2), 4C), each token one 2x2 patch, row-major."""
        batch, channels, h, w = latents.shape
        latents = latents.view(batch, channels, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(batch, (h // 2) * (w // 2), channels * 4)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `pack` at the configured resolution: tokens (B, (h/2)(w/2), 4C) to (B, C, h, w)."""
        h, w = self._latent_hw
        batch, _, channels = latents.shape
        latents = latents.view(batch, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(batch, channels // 4, h, w)
