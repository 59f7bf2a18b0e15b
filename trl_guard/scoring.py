"""Calling reward functions on a batch of images and checking what they return."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .rewards import is_group_reward, resolve_reward_func, reward_func_name
from .rewards.judge import PairwiseWinRate, VLMJudge
from .rewards.remote import RemoteReward, RemoteRewardError

#: The keywords the trainer passes to every reward function itself; a dataset column of one of these names would be
#: passed twice.
REWARD_KEYWORDS = ("prompts", "images", "trainer_state")

#: The largest magnitude a float32 holds: rewards are gathered and combined in float32.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_reward_columns(column_names: Sequence[str], dataset_name: str = "train_dataset") -> None:
    """Refuse a dataset column that reward functions could not receive.

    Every column but `prompt` reaches the reward functions as a keyword argument next to the trainer's own
    (`REWARD_KEYWORDS`); a column named like one of those would be passed twice and fail the first scoring, after a
    whole rollout. Call this on each dataset before training.

    Args:
        column_names: The dataset's columns.
        dataset_name: How the error names the dataset.

    Raises:
        ValueError: naming the column and the rename that fixes it.
    """
    _refuse_collisions(column_names, REWARD_KEYWORDS, dataset_name)


def _refuse_collisions(column_names: Sequence[str], keywords: Sequence[str], dataset_name: str) -> None:
    for column in column_names:
        if column in keywords:
            raise ValueError(
                f"{dataset_name} has a column named {column!r}, which reward functions already receive from the "
                f"trainer as `{column}=`: the column would collide with it. Rename it, for example "
                f"`dataset = dataset.rename_column({column!r}, '{column}_column')`, and read it in your reward under "
                "the new name."
            )


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(type(value).__name__)
    return float(value)


def score_images(
    reward_funcs: Sequence,
    reward_names: Sequence[str],
    prompts: list[str],
    images: list[Image.Image],
    columns: dict[str, list] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Call every reward function once on the batch; return a (num_images, num_funcs) float32 tensor.

    Plain functions are called one after another, in order; `async def` ones (or any returning an awaitable) are
    awaited concurrently with each other, and with the plain ones, on a shared event loop.

    Videos decoded with their audio (`VideosWithAudio`, LTX-2) also give every function `audios`: one
    `(waveform, sample_rate)` per video, `waveform` a float32 numpy array `(channels, samples)`.

    A ``None`` from a function becomes NaN (the sample is skipped in that function's sum). A wrong count, a value
    that is not a real number, or one that is not finite in float32 (NaN, inf, beyond float32's range) raises a
    ValueError that names the function and the prompt. A column named like one of the call's own keywords raises too
    (see `check_reward_columns`).
    """
    columns = columns or {}
    # A family that makes sound with its videos (LTX-2) decodes to `VideosWithAudio`: its rewards get `audios=`.
    audios = getattr(images, "audios", None)
    if audios is not None:
        kwargs = {**kwargs, "audios": list(audios)}
    # Checked here as well as before training, for callers that score without the trainer's pre-flight checks:
    # Python's own error ("got multiple values for keyword argument") names neither the column nor the fix.
    _refuse_collisions(sorted(columns), ("prompts", "images", *kwargs), dataset_name="the dataset")
    scores = torch.full((len(images), len(reward_funcs)), float("nan"))
    # Async functions (`async def`, TRL's convention for rewards that wait on a server) only build a coroutine when
    # called: each is handed to the event loop at once, so they all wait together, and the plain functions run in
    # order in this thread meanwhile.
    results: list[Any] = []
    try:
        for func in reward_funcs:
            values = func(prompts=prompts, images=images, **columns, **kwargs)
            results.append(_submit(values) if inspect.isawaitable(values) else values)
        results = [value.result() if isinstance(value, concurrent.futures.Future) else value for value in results]
    finally:
        for value in results:  # after an error, async calls still waiting are cancelled, not left running
            if isinstance(value, concurrent.futures.Future):
                value.cancel()
    for j, (values, name) in enumerate(zip(results, reward_names)):
        if isinstance(values, (torch.Tensor, np.ndarray)):
            values = values.tolist()
        # A dict or a set has a length too, but iterating it gives keys in no set order: never scores.
        if not isinstance(values, (list, tuple)):
            raise ValueError(
                f"Reward function {name!r} returned a {type(values).__name__}; it must return a list (or tuple, "
                "array or tensor) of one float or None per image, in the order of the images."
            )
        if len(values) != len(images):
            raise ValueError(
                f"Reward function {name!r} returned {len(values)} values for {len(images)} images; it must return "
                "one value (or None) per image."
            )
        for i, value in enumerate(values):
            try:
                number = _as_float(value)
            except TypeError as error:
                raise ValueError(
                    f"Reward function {name!r} returned a {error} for prompt {prompts[i]!r}; rewards must be real "
                    "numbers or None."
                ) from None
            if number is not None and not (math.isfinite(number) and abs(number) <= _FLOAT32_MAX):
                raise ValueError(
                    f"Reward function {name!r} returned {number} for prompt {prompts[i]!r}; rewards must be finite "
                    f"float32 numbers (magnitude at most {_FLOAT32_MAX:.4g}), or None where the reward does not "
                    "apply."
                )
            if number is not None:
                scores[i, j] = number
    return scores


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The event loop async reward functions run on: one per process, in a daemon thread, so that it serves the
    scoring worker thread, the main thread and a caller whose own thread already runs a loop (a notebook) alike, and
    so that clients an async reward keeps (an HTTP session) stay on the loop they were made on from call to call."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="trl-guard-async-rewards", daemon=True).start()
            _loop = loop
        return _loop


