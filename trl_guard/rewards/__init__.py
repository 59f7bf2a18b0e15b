"""Reward functions and how names resolve to them.

A reward function is any callable ``f(prompts, images, **kwargs) -> list[float | None]`` with one value per image:
``prompts`` is a list of str, ``images`` a list of PIL images, and ``kwargs`` carries the dataset's other columns
(one list per column) and ``trainer_state``. ``None`` marks a sample the function does not apply to.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .compression import jpeg_compressibility, jpeg_incompressibility

RewardFunc = Callable[..., list]

BUILTIN_REWARDS: dict[str, RewardFunc] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


def resolve_reward_func(reward: str | RewardFunc) -> RewardFunc:
    """A callable for ``reward``: the callable itself, a built-in name, or a dotted import path ``pkg.mod.func``."""
    if callable(reward):
        return reward
    if not isinstance(reward, str):
        raise TypeError(f"A reward function must be a callable or a str, got {type(reward).__name__}.")
    if reward in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[reward]
    if "." in reward:
        module_name, _, attr = reward.rpartition(".")
        try:
            func = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Cannot import reward function {reward!r}: {error}") from error
        if not callable(func):
            raise TypeError(f"{reward!r} is not callable.")
        return func
    raise ValueError(
        f"Unknown reward function {reward!r}. Built-in rewards: {', '.join(sorted(BUILTIN_REWARDS))}; "
        "or give a dotted import path such as 'my_package.rewards.my_reward'."
    )


def reward_func_name(reward: str | RewardFunc) -> str:
    if isinstance(reward, str):
        return reward.rpartition(".")[2]
    return getattr(reward, "__name__", type(reward).__name__)


__all__ = [
    "BUILTIN_REWARDS",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "resolve_reward_func",
    "reward_func_name",
]
