"""Wan2.2 text-to-video A14B: two Wan2.1-style experts that split the denoising trajectory at `boundary_ratio`.

`WanPipeline` with `transformer_2` and `boundary_ratio` set (Wan-AI/Wan2.2-T2V-A14B-Diffusers) runs, at each step with
timestep `t`, the high-noise expert `transformer` when `t >= boundary_ratio * num_train_timesteps` and the low-noise
expert `transformer_2` below, with `guidance_scale` for the first and `guidance_scale_2` for the second. Everything
else (latents, text, VAE, schedule) is Wan2.1's, so this adapter extends `WanAdapter`.

The trainer trains one module, `adapter.denoiser`. Here it is `Wan22Experts`, a small module holding both experts
whose `forward` takes the transformer's keyword arguments and sends each sample to the expert of its own timestep:
forward-process losses (NFT, AWM) noise the samples of one batch to different levels, so a batch may straddle the
boundary; it is then split in two and the outputs put back in order.

Which experts train: both, by default, as Flow-Factory's Wan2.2 GRPO recipe does (`target_components: ['transformer',
'transformer_2']` in examples/grpo/lora/wan22/t2v.yaml of X-GenGroup/Flow-Factory). A LoRA target name prefixed with
an expert's name applies to that expert only, so `target_modules=["transformer.attn1.to_q", ...]` trains the
high-noise expert alone and `["transformer_2.attn1.to_q", ...]` the low-noise one; unprefixed names apply to both.

The LoRA is written as one diffusers file per trained expert, both keyed under the `transformer.` prefix that
`WanPipeline.load_lora_weights` reads:

    pipe.load_lora_weights(folder)  # pytorch_lora_weights.safetensors: the high-noise expert
    pipe.load_lora_weights(
        folder, weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True
    )

A full fine-tune (no `peft_config`) trains both experts whole; it is saved in the pipeline's own layout, `transformer/`
and `transformer_2/` (`denoiser_components`: `PipelineAdapter.save_full` and `full_weights` write and read both).

Sampling settings: `guidance_scale_2` (`GuardConfig.guidance_scale_2`) guides the low-noise expert; unset, it is
`guidance_scale`, as in `WanPipeline.__call__`. As there, CFG runs for both experts when `guidance_scale >
1` and for neither otherwise.

FSDP2 (docs/launching.md): every forward and backward of a sharded block is a collective, so all processes must call
the same experts in the same order. Sharded, `Wan22Experts.forward` first sums over the processes how many rows of
its batch each expert takes (one all-reduce of two integers), then every process calls every expert some process
needs, high-noise first: on its own rows of that expert, or, when it holds none, on one padded row whose output is
dropped by slicing it to zero rows, so its backward still runs (zero gradients) and its reduce-scatters match the
other processes'. Sampling and the SDE family (flow_grpo, grpo_guard, ...) train every sample of a step at the step's
sigma, drawn from the same grid and the same round-keyed step choice on every process: there one expert runs, as in
the pipeline. Forward-process losses (nft, awm, dgpo, gardo_nft, ...) draw a noise level per sample: a unit whose
samples straddle the boundary anywhere runs both experts on every process. `_no_split_modules` names the experts'
block class, so accelerate's transformer-based policy wraps each block of both experts (`WanTransformerBlock`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .base import SamplingSettings, loads_component, register
from .wan import WanAdapter

#: Each expert's attribute name in `WanPipeline`: the high-noise expert first.
EXPERTS = ("transformer", "transformer_2")

#: LoRA targets of each expert: self- and cross-attention projections and the feed-forward layers, Flow-Factory's
#: `default_target_modules` for Wan (src/flow_factory/models/wan/wan2_t2v.py in X-GenGroup/Flow-Factory).
WAN22_LORA_TARGETS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
]

#: The LoRA file of each expert. The high-noise one keeps diffusers' default name, so `load_lora_weights(folder)`
#: finds it alone (the other name does not end with the default, which diffusers would otherwise also match).
LORA_WEIGHT_NAMES = {
    "transformer": "pytorch_lora_weights.safetensors",
    "transformer_2": "pytorch_lora_weights_transformer_2.safetensors",
}

#: Keyword arguments of `WanTransformer3DModel.forward` that hold one row per sample.
_BATCH_ARGUMENTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")


def has_two_experts(pipeline: Any) -> bool:
    """Whether `pipeline` is a two-expert Wan2.2 pipeline (it has a `transformer_2`)."""
    return getattr(pipeline, "transformer_2", None) is not None


def split_lora_targets(target_modules: Any) -> dict[str, Any]:
    """Each expert's LoRA targets: names prefixed `transformer.` or `transformer_2.` go to that expert (prefix
    removed), the others to both. A regular expression (a str) applies to both experts as it is.

    Example:
        >>> split_lora_targets(["attn1.to_q", "transformer_2.ffn.net.2"])
        {'transformer': ['attn1.to_q'], 'transformer_2': ['attn1.to_q', 'ffn.net.2']}
    """
    if isinstance(target_modules, str):
        return dict.fromkeys(EXPERTS, target_modules)
    split: dict[str, list[str]] = {name: [] for name in EXPERTS}
    for target in sorted(target_modules):
        expert, _, rest = target.partition(".")
        for name in (expert,) if expert in EXPERTS and rest else EXPERTS:
            split[name].append(rest if name == expert else target)
    return split


class Wan22Experts(torch.nn.Module):
    """Wan2.2's two experts as the one module the trainer trains.

    `forward` takes `WanTransformer3DModel.forward`'s keyword arguments and runs each sample through the expert
    `WanPipeline` would use at its timestep: `transformer` at `timestep >= boundary_timestep`, `transformer_2` below.

    An expert no sample of a backward reached gets no gradient (`None`), as for any unused branch: the optimizer
    leaves it alone. Under DDP the processes' batches may reach different experts; the trainer's DDP wrapper finds
    such unused weights itself (`find_unused_parameters=True`, transformers' default for a model that is not a
    `PreTrainedModel`): leave `ddp_find_unused_parameters` unset. Two CPU processes end where one does (a manual
    check, grpo_guard and nft, to 3e-6). Under FSDP2 every process calls the experts any process needs
    (`called_experts`; the module docstring says why), and tests/test_wan22_fsdp2.py checks two processes against one.
    """

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_timestep: float):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = boundary_timestep
        #: The LoRA configuration as the user gave it (targets prefixed per expert included), set by `add_lora`; the
        #: trainer and `PipelineAdapter.has_lora` read it as they read a diffusers model's.
        self.peft_config: dict[str, Any] = {}
        #: What accelerate's transformer-based FSDP2 policy wraps when the launch config names no class: each block of
        #: both experts (`WanTransformerBlock`), as it wraps a lone `WanTransformer3DModel`'s.
        self._no_split_modules = list(getattr(transformer, "_no_split_modules", None) or [])

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in EXPERTS}

    @property
    def config(self) -> Any:
        """The high-noise expert's config: both experts have the same shapes."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def routes_high(self, timestep: torch.Tensor) -> torch.Tensor:
        """Per sample, whether the high-noise expert predicts: `WanPipeline`'s `t >= boundary_timestep`."""
        if timestep.ndim != 1:
            raise ValueError(f"Wan22Experts takes one timestep per sample, got shape {tuple(timestep.shape)}.")
        return timestep >= self.boundary_timestep

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        kwargs = dict(kwargs, hidden_states=hidden_states, timestep=timestep, return_dict=False)
        high = self.routes_high(timestep)
        rows = {"transformer": high.nonzero().squeeze(1), "transformer_2": (~high).nonzero().squeeze(1)}
        called = self.called_experts({name: len(index) for name, index in rows.items()}, hidden_states.device)
        if len(called) == 1:  # one expert for the whole batch (on every process): the pipeline's own call
            output = self.experts[called[0]](**kwargs)[0]
        else:
            parts = []
            for name in called:
                index = rows[name]
                # Sharded, with none of this expert's rows here: one padded row keeps this process in the expert's
                # collectives; slicing its output to zero rows still runs its backward, with zero gradients.
                run = index if len(index) else index.new_zeros(1)
                part = {k: v[run] if k in _BATCH_ARGUMENTS and v is not None else v for k, v in kwargs.items()}
                parts.append(self.experts[name](**part)[0][: len(index)])
            # back in the batch's order: row i of the concatenation came from batch row order[i]
            order = torch.cat([rows[name] for name in called])
            output = torch.cat(parts)[torch.argsort(order)]
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)

    def called_experts(self, counts: dict[str, int], device: torch.device) -> list[str]:
        """The experts a forward calls, high-noise first, given how many rows of its batch each takes (`counts`):
        those with rows, here or, when FSDP2 shards the experts, on any process. Every process must then issue the
        same collectives: the counts are summed over the processes (one all-reduce), so a process holding none of an
        expert's rows calls it on a padded row while another process trains it."""
        totals = torch.tensor([counts[name] for name in EXPERTS])
        if self.is_sharded:
            import torch.distributed as dist

            totals = totals.to(device)  # the inputs' device: the one the process group communicates on
            dist.all_reduce(totals)
        return [name for name, total in zip(EXPERTS, totals.tolist()) if total > 0]

    @property
    def is_sharded(self) -> bool:
        """Whether FSDP2 shards the experts (accelerate shards this module and each expert block)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self, FSDPModule) or any(
            isinstance(block, FSDPModule) for expert in self.experts.values() for block in expert.blocks
        )

    # ---- what the trainer calls on a diffusers model ------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts.values():
            expert.enable_gradient_checkpointing()

    def disable_adapters(self) -> None:
        for expert in self.lora_experts().values():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.lora_experts().values():
            expert.enable_adapters()

    def lora_experts(self) -> dict[str, torch.nn.Module]:
        """The experts that carry a LoRA, by name."""
        return {name: e for name, e in self.experts.items() if getattr(e, "peft_config", None)}


@register
class Wan22Adapter(WanAdapter):
    """Two-expert `WanPipeline`s (Wan2.2 A14B); single-transformer ones (Wan2.1) go to `WanAdapter` (`accepts`)."""

    pipeline_classes = ("WanPipeline",)
    default_lora_target_modules = WAN22_LORA_TARGETS
    takes_guidance_scale_2 = True
    denoiser_components = EXPERTS
    lora_weight_names = LORA_WEIGHT_NAMES

    @classmethod
    def accepts(cls, pipeline: Any) -> bool:
        return has_two_experts(pipeline)

    @classmethod
    def accepts_model_index(cls, model_index: dict[str, Any]) -> bool:
        return loads_component(model_index, "transformer_2")

    def __init__(self, pipeline: Any):
        super().__init__(pipeline)  # WanAdapter's checks, with `check_experts` below
        boundary = pipeline.config["boundary_ratio"] * pipeline.scheduler.config.num_train_timesteps
        self._experts = Wan22Experts(pipeline.transformer, pipeline.transformer_2, boundary)

    @classmethod
    def check_experts(cls, pipeline: Any) -> None:
        if getattr(pipeline, "transformer", None) is None or not has_two_experts(pipeline):
            raise ValueError(
                "Wan22Adapter drives WanPipelines with both experts, `transformer` (high noise) and `transformer_2` "
                "(low noise); this one lacks one of them."
            )
        if pipeline.config.get("boundary_ratio") is None:
            raise ValueError(
                "This WanPipeline has a transformer_2 but no boundary_ratio, so WanPipeline never calls transformer_2. "
                "Load it with its checkpoint's boundary_ratio (0.875 for Wan2.2-T2V-A14B)."
            )

    # ---- components ---------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> Wan22Experts:
        return self._experts

    # ---- guidance -----------------------------------------------------------------------------------------------
    @property
    def guidance_scale_2(self) -> float:
        """The low-noise expert's CFG scale: the settings' `guidance_scale_2`, else `guidance_scale`."""
        value = getattr(self.settings, "guidance_scale_2", None)
        return self.settings.guidance_scale if value is None else value

    def configure(self, settings: SamplingSettings) -> None:
        value = getattr(settings, "guidance_scale_2", None)
        if value is not None and value > 1.0 and settings.guidance_scale <= 1.0:
            raise ValueError(
                f"guidance_scale_2={value} with guidance_scale={settings.guidance_scale}: WanPipeline runs CFG only "
                "when guidance_scale (the high-noise expert's) is > 1, for neither expert otherwise. Set "
                "guidance_scale > 1 too, or guidance_scale_2 <= 1."
            )
        super().configure(settings)

    def guidance_scales(self, sigma: torch.Tensor) -> torch.Tensor:
        """Each sample's CFG scale at noise level `sigma` (B,): its expert's, as `WanPipeline` guides each step."""
        high = self._experts.routes_high(self._timestep(sigma))
        scales = torch.tensor([self.settings.guidance_scale, self.guidance_scale_2], device=high.device)
        return torch.where(high, scales[0], scales[1])

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Each sample guided at its own expert's scale (`guidance_scales`)."""
        # The scale stays float32 and the product is rounded to the velocity's dtype before the sum: what the
        # pipeline's `uncond + scale * (cond - uncond)` with a Python float computes, in bfloat16 too.
        scale = self.guidance_scales(sigma).view(-1, *([1] * (cond.ndim - 1)))
        return uncond + (scale * (cond - uncond)).to(cond.dtype)

    # ---- LoRA ---------------------------------------------------------------------------------------------------
    def add_lora(self, peft_config: Any) -> None:
        """One LoRA per expert its targets name (see `split_lora_targets`), with the rest of `peft_config` shared."""
        if not peft_config.target_modules:
            peft_config.target_modules = list(self.default_lora_target_modules)
        for name, targets in split_lora_targets(peft_config.target_modules).items():
            if targets:
                expert_config = copy.deepcopy(peft_config)
                expert_config.target_modules = targets
                self._experts.experts[name].add_adapter(expert_config)
        if not self._experts.lora_experts():
            raise ValueError(f"LoRA target_modules={peft_config.target_modules} name no expert's modules.")
        self._experts.peft_config = {"default": peft_config}

    @property
    def trained_experts(self) -> list[str]:
        """Names of the experts that carry a LoRA, high-noise first."""
        return list(self._experts.lora_experts())

    def lora_load_code(self, repo: str) -> str:
        """The model card's loading lines: each trained expert's file (`PipelineAdapter.save_lora` writes one per
        expert, `LORA_WEIGHT_NAMES`), the low-noise one into `transformer_2`."""
        lines = []
        for name in self.trained_experts:
            if name == "transformer":
                lines.append(f'pipe.load_lora_weights("{repo}")  # the high-noise expert')
            else:
                lines.append(
                    f'pipe.load_lora_weights("{repo}", weight_name="{LORA_WEIGHT_NAMES[name]}", '
                    "load_into_transformer_2=True)  # the low-noise expert"
                )
        return "\n".join(lines)
