"""Sampling trajectories with the SDE (recording everything training needs) and with the ODE (for evaluation); the
training micro-batches of a round (`TrainBatch`) and the rollout buffer that keeps them in a mid-round checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import PipelineAdapter, PromptEmbeddings
from .checkpoints import read_safetensors
from .schedule import SDESchedule
from .sde import ode_step


@dataclass
class Rollout:
    """A batch of recorded SDE trajectories, float32.

    The recorded steps are sampling steps ``start, start + 1, ...`` (all of them, ``start = 0``, unless an SDE window
    recorded only some). Recorded step ``j`` goes from ``latents[:, j]`` at ``sigmas[j]`` to ``latents[:, j + 1]`` at
    ``sigmas[j + 1]``; its Gaussian had mean ``old_means[:, j]`` under the sampling policy. Keeping the means means
    training never re-runs the sampling policy to get old log-probabilities.
    """

    latents: torch.Tensor  # (B, W + 1, ...)
    old_means: torch.Tensor  # (B, W, ...)
    sigmas: torch.Tensor  # (W + 1,)
    start: int = 0
    final: torch.Tensor | None = None  # the sample, when the trajectory went on (with the ODE) after the record

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def final_latents(self) -> torch.Tensor:
        return self.final if self.final is not None else self.latents[:, -1]

    @property
    def steps(self) -> range:
        """The sampling-step indices recorded."""
        return range(self.start, self.start + self.old_means.shape[1])

    def step(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampling step ``i`` as recorded: ``(latents, next_latents, old_mean, sigma, sigma_next)``."""
        if i not in self.steps:
            raise IndexError(f"Sampling step {i} was not recorded (recorded: {list(self.steps)}).")
        j = i - self.start
        return self.latents[:, j], self.latents[:, j + 1], self.old_means[:, j], self.sigmas[j], self.sigmas[j + 1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "latents": self.latents,
            "old_means": self.old_means,
            "sigmas": self.sigmas,
            "start": torch.tensor(self.start),
        }
        if self.final is not None:
            state["final"] = self.final
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Rollout:
        return cls(state["latents"], state["old_means"], state["sigmas"], int(state["start"]), state.get("final"))

    def select(self, rows: slice) -> Rollout:
        """The trajectories ``rows``."""
        final = self.final[rows] if self.final is not None else None
        return Rollout(self.latents[rows], self.old_means[rows], self.sigmas, self.start, final)

    @classmethod
    def cat(cls, rollouts: list[Rollout]) -> Rollout:
        """One rollout of the trajectories of ``rollouts``, sampled on the same grid, in order."""
        finals = [r.final for r in rollouts]
        return cls(
            torch.cat([r.latents for r in rollouts]),
            torch.cat([r.old_means for r in rollouts]),
            rollouts[0].sigmas,
            rollouts[0].start,
            None if finals[0] is None else torch.cat(finals),
        )


