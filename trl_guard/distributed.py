"""What training on several processes needs beyond one process: which accelerate setups the trainer takes, and the
few places where a sharded (FSDP2) denoiser must be read or written through torch's distributed state-dict API.

Gradients are never averaged here: under DDP the policy's gradient-carrying forwards go through accelerate's DDP
wrapper (`PipelineAdapter.run_denoiser`) and under FSDP2 the sharded module reduce-scatters by itself; the trainer
only switches synchronisation off (`Accelerator.no_sync`) for every backward of an optimizer step but the last.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import sys
from typing import Any

import torch
from accelerate.utils import DistributedType

#: Where docs/sharding.md records why DeepSpeed is refused.
_SHARDING_DOC = "docs/sharding.md"
#: Why DeepSpeed is refused and what to use instead; raised for an accelerate DeepSpeed launch and, by `GuardConfig`,
#: for a `deepspeed` training argument.
DEEPSPEED_REFUSAL = (
    "DeepSpeed is not supported: its engine would step the optimizer after each per-timestep backward, and the path "
    f"cannot be tested without GPUs ({_SHARDING_DOC}). Shard with FSDP2 instead: "
    "`accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml ...`."
)
FSDP1_REFUSAL = (
    "FSDP1 is not supported (nor, with it, its CPU offload): set `fsdp_version: 2` in the accelerate config (as "
    "examples/accelerate_configs/fsdp2.yaml does); FSDP2 takes `fsdp_offload_params: true` too."
)


def _on_cpu(use_cpu: bool = False) -> bool:
    """Whether accelerate will run on CPUs, where it ignores a DeepSpeed or FSDP launch config (docs/sharding.md)."""
    return use_cpu or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"


def launch_refusal(use_cpu: bool = False) -> str | None:
    """What `check_distributed_setup` will refuse once the accelerator exists, told from `accelerate launch`'s
    environment, so that `GuardConfig` refuses it before any weight loads: a DeepSpeed launch (on CPUs too, where
    `TrainingArguments` would otherwise fail importing deepspeed), or FSDP version 1 on GPUs (on CPUs accelerate
    ignores an FSDP config and runs DDP). None for every other launch, and outside `accelerate launch`."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return DEEPSPEED_REFUSAL
    fsdp1 = (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION", "1") != "2"
    )
    return FSDP1_REFUSAL if fsdp1 and not _on_cpu(use_cpu) else None


def is_fsdp2(accelerator: Any) -> bool:
    """Whether accelerate shards the denoiser with FSDP2."""
    return accelerator.distributed_type == DistributedType.FSDP and bool(getattr(accelerator, "is_fsdp2", False))


def fsdp2_requested(args: Any) -> bool:
    """Whether accelerate will shard with FSDP2, as far as it can be told before the Trainer builds its accelerator
    (so that a family FSDP2 cannot train is refused before its weights load): several processes on CUDA GPUs, and
    FSDP version 2 from the TrainingArguments' `fsdp` or from `accelerate launch`'s environment. Conservative: on
    CPUs accelerate ignores an FSDP config (docs/sharding.md), and anything else is left to `is_fsdp2`, the authority
    once the accelerator exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or _on_cpu(getattr(args, "use_cpu", False)):
        return False
    plugin = getattr(args, "fsdp_plugin_args", None)
    if plugin:
        return int(plugin.get("fsdp_version", 1)) == 2
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION", "1") == "2"
    )


def check_distributed_setup(accelerator: Any) -> None:
    """Refuse, naming the fix, the accelerate setups the trainer cannot train correctly.

    DDP (multi-GPU or multi-CPU) and FSDP2 are supported. FSDP1 is refused for FSDP2. DeepSpeed is refused: its
    engine steps the optimizer on every `backward` unless its accumulation steps count every per-timestep backward,
    and on this project's CPU test machines accelerate cannot run it as a multi-process job, so the path would ship
    untested."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise NotImplementedError(DEEPSPEED_REFUSAL)
    if kind == DistributedType.FSDP and not is_fsdp2(accelerator):
        raise NotImplementedError(FSDP1_REFUSAL)
    if accelerator.num_processes > 1 and kind not in (
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
        DistributedType.FSDP,
    ):
        raise NotImplementedError(
            f"{kind} is not supported; launch with DDP (multi-GPU or multi-CPU) or FSDP2 (docs/launching.md)."
        )