def _submit(awaitable: Any) -> concurrent.futures.Future:
    async def wait() -> Any:
        return await awaitable

    return asyncio.run_coroutine_threadsafe(wait(), _event_loop())


def _check_signature(func: Any, field: str) -> None:
    """Reward functions are called as `f(prompts=..., images=..., **columns, trainer_state=...)`: refuse, before any
    compute, one that cannot take those keywords."""
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # builtins and some C callables have no signature: let the call decide
        return
    name = reward_func_name(func)
    # A positional-only parameter without a default can never be filled by a keyword call.
    positional_only = [
        p.name
        for p in parameters
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty
    ]
    if positional_only:
        raise ValueError(
            f"{field}: the reward function {name!r} takes {', '.join(positional_only)} as positional-only parameters "
            "(before a `/`), but reward functions are called with keywords only (prompts=, images=, every other "
            f"dataset column, trainer_state=). Remove the `/`: `def {name}(prompts, images, **kwargs)`."
        )
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    raise ValueError(
        f"{field}: the reward function {name!r} has no **kwargs. It is called with prompts=, images=, every other "
        f"dataset column and trainer_state= as keywords; define it as `def {name}(prompts, images, **kwargs)`."
    )


def resolve_reward_funcs(
    reward_funcs: Any, reward_kwargs: Sequence[dict[str, Any] | None] | None = None, field: str = "reward_funcs"
) -> list:
    """Callables for reward functions given as callables, built-in names, URLs or import paths, each built with its
    entry of `reward_kwargs` (one mapping, or None, per reward, in order; a recipe's way to give a built-in reward
    such as `vlm_judge` its arguments). Nothing is loaded: model rewards load on their first call."""
    if not isinstance(reward_funcs, (list, tuple)):  # one reward, as RewardSet takes it
        reward_funcs = [reward_funcs]
    if reward_kwargs is None:
        reward_kwargs = [None] * len(reward_funcs)
    kwargs_field = field.replace("_funcs", "_kwargs")
    if not isinstance(reward_kwargs, (list, tuple)) or len(reward_kwargs) != len(reward_funcs):
        count = f"{len(reward_kwargs)} entries" if isinstance(reward_kwargs, (list, tuple)) else "no list"
        raise ValueError(
            f"{kwargs_field} has {count} for {len(reward_funcs)} entries of {field}; give one mapping of arguments "
            f"per reward, in order, with {{}} for a reward that takes none (for example `{kwargs_field}: [{{}}, "
            "{base_url: ..., model: ...}]`)."
        )
    funcs = []
    for i, (func, kwargs) in enumerate(zip(reward_funcs, reward_kwargs)):
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"{kwargs_field}[{i}] must be a mapping of argument names to values, got {kwargs!r}.")
        try:
            funcs.append(resolve_reward_func(func, kwargs))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{field}[{i}]: {error}") from None
    return funcs


