"""Context parallelism of the denoiser through diffusers' own `ContextParallelConfig` and
`ModelMixin.enable_parallelism` (Ulysses or ring attention), on one device mesh with data parallelism.

The processes form a `(data-parallel, context-parallel)` grid, `rank = dp_rank * degree + cp_rank`: the consecutive
processes of one context-parallel group split every denoiser forward's token sequence between them (diffusers' hooks
split it at the transformer's `_cp_plan` inputs and gather it again after `proj_out`), so they must hold the same
samples and make the same calls. The trainer therefore treats a group as one data-parallel rank: the sampler hands
its processes the same prompts (`GroupRepeatedSampler`), noise is keyed by the data-parallel rank, and whatever is
gathered across processes is kept once per group (`ContextParallelLayout.one_per_group`).

Gradients: each process of a group backpropagates its own tokens only (the output gather's backward keeps the
process's slice), so the group's gradient is the sum of its processes' gradients, while DDP and FSDP2 average over
every process. The trainer multiplies the loss by the degree before each backward, which makes that average the mean
over the data-parallel ranks of each one's whole gradient, as without context parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: How the attention of a context-parallel group is computed: diffusers' `ulysses_degree` (all-to-all over heads)
#: or `ring_degree` (key/value chunks passed round the group).
MODES = ("ulysses", "ring")
#: Attention backends that return the log-sum-exp ring attention merges its chunks with. "native" (diffusers'
#: default, PyTorch's SDPA) does not, so ring attention needs one of these (`DIFFUSERS_ATTN_BACKEND`).
RING_BACKENDS = ("flash", "flash_hub", "_native_cudnn", "_native_flash", "sage", "sage_hub")


@dataclass(frozen=True)
class ContextParallelLayout:
    """Where this process sits in the `(data-parallel, context-parallel)` grid.

    Example:
        >>> layout = ContextParallelLayout(degree=2, process_index=3, num_processes=4)
        >>> layout.data_parallel_rank, layout.data_parallel_size, layout.context_parallel_rank
        (1, 2, 1)
        >>> layout.one_per_group(list("aabb"))
        ['a', 'b']
    """

    degree: int = 1
    process_index: int = 0
    num_processes: int = 1

    @property
    def enabled(self) -> bool:
        return self.degree > 1

    @property
    def data_parallel_size(self) -> int:
        return self.num_processes // self.degree

    @property
    def data_parallel_rank(self) -> int:
        return self.process_index // self.degree

    @property
    def context_parallel_rank(self) -> int:
        return self.process_index % self.degree

    def one_per_group(self, gathered: Any) -> Any:
        """A tensor or list gathered from every process in process order, as equal blocks, with the block of the first
        process of each context-parallel group only (the others hold the same samples)."""
        if not self.enabled:
            return gathered
        size = len(gathered) // self.num_processes
        blocks = [gathered[rank * size : (rank + 1) * size] for rank in range(0, self.num_processes, self.degree)]
        if isinstance(gathered, torch.Tensor):
            return torch.cat(blocks)
        return [item for block in blocks for item in block]

    def gather_rows(self, rows: list) -> list:
        """Every data-parallel rank's `rows` (lists of any length), in rank order, each group's once: a collective."""
        from accelerate.utils import gather_object

        per_process = gather_object([rows])
        return [row for rank in range(0, len(per_process), self.degree) for row in per_process[rank]]

    def repeat_for_groups(self, sampler: Any, slice_size: int) -> Any:
        """`sampler` as the processes must draw from it: each `slice_size` indices (one process's share of a
        generation round) repeated for every process of a context-parallel group."""
        return GroupRepeatedSampler(sampler, slice_size, self.degree) if self.enabled else sampler


class GroupRepeatedSampler(torch.utils.data.Sampler):
    """Each consecutive `slice_size` indices of `sampler`, `degree` times in a row.

    accelerate deals a data loader's batches round the processes, batch `k` to process `k % num_processes`; with
    batches of `slice_size`, the `degree` processes of a context-parallel group (consecutive ranks) receive the same
    one. `set_epoch` reaches the wrapped sampler.

    Example:
        >>> list(GroupRepeatedSampler([0, 1, 2, 3], slice_size=2, degree=2))
        [0, 1, 0, 1, 2, 3, 2, 3]
    """

    def __init__(self, sampler: Sequence[int] | Any, slice_size: int, degree: int):
        self.sampler, self.slice_size, self.degree = sampler, slice_size, degree

    def __iter__(self) -> Iterator[int]:
        block: list[int] = []
        for index in self.sampler:
            block.append(index)
            if len(block) == self.slice_size:
                for _ in range(self.degree):
                    yield from block
                block = []
        if block:
            for _ in range(self.degree):
                yield from block

    def __len__(self) -> int:
        return len(self.sampler) * self.degree

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


# ---- checks before loading ---------------------------------------------------------------------------------------
def check_launch(degree: int, mode: str, world_size: int) -> None:
    """The settings alone: a degree of at least 1 that divides the processes of a distributed launch."""
    if degree < 1:
        raise ValueError(f"context_parallel_degree={degree} must be >= 1 (1 turns context parallelism off).")
    if mode not in MODES:
        raise ValueError(f"context_parallel_mode={mode!r} is unknown; use one of {MODES}.")
    if degree == 1:
        return
    if world_size < 2:
        raise ValueError(
            f"context_parallel_degree={degree} splits each denoiser forward over {degree} processes, but this run has "
            "one process. Launch it on several (`accelerate launch --num_processes N ...`, docs/launching.md), or set "
            "context_parallel_degree=1."
        )
    if world_size % degree != 0:
        raise ValueError(
            f"context_parallel_degree={degree} must divide the number of processes ({world_size}): the processes form "
            f"data-parallel groups of {degree}. Set context_parallel_degree to a divisor of {world_size}, or launch a "
            "multiple of it."
        )


def denoiser_classes(model: Any, components: Sequence[str]) -> dict[str, type | str | None]:
    """The classes of the denoiser `components` of `model` (a pipeline object, or a local folder's
    `model_index.json` entries resolved in diffusers), by component; a class diffusers does not export is kept as
    its name, and an absent component left out."""
    if not isinstance(model, str):
        return {name: type(part) for name in components if (part := getattr(model, name, None)) is not None}
    from . import preflight

    index = preflight._model_index(model) or {}
    classes: dict[str, type | str | None] = {}
    for name in components:
        entry = index.get(name)
        if not isinstance(entry, (list, tuple)) or entry[-1] is None:
            continue
        import diffusers

        classes[name] = getattr(diffusers, entry[-1], entry[-1])
    return classes


def check_family(classes: dict[str, type | str | None], pipeline_class: str, degree: int) -> None:
    """Refuse context parallelism for a denoiser whose class diffusers gives no `_cp_plan` (the inputs to split and
    the output to gather): SD3, Z-Image, HunyuanVideo 1.5, ... have none in diffusers 0.42."""
    if degree == 1:
        return
    for name, cls in classes.items():
        if getattr(cls, "_cp_plan", None) is None:
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", cls)
            raise ValueError(
                f"context_parallel_degree={degree}, but {pipeline_class}'s {name} ({cls_name}) has no context-parallel "
                "plan (`_cp_plan`) in diffusers, so its forwards cannot be split. Set context_parallel_degree=1; "
                "context parallelism serves the families whose transformer has one (Wan2.1/2.2, FLUX.1, FLUX.2, "
                "Qwen-Image, LTX-2)."
            )


# ---- turning it on -----------------------------------------------------------------------------------------------
def enable(parts: Sequence[torch.nn.Module], degree: int, mode: str, accelerator: Any) -> ContextParallelLayout:
    """Build the `(dp, ring, ulysses)` device mesh and call diffusers' `enable_parallelism` on each denoiser part
    (both experts of Wan2.2), after the process group exists and before accelerate wraps the model. Degree 1 builds
    nothing. Raises, naming the field, for a head count Ulysses cannot split and for ring attention on a backend
    without the log-sum-exp."""
    layout = ContextParallelLayout(degree, accelerator.process_index, accelerator.num_processes)
    if not layout.enabled:
        return layout
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from torch.distributed.device_mesh import init_device_mesh

    for part in parts:
        heads = getattr(getattr(part, "config", None), "num_attention_heads", None)
        if mode == "ulysses" and heads is not None and heads % degree != 0:
            raise ValueError(
                f"context_parallel_degree={degree} with context_parallel_mode='ulysses' splits the attention heads "
                f"between the processes, and {type(part).__name__} has {heads}. Set context_parallel_degree to a "
                "divisor of it, or context_parallel_mode='ring'."
            )
        if mode == "ring":
            backends = {
                getattr(m.processor, "_attention_backend", None) for m in part.modules() if hasattr(m, "processor")
            }
            active = {str(getattr(b, "value", b)) for b in backends if b is not None}
            if any(b is None for b in backends) or not backends:
                active.add(_AttentionBackendRegistry.get_active_backend()[0].value)
            if not active <= set(RING_BACKENDS):
                raise ValueError(
                    f"context_parallel_mode='ring' merges attention chunks by their log-sum-exp, which the attention "
                    f"backend {sorted(active)} does not return. Set DIFFUSERS_ATTN_BACKEND (or "
                    f"`transformer.set_attention_backend`) to one of {RING_BACKENDS} on GPUs, or use "
                    "context_parallel_mode='ulysses'."
                )
    shape = (layout.data_parallel_size, degree, 1) if mode == "ring" else (layout.data_parallel_size, 1, degree)
    mesh = init_device_mesh(accelerator.device.type, shape, mesh_dim_names=("dp", "ring", "ulysses"))
    for part in parts:
        degrees = {"ring_degree": degree} if mode == "ring" else {"ulysses_degree": degree}
        part.enable_parallelism(config=ContextParallelConfig(**degrees, mesh=mesh))
    return layout


def check_before_loading(model: Any, pipeline_class: str, args: Any) -> None:
    """`check_family` for a pipeline object or a local folder, whose denoiser classes are known before loading."""
    if args.context_parallel_degree == 1:
        return
    from .preflight import family_adapter

    adapter = family_adapter(model, pipeline_class, getattr(args, "model_init_kwargs", None))
    components = adapter.denoiser_components if adapter is not None else ("transformer",)
    check_family(denoiser_classes(model, components), pipeline_class, args.context_parallel_degree)


def denoiser_modules(adapter: Any) -> list[torch.nn.Module]:
    """The modules `enable` splits: each part of the denoiser (both experts of Wan2.2), and of full fine-tuning's
    frozen reference copy, whose forwards the group runs together as well."""
    modules = list(adapter.denoiser_parts.values())
    reference = adapter.reference_denoiser
    if reference is not None:
        names = adapter.denoiser_components
        modules += [reference] if len(names) == 1 else [getattr(reference, name) for name in names]
    return modules