@dataclass
class CleanRollout:
    """A batch of samples for the forward-process algorithms (DiffusionNFT, AWM), float32.

    Only the clean final latents are kept from sampling, with what training will draw at them, decided at sampling
    time from keyed generators so that a resume trains on the same points: ``train_sigmas[:, k]`` is the noise level
    of training unit ``k`` for each sample and ``train_noise[:, k]`` its fresh noise.
    """

    final: torch.Tensor  # (B, ...)
    train_sigmas: torch.Tensor  # (B, K)
    train_noise: torch.Tensor  # (B, K, ...)

    def __len__(self) -> int:
        return self.final.shape[0]

    @property
    def final_latents(self) -> torch.Tensor:
        return self.final

    @property
    def steps(self) -> range:
        """The training units drawn per sample."""
        return range(self.train_sigmas.shape[1])

    def noised(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit ``k``: ``(x_t, sigma, target_velocity)`` with ``x_t = (1 - sigma) x0 + sigma eps`` and the flow-matching
        target ``eps - x0``."""
        if k not in self.steps:
            raise IndexError(f"Training unit {k} was not drawn (drawn: {list(self.steps)}).")
        sigma, noise = self.train_sigmas[:, k], self.train_noise[:, k]
        t = sigma.reshape(-1, *([1] * (noise.ndim - 1)))
        return (1 - t) * self.final + t * noise, sigma, noise - self.final

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"clean": self.final, "train_sigmas": self.train_sigmas, "train_noise": self.train_noise}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> CleanRollout:
        return cls(state["clean"], state["train_sigmas"], state["train_noise"])

    def select(self, rows: slice) -> CleanRollout:
        """The samples ``rows``."""
        return CleanRollout(self.final[rows], self.train_sigmas[rows], self.train_noise[rows])

    @classmethod
    def cat(cls, rollouts: list[CleanRollout]) -> CleanRollout:
        """One record of the samples of ``rollouts``, in order."""
        return cls(
            *(torch.cat(tensors) for tensors in zip(*((r.final, r.train_sigmas, r.train_noise) for r in rollouts)))
        )


@torch.no_grad()
def sample_sde(
    adapter: PipelineAdapter,
    prompt_embeds: PromptEmbeddings,
    negative_embeds: PromptEmbeddings | None,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    schedule: SDESchedule,
    *,
    generators: list[torch.Generator] | None = None,
    sde_steps: range | None = None,
) -> Rollout:
    """Sample from ``latents`` at ``sigmas[0]`` down to ``sigmas[-1]``, one generator per sample.

    Every step is an SDE step and recorded, unless ``sde_steps`` names a window: then only those steps are SDE steps
    and recorded, and the others are deterministic ODE steps (Flow-GRPO-Fast, MixGRPO).
    """
    num_steps = len(sigmas) - 1
    sde_steps = range(num_steps) if sde_steps is None else sde_steps
    batch = latents.shape[0]
    latents = latents.float()
    recorded, means = [], []
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
        velocity = adapter.predict_velocity(latents, sigma, prompt_embeds, negative_embeds)
        if i not in sde_steps:
            latents = ode_step(velocity, latents, sigma, sigma_next)
            continue
        recorded.append(latents)
        latents, _, mean, _ = schedule.step(velocity, latents, sigma, sigma_next, generator=generators)
        means.append(mean)
        if i == sde_steps[-1]:
            recorded.append(latents)
    window_is_all = sde_steps[0] == 0 and sde_steps[-1] == num_steps - 1
    return Rollout(
        torch.stack(recorded, 1),
        torch.stack(means, 1),
        sigmas[sde_steps[0] : sde_steps[-1] + 2],
        start=sde_steps[0],
        final=None if window_is_all else latents,
    )


@torch.no_grad()
def sample_ode(
    adapter: PipelineAdapter,
    prompt_embeds: PromptEmbeddings,
    negative_embeds: PromptEmbeddings | None,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """Deterministic Euler sampling of the probability-flow ODE; returns the final latents."""
    latents = latents.float()
    batch = latents.shape[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
        velocity = adapter.predict_velocity(latents, sigma, prompt_embeds, negative_embeds)
        latents = ode_step(velocity, latents, sigma, sigma_next)
    return latents


def select_train_steps(
    noise_std: torch.Tensor, fraction: float, selection: str, *, generator: torch.Generator | None = None
) -> list[int]:
    """The sampling steps one rollout trains on, in order.

    ``max(1, int(T * fraction))`` of the ``T`` steps: the first ones (``"first"``, Flow-GRPO's rule; ``0.99`` of 10
    is steps 0-8) or a random subset from ``generator`` (``"random"``). Steps whose noise std is 0 (CPS's last) are
    deterministic, carry no policy gradient and are never chosen.

    Example:
        >>> import torch
        >>> select_train_steps(torch.ones(10), 0.99, "first")
        [0, 1, 2, 3, 4, 5, 6, 7, 8]
        >>> select_train_steps(torch.tensor([0.5, 0.3, 0.0]), 1.0, "first")
        [0, 1]
    """
    stochastic = [i for i, std in enumerate(noise_std.flatten().tolist()) if std > 0]
    count = min(len(stochastic), max(1, int(len(noise_std) * fraction)))
    if selection == "first":
        return stochastic[:count]
    if selection == "random":
        order = torch.randperm(len(stochastic), generator=generator)[:count]
        return sorted(stochastic[i] for i in order.tolist())
    raise ValueError(f"Unknown timestep_selection {selection!r}; expected 'first' or 'random'.")


@dataclass
class TrainBatch:
    """One training micro-batch of a generation round, built once the round is scored: what its rollout recorded,
    the conditioning it was sampled with, its training signal (`Algorithm.training_signal`: group advantages by
    default), the units to train on (sampling steps for the SDE family, drawn noise levels for the forward-process
    family), and for algorithms that compare the samples of a group, each sample's weighted reward total and its prompt
    group (the index of its group in the round's global generation batch, ``global_index // num_generations``)."""

    rollout: Rollout | CleanRollout
    prompt_embeds: PromptEmbeddings
    negative_embeds: PromptEmbeddings | None
    advantages: torch.Tensor  # (B,)
    train_steps: list[int]
    rewards: torch.Tensor  # (B,), the weighted reward total
    group_ids: torch.Tensor  # (B,) long
    #: Further per-sample tensors (B, ...) of the algorithm's training signal (the third element `training_signal` may
    #: return, for example GARDO's gate), keyed by name.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("advantages", "rewards", "group_ids"):
            if len(getattr(self, name)) != len(self.rollout):
                raise ValueError(f"{len(getattr(self, name))} {name} for a batch of {len(self.rollout)} trajectories.")
        for name, values in self.extras.items():
            if len(values) != len(self.rollout):
                raise ValueError(f"{len(values)} values of {name!r} for a batch of {len(self.rollout)} trajectories.")
        missing = [step for step in self.train_steps if step not in self.rollout.steps]
        if missing:
            raise ValueError(f"Train steps {missing} were not recorded (recorded: {list(self.rollout.steps)}).")

    def __len__(self) -> int:
        return len(self.rollout)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors, keyed ``{prefix}{name}``; `from_state_dict` reads them back."""
        state = dict(self.rollout.state_dict())
        state["advantages"] = self.advantages
        state["rewards"] = self.rewards
        state["group_ids"] = self.group_ids
        state["train_steps"] = torch.tensor(self.train_steps, dtype=torch.long)
        state.update({f"extra.{k}": v for k, v in self.extras.items()})
        state.update({f"prompt.{k}": v for k, v in self.prompt_embeds.tensors.items()})
        if self.negative_embeds is not None:
            state.update({f"negative.{k}": v for k, v in self.negative_embeds.tensors.items()})
        return {prefix + k: v for k, v in state.items()}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], prefix: str = "", *, rollout_type: type[Rollout] | type[CleanRollout]
    ) -> TrainBatch:
        """Read back what `state_dict` wrote; ``rollout_type`` is the run's algorithm's (`Algorithm.rollout_type`)."""
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        def group(name: str) -> dict[str, torch.Tensor]:
            return {k[len(name) + 1 :]: v for k, v in own.items() if k.startswith(f"{name}.")}

        negative = group("negative")
        return cls(
            rollout=rollout_type.from_state_dict(own),
            prompt_embeds=PromptEmbeddings(group("prompt")),
            negative_embeds=PromptEmbeddings(negative) if negative else None,
            advantages=own["advantages"],
            train_steps=own["train_steps"].tolist(),
            rewards=own["rewards"],
            group_ids=own["group_ids"],
            extras=group("extra"),
        )


# ---- the rollout buffer: a generation round's micro-batches kept in a mid-round checkpoint -----------------------

#: The settings that decide how a generation round is cut into micro-batches: a mid-round buffer only fits them.
BUFFER_LAYOUT_FIELDS = (
    "per_device_train_batch_size",
    "steps_per_generation",
    "gradient_accumulation_steps",
    "num_iterations",
    "world_size",
    # a context-parallel group holds one data-parallel rank's micro-batches: another degree cuts the round otherwise
    "context_parallel_degree",
)


def rollout_buffer_name(rank: int) -> str:
    return f"rollout_buffer_{rank}.safetensors"


def buffer_layout(args: Any) -> dict[str, int]:
    return {name: int(getattr(args, name)) for name in BUFFER_LAYOUT_FIELDS}


def save_rollout_buffer(batches: list[TrainBatch], path: str, layout: dict[str, int]) -> None:
    """Write a generation round's training micro-batches to one safetensors file, so a run resumed in the middle of
    the round trains on exactly the same data. ``layout`` (see `buffer_layout`) is stored beside them."""
    from safetensors.torch import save_file

    tensors = {k: v for i, batch in enumerate(batches) for k, v in batch.state_dict(prefix=f"{i}.").items()}
    metadata = {name: str(value) for name, value in layout.items()}
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, path, metadata=metadata)  # clone: shared


def load_rollout_buffer(
    path: str,
    device: torch.device | str,
    layout: dict[str, int],
    rollout_type: type[Rollout] | type[CleanRollout],
) -> list[TrainBatch]:
    """Read what `save_rollout_buffer` wrote, onto `device`, each rollout as ``rollout_type`` (the run's algorithm's
    `Algorithm.rollout_type`), refusing naming the fields when the round was cut into micro-batches under other
    settings than ``layout``, and refusing a buffer written before micro-batches kept their rewards and groups."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        saved = f.metadata() or {}
    differ = [
        f"{name}={saved[name]} in the checkpoint, {value} now"
        for name, value in layout.items()
        if name in saved and int(saved[name]) != value
    ]
    if differ:
        raise ValueError(
            f"Cannot resume from the middle of a generation round in {os.path.dirname(path)}: its rollout buffer was "
            f"cut into micro-batches under other settings ({'; '.join(differ)}). Resume with the checkpoint's values "
            "of these fields, or from a checkpoint at the end of a round."
        )
    tensors = read_safetensors(path, device=str(device))
    count = len({k.split(".")[0] for k in tensors})
    if count and "0.group_ids" not in tensors:
        # the raw rewards cannot be recovered from such a buffer, and resampling the round would not be exact
        raise ValueError(
            f"Cannot resume from the middle of a generation round in {os.path.dirname(path)}: its rollout buffer "
            f"({os.path.basename(path)}) was written by an older trl_guard, which kept no rewards or prompt groups "
            "with the micro-batches. Resume from a checkpoint at the end of a generation round, or finish the run "
            "with the trl_guard version that wrote it."
        )
    return [TrainBatch.from_state_dict(tensors, prefix=f"{i}.", rollout_type=rollout_type) for i in range(count)]