def reward_log_names(reward_funcs: Any, reward_kwargs: Sequence[dict[str, Any] | None] | None = None) -> list[str]:
    """The names reward functions (callables, built-in names, URLs or import paths, with `reward_kwargs` as in
    `resolve_reward_funcs`) are logged under, in order: each function's name, with its position appended when an
    earlier one has the same name (say two remote scorers), which would otherwise overwrite its logs. Nothing is
    loaded: model rewards load on their first call."""
    names: list[str] = []
    for func in resolve_reward_funcs(reward_funcs, reward_kwargs):
        name = reward_func_name(func)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


class RewardSet:
    """Reward functions resolved from callables, built-in names, URLs or import paths, with unique log names and
    weights. Calling it scores a batch with every function (see `score_images`)."""

    def __init__(
        self,
        reward_funcs: Any,
        weights: Sequence[float] | None = None,
        *,
        field: str = "reward_funcs",
        kwargs: Sequence[dict[str, Any] | None] | None = None,
    ):
        if not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ValueError(f"{field} is empty: give at least one reward function.")
        self.funcs = resolve_reward_funcs(reward_funcs, kwargs, field)
        for func in self.funcs:
            _check_signature(func, field)
            remote = getattr(func, "image_reward", func)  # video_reward wraps the image reward it scores frames with
            if isinstance(remote, (RemoteReward, VLMJudge, PairwiseWinRate)):
                try:
                    remote.check_reachable()
                except RemoteRewardError as error:
                    raise RemoteRewardError(f"{field}: {error}", url=error.url, attempts=1) from None
        self.names = reward_log_names(self.funcs)
        #: Which functions score a whole group per call (see `trl_guard.rewards.group_reward`).
        self.groupwise = [is_group_reward(func) for func in self.funcs]
        weights = list(weights) if weights is not None else [1.0] * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.funcs)} reward functions; give one weight "
                "per function."
            )
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.funcs)

    def check_columns(self, datasets: dict[str, Any]) -> None:
        """Let each reward that reads dataset columns by name (a judge's question template) refuse, before the
        pipeline loads, a dataset without them."""
        for func in self.funcs:
            reward = getattr(func, "image_reward", func)
            if hasattr(reward, "check_columns"):
                for name, dataset in datasets.items():
                    if dataset is not None and hasattr(dataset, "column_names"):
                        reward.check_columns(dataset.column_names, dataset_name=name)

    def place(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """Put model-based rewards on the trainer's device (they load there lazily, on first call)."""
        for func in self.funcs:
            if hasattr(func, "place"):
                func.place(device, dtype)

    @property
    def has_group_rewards(self) -> bool:
        return any(self.groupwise)

    def __call__(
        self, prompts: list[str], images: list[Image.Image], columns: dict[str, list] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """The (num_images, num_funcs) scores of the per-sample functions; group-wise ones' columns are NaN (see
        `score_groups`)."""
        return self._score(prompts, images, columns, group=False, **kwargs)

    def score_groups(
        self,
        prompts: list[str],
        images: list[Image.Image],
        columns: dict[str, list] | None = None,
        *,
        num_generations: int,
        groups: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The (num_images, num_funcs) scores of the group-wise functions, each called once per group: the
        consecutive runs of `num_generations` images (only the groups numbered in `groups`, if given). Other entries
        are NaN."""
        columns = columns or {}
        if len(images) % num_generations:
            raise ValueError(f"{len(images)} images are no whole number of groups of {num_generations}.")
        scores = torch.full((len(images), len(self.funcs)), float("nan"))
        for group in range(len(images) // num_generations) if groups is None else groups:
            rows = slice(group * num_generations, (group + 1) * num_generations)
            scores[rows] = self._score(
                prompts[rows],
                images[rows],
                {key: values[rows] for key, values in columns.items()},
                group=True,
                **kwargs,
            )
        return scores

    def _score(self, prompts, images, columns, *, group: bool, **kwargs: Any) -> torch.Tensor:
        chosen = [j for j, groupwise in enumerate(self.groupwise) if groupwise == group]
        scores = torch.full((len(images), len(self.funcs)), float("nan"))
        if chosen:
            funcs, names = [self.funcs[j] for j in chosen], [self.names[j] for j in chosen]
            scores[:, chosen] = score_images(funcs, names, prompts, images, columns, **kwargs)
        return scores

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """Weighted sum over functions; a function's `None` (NaN) counts as missing, not as 0."""
        return (scores * self.weights.to(scores.device)).nansum(dim=1)
