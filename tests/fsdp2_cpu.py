"""Run `python -m trl_guard.scripts.grpo` under FSDP2 on CPU processes: a test harness, not part of the library.

accelerate 1.15 turns FSDP on only for GPU-like devices: launched with `ACCELERATE_USE_CPU=true`, an FSDP config runs
as plain multi-CPU DDP over gloo, silently unsharded (docs/sharding.md). Right after accelerate has set its state
up, this harness switches it to FSDP with the plugin accelerate built from the launch config, which is the state a
GPU launch of the same config reaches; everything after that (sharding, gradient sync, gathering) is accelerate's
and the trainer's own code.

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml \\
        --num_processes 2 tests/fsdp2_cpu.py --config recipe.yaml
"""

import json
import os
import runpy

import accelerate.state
from accelerate.utils import DistributedType
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.tensor import DTensor

from trl_guard.ema import EMAWeights
from trl_guard.trainer import GuardGRPODiffusionTrainer

_original_init = accelerate.state.AcceleratorState.__init__


def _init_as_fsdp(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and plugin.cpu_offload.pin_memory:
            # `fsdp_offload_params: true` asks for pinned host memory, which needs an accelerator: on a CPU-only
            # machine `fully_shard` fails in `pin_memory()` ("Cannot access accelerator device when none is
            # available"). Unpinned, the same offload path runs.
            plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
        # AcceleratorState copies PartialState's type on every later instantiation
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_as_fsdp
_original_train = GuardGRPODiffusionTrainer.train


def _train_and_report_shards(self, *args, **kwargs):
    """After training, write each parameter's local and global size to `$SHARD_REPORT.<rank>.json`, and those of the
    other copies of the weights to `$SHARD_REPORT.copies.<rank>.json`."""
    output = _original_train(self, *args, **kwargs)
    report = os.environ.get("SHARD_REPORT")
    if report:
        sizes = {
            name: {
                "sharded": isinstance(p, DTensor),
                "local": p.to_local().numel() if isinstance(p, DTensor) else p.numel(),
                "global": p.numel(),
                "trainable": p.requires_grad,
            }
            for name, p in self.adapter.denoiser.named_parameters()
        }
        with open(f"{report}.{self.accelerator.process_index}.json", "w") as f:
            json.dump(sizes, f)
        with open(f"{report}.copies.{self.accelerator.process_index}.json", "w") as f:
            json.dump(_copy_sizes(self), f)
    return output


def _copy_sizes(trainer) -> dict[str, dict[str, int] | str]:
    """Local and global element counts of the other copies of the weights: full fine-tuning's frozen reference, the
    EMA, and every copy an algorithm keeps (DiffusionNFT's lagged policy, ...); the CPU offload policy in force, and whether the denoiser checkpoints."""
    tensors = {}
    if trainer.adapter.reference_denoiser is not None:
        tensors["reference"] = list(trainer.adapter.reference_denoiser.parameters())
    if trainer.ema is not None:
        tensors["ema"] = list(trainer.ema.averages.values())
    for name, value in vars(trainer.algorithm).items():
        if isinstance(value, EMAWeights):
            tensors[f"algorithm.{name}"] = list(value.averages.values())
    sizes = {
        name: {
            "local": sum(t.to_local().numel() if isinstance(t, DTensor) else t.numel() for t in group),
            "global": sum(t.numel() for t in group),
        }
        for name, group in tensors.items()
    }
    sizes["offload_policy"] = type(trainer.accelerator.state.fsdp_plugin.cpu_offload).__name__
    sizes["gradient_checkpointing"] = bool(getattr(trainer.adapter.denoiser, "gradient_checkpointing", False))
    return sizes


GuardGRPODiffusionTrainer.train = _train_and_report_shards

if __name__ == "__main__":
    runpy.run_module("trl_guard.scripts.grpo", run_name="__main__", alter_sys=True)
