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
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(live[name])

    def state_dict(self, prefix_live: str = "live/", prefix_ema: str = "ema/") -> dict[str, torch.Tensor]:
        """Live weights and their averages, CPU tensors keyed ``live/<name>`` and ``ema/<name>``."""
        state = {prefix_live + n: p.detach().cpu().clone() for n, p in self.parameters.items()}
        state.update({prefix_ema + n: t.detach().cpu().clone() for n, t in self.averages.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` wrote: the live weights into the parameters, the averages into the EMA."""
        missing = [n for n in self.parameters if f"live/{n}" not in state or f"ema/{n}" not in state]
        if missing:
            raise ValueError(f"The EMA state has no entry for {len(missing)} parameters, for example {missing[0]!r}.")
        for name, parameter in self.parameters.items():
            parameter.copy_(state[f"live/{name}"])
            self.averages[name].copy_(state[f"ema/{name}"])
