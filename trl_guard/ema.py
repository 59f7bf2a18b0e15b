"""An exponential moving average (EMA) of the trained weights, as Flow-GRPO keeps in its SD3.5 configs.

Training always continues from the live weights; the EMA is what evaluation, saved models and checkpoints' model
files show. Flow-GRPO's rule: at optimizer step ``n`` (counted from 1), every ``update_interval`` steps,

    ema = decay_n * ema + (1 - decay_n) * weights,    decay_n = min(decay, n / (n + 9))

so the first updates follow the weights closely and later ones average over about ``1 / (1 - decay)`` updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (`DTensor`, a collective every process must join), else the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def like(tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """`tensor` (a whole tensor) sharded as `parameter` is, or as it is when `parameter` is not sharded."""
    if hasattr(parameter, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(parameter.device), parameter.device_mesh, parameter.placements)
    return tensor


class EMAWeights:
    """The EMA of a fixed list of named parameters.

    Example:
        >>> import torch
        >>> weight = torch.nn.Parameter(torch.zeros(2))
        >>> ema = EMAWeights({"w": weight}, decay=0.9, update_interval=1)
        >>> with torch.no_grad():
        ...     _ = weight.fill_(1.0)
        >>> ema.step(100)  # decay_100 = 0.9
        >>> [round(v, 4) for v in ema.averages["w"].tolist()]
        [0.1, 0.1]
        >>> with ema.swapped_in():
        ...     round(float(weight.detach()[0]), 2)
        0.1
        >>> float(weight.detach()[0])  # the live weights are back
        1.0
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], *, decay: float, update_interval: int = 1):
        self.parameters = parameters
        self.decay = decay
        self.update_interval = update_interval
        self.averages = {name: p.detach().clone() for name, p in parameters.items()}  # float32 like the weights
        self.sharded_module: torch.nn.Module | None = None

    @torch.no_grad()
    def rebind(self, parameters: dict[str, torch.nn.Parameter], sharded_module: torch.nn.Module | None = None) -> None:
        """Follow new parameter objects of the same names, as FSDP2 makes when it shards `sharded_module`: the
        averages so far are kept, sharded as the new parameters are."""
        self.averages = {name: like(full(self.averages[name]), p.detach()) for name, p in parameters.items()}
        self.parameters = parameters
        self.sharded_module = sharded_module

    def _drop_gathered_weights(self) -> None:
        """Make the sharded module gather its weights afresh at its next forward. FSDP2 keeps the root module's
        gathered weights between a forward and its backward, so weights swapped into the shards would otherwise
        not reach the root's own layers."""
        if self.sharded_module is None:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.sharded_module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current weights."""
        for name, parameter in self.parameters.items():
            self.averages[name].copy_(parameter.detach())

    def decay_at(self, step: int) -> float:
        return min(self.decay, step / (step + 9))

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Fold in the current weights after optimizer step ``step`` (1-based), if it is an update step."""
        if step % self.update_interval != 0:
            return
        weight = 1 - self.decay_at(step)
        for name, parameter in self.parameters.items():
            self.averages[name].lerp_(parameter.detach().to(self.averages[name].dtype), weight)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Put the EMA into the parameters for the duration of the block, then restore the live weights."""
        live = {name: p.detach().clone() for name, p in self.parameters.items()}
        try:
            for name, parameter in self.parameters.items():
                parameter.copy_(self.averages[name])
            self._drop_gathered_weights()
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(live[name])
            self._drop_gathered_weights()

    def state_dict(self, prefix_live: str = "live/", prefix_ema: str = "ema/") -> dict[str, torch.Tensor]:
        """Live weights and their averages, whole CPU tensors keyed ``live/<name>`` and ``ema/<name>``. With sharded
        weights every process must call it (each tensor is gathered)."""
        state = {prefix_live + n: full(p.detach()).cpu().clone() for n, p in self.parameters.items()}
        state.update({prefix_ema + n: full(t.detach()).cpu().clone() for n, t in self.averages.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` wrote: the live weights into the parameters, the averages into the EMA."""
        missing = [n for n in self.parameters if f"live/{n}" not in state or f"ema/{n}" not in state]
        if missing:
            raise ValueError(f"The EMA state has no entry for {len(missing)} parameters, for example {missing[0]!r}.")
        for name, parameter in self.parameters.items():
            parameter.copy_(like(state[f"live/{name}"], parameter))
            self.averages[name].copy_(like(state[f"ema/{name}"], parameter))
