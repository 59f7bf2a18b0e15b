"""Run `python -m trl_guard.scripts.grpo` under DDP, counting gradient all-reduces: a test harness, not part of the
library.

Every DDP model gets one gradient bucket (so one all-reduce per synchronising backward) and a communication hook that
counts its calls before all-reducing as DDP's default hook does; each rank rewrites its count to
`$ALLREDUCE_COUNT.<rank>` at every call (not at exit: under gloo `end_run` ends the process after the exit handlers
registered later than the script's `prepare_run_end`, and a harness's import comes earlier).
"""

import os
import runpy

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

_calls = []
_original_init = DistributedDataParallel.__init__


def _init_counting(self, *args, **kwargs):
    kwargs["bucket_cap_mb"] = 1024  # every gradient in one bucket
    _original_init(self, *args, **kwargs)

    def counting_allreduce(process_group, bucket):
        _calls.append(bucket.index())
        _write_count()
        return default_hooks.allreduce_hook(process_group, bucket)

    self.register_comm_hook(dist.group.WORLD, counting_allreduce)


def _write_count():
    path = os.environ.get("ALLREDUCE_COUNT")
    if path:
        with open(f"{path}.{os.environ.get('RANK', '0')}", "w") as f:
            f.write(str(len(_calls)))


DistributedDataParallel.__init__ = _init_counting

if __name__ == "__main__":
    runpy.run_module("trl_guard.scripts.grpo", run_name="__main__", alter_sys=True)