def balanced_rows(num_rows: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's rows of an evaluation set, padded by repeating its last row so that every rank runs the same
    number of forwards (each FSDP2 forward is a collective), and how many of them are real.

    Example:
        >>> balanced_rows(5, 1, 2)
        ([1, 3, 3], 2)
        >>> balanced_rows(5, 0, 2)
        ([0, 2, 4], 3)
    """
    rows = list(range(rank, num_rows, world_size))
    per_rank = math.ceil(num_rows / world_size) if num_rows else 0
    real = len(rows)
    rows += [rows[-1] if rows else 0] * (per_rank - real)
    return rows, real


_LORA_WEIGHT = re.compile(r"\.(lora_[A-Za-z_]+)\.(weight|bias)$")


def lora_keys_in_model(state: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """LoRA weights keyed as a saved LoRA file keys them (prefix stripped) renamed to the module's own parameter
    names, which carry the adapter's name (`...to_q.lora_A.weight` -> `...to_q.lora_A.default.weight`).

    Example:
        >>> list(lora_keys_in_model({"blocks.0.to_q.lora_A.weight": torch.zeros(1)}))
        ['blocks.0.to_q.lora_A.default.weight']
    """
    return {_LORA_WEIGHT.sub(rf".\1.{adapter_name}.\2", key): value for key, value in state.items()}


def load_full_state(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full (unsharded) tensors into `module`, sharded or not: every rank passes the same full `state` and keeps
    its own shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"The saved weights have keys this model does not: {unexpected[:5]}")


def save_full_denoiser(state_dict: dict[str, torch.Tensor], denoiser: torch.nn.Module, folder: str) -> None:
    """Write a gathered full state dict as diffusers' `from_pretrained` reads it: `config.json` and safetensors shards
    named `diffusion_pytorch_model*.safetensors`.

    diffusers' `save_pretrained` reads the module's own (sharded) state dict, and FSDP2 renames the module's class
    (`FSDPSD3Transformer2DModel`), so the config is written with the class the weights belong to."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(folder, exist_ok=True)
    denoiser.save_config(folder)
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["_class_name"] = unsharded_class(denoiser).__name__
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = {k: _own_storage(v.detach().contiguous()) for k, v in state_dict.items()}
    save_torch_state_dict(tensors, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when it is a view on a larger storage, which safetensors refuses to write. A gathered
    parameter whose first dimension is smaller than the number of processes (Wan's `scale_shift_table`, 1 x 2 x dim)
    was sharded with padding, and its full tensor is a slice of the padded gather."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


def unsharded_class(module: torch.nn.Module) -> type:
    """The module's class before FSDP2 wrapped it (its own class when it is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return type(module)
    return next(c for c in type(module).__mro__[1:] if c is not FSDPModule and not issubclass(c, FSDPModule))


def shard_like_policy(accelerator: Any, module: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen copy of the denoiser (full fine-tuning's reference) in place as accelerate sharded the policy:
    the same shard groups, device mesh, CPU offload and mixed precision, so each process holds its part of it rather
    than all of it. accelerate's `prepare` takes one model under FSDP2, so its own sharding function is called here.
    The copy's forwards then are collectives, as the policy's are: every process must run the same ones, which the
    trainer's reference forwards do (each process trains the same number of rows per unit).

    Every shard group, the root's included, reshards after its forward: FSDP2 keeps the root's weights gathered from
    a forward until its backward, and a frozen copy never runs one, so they would stay whole on every process."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    module = fsdp2_prepare_model(accelerator, module)
    module.set_reshard_after_forward(True)
    return module


# ---- the end of a run -----------------------------------------------------------------------------------------------
#: Whether the process ends right after the exit handlers (`end_run` armed it); the handler is registered once.
_exit_after_handlers = {"registered": False, "armed": False}


def _exit_skipping_teardown() -> None:
    if not _exit_after_handlers["armed"]:
        return
    logging.shutdown()  # registered before this handler, so it would run after it: run it here
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # An uncaught exception after `end_run` was printed, and recorded in sys.last_value: keep the failure's status.
    os._exit(1 if getattr(sys, "last_value", None) is not None else 0)


def prepare_run_end() -> None:
    """Call at the start of a script, before any tracker starts: registers the exit handler that `end_run` may arm.
    Exit handlers run last-registered first, so this one runs after every handler registered later (wandb's, trackio's,
    huggingface_hub's), which therefore still run."""
    if not _exit_after_handlers["registered"]:
        atexit.register(_exit_skipping_teardown)
        _exit_after_handlers["registered"] = True


def end_run(accelerator: Any) -> None:
    """End a finished run's use of torch.distributed: wait for every process, finish accelerate's trackers, destroy the
    process group, and under gloo end the process right after its exit handlers, skipping the interpreter's teardown
    (`prepare_run_end` must have run first; a no-op in one process).

    Why the last part. A DDP model keeps the gloo process group alive after `destroy_process_group` (its C++ side
    holds the group), so gloo's worker threads live until the process ends. A worker releases a collective's tensors
    after the caller has been told the collective finished; when Python owns such a tensor, the release takes the GIL.
    If the main thread has meanwhile begun finalizing the interpreter, Python 3.11 ends the worker thread inside that
    call, the unwind reaches a C++ frame that may not throw, and the process aborts with "terminate called without
    an active exception" after a run that finished and saved: about once in 40 two-process CPU runs, more under load.
    No barrier can wait for that release. Exit handlers run before finalization begins, while workers may still take
    the GIL, so ending the process in the last of them leaves no window. NCCL runs (GPUs) are left to end normally.

    The price: exit handlers registered before `prepare_run_end` (they would run after its handler) are skipped under
    gloo. Register them after it, or write what they would write as you go.
    """
    gloo = (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_backend() == "gloo"
    )
    if gloo and not _exit_after_handlers["registered"]:  # before anything ends: the run is left as it was
        raise RuntimeError("end_run under gloo needs prepare_run_end() at the start of the script.")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if gloo:
        _exit_after_handlers["armed"] = True
