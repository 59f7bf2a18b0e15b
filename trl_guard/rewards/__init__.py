"""Reward functions and how names resolve to them.

A reward function is any callable ``f(prompts, images, **kwargs) -> list[float | None]`` with one value per image:
``prompts`` is a list of str, ``images`` a list of PIL images, and ``kwargs`` carries the dataset's other columns
(one list per column) and ``trainer_state``. ``None`` marks a sample the function does not apply to. A reward may be
an ``async def`` function (TRL's convention for rewards that wait on a server): the async rewards of a call are
awaited concurrently with each other.

Built-in names (``reward_funcs=["pickscore", ...]`` in Python or YAML):

======================== =============================================== ======================================
name                     callable                                        needs
======================== =============================================== ======================================
``pickscore``            :class:`PickScoreReward`                        core (downloads PickScore_v1)
``clip_score``           :class:`ClipScoreReward`                        core (downloads a CLIP)
``aesthetic``            :class:`AestheticReward`                        core (downloads CLIP-L + head)
``image_reward``         :class:`ImageRewardReward`                      ``trl-guard[image_reward]``
``hpsv2``                :class:`HPSv2Reward`                            ``trl-guard[hpsv2]``
``ocr``                  :class:`OcrReward`                              ``trl-guard[ocr]`` (offline models)
``jpeg_compressibility`` :func:`jpeg_compressibility`                    core
``jpeg_incompressibility`` :func:`jpeg_incompressibility`                core
``video_ocr``            ``video_reward(OcrReward(), frame_stride=4)``   ``trl-guard[ocr]``; videos (Wan)
``image_similarity``     :class:`ImageSimilarityReward`                  core (downloads a CLIP); editing
``vlm_judge``            :class:`VLMJudge` (arguments required)          a served VLM (vLLM, SGLang)
``win_rate``             :class:`PairwiseWinRate` (arguments required)   a served VLM; group-wise
======================== =============================================== ======================================

A built-in name or a URL takes keyword arguments: ``resolve_reward_func("vlm_judge", {"base_url": ..., "model": ...})``
in Python, or a recipe's ``reward_kwargs`` list (one mapping per entry of ``reward_funcs``, in order).

Video families (Wan) pass one list of frames per sample as ``images``; :func:`video_reward` lifts any image reward
to such videos by scoring their frames and reducing (mean or min) per video.

Editing families (FLUX.1 Kontext) read each row's source image from the dataset's ``image`` column, so reward
functions receive it as the ``image`` keyword argument, one per sample, next to the edited ``images``.

Group-wise rewards score one prompt's whole group at once (pairwise comparisons, ranks, win rates): a function
marked with :func:`group_reward` (or an object whose class sets ``scores_groups = True``) keeps the signature above,
but the trainer calls it once per group, after the whole round is sampled, with that group's ``num_generations``
images (gathered from every process), their prompts (all the same) and columns; the groups of a round are shared
out among the processes. Evaluation scores no group reward (it samples one image per prompt): its
``eval_rewards/<name>`` is NaN and it is left out of ``eval_reward``.

A string starting with ``http://`` or ``https://`` becomes a :class:`RemoteReward` for that URL (its module docstring
specifies the JSON protocol a scoring server implements), and any other string with a dot is imported as
``package.module.function``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from .base import ModelReward
from .clip import AestheticReward, ClipScoreReward, ImageSimilarityReward, PickScoreReward
from .compression import jpeg_compressibility, jpeg_incompressibility
from .external import HPSv2Reward, ImageRewardReward
from .judge import PairwiseWinRate, VLMJudge
from .remote import RemoteReward
from .video import video_reward

RewardFunc = Callable[..., list]


def _ocr():
    from .ocr import OcrReward

    return OcrReward()


def _video_ocr():
    # Flow-GRPO's Wan reward ("video_ocr") reads every 4th frame and averages.
    return video_reward(_ocr(), reduce="mean", frame_stride=4, name="video_ocr")


# name -> a factory of the reward callable, so model rewards are built (not loaded) only when named
BUILTIN_REWARDS: dict[str, Callable[..., RewardFunc]] = {
    "pickscore": PickScoreReward,
    "clip_score": ClipScoreReward,
    "aesthetic": AestheticReward,
    "image_reward": ImageRewardReward,
    "hpsv2": HPSv2Reward,
    "ocr": _ocr,
    "jpeg_compressibility": lambda: jpeg_compressibility,
    "jpeg_incompressibility": lambda: jpeg_incompressibility,
    "video_ocr": _video_ocr,
    "image_similarity": ImageSimilarityReward,
    "vlm_judge": VLMJudge,
    "win_rate": PairwiseWinRate,
}


_NO_ARGUMENTS = (
    "Reward {reward!r} takes no arguments here (got {names}): they go to built-in rewards and URLs only. Bind them in "
    "your own code instead, for example as the attributes of a class whose instance is the reward."
)


def resolve_reward_func(reward: str | RewardFunc, kwargs: dict[str, Any] | None = None) -> RewardFunc:
    """A callable for ``reward``: the callable itself, a built-in name, a URL, or a dotted import path.

    ``kwargs`` are keyword arguments of a built-in reward (``vlm_judge`` needs ``base_url`` and ``model``) or of the
    :class:`RemoteReward` a URL becomes (``timeout``, ``name``, ...); a callable or an import path takes none.
    """
    if kwargs and not isinstance(kwargs, dict):
        raise TypeError(f"The arguments of reward {reward!r} must be a mapping, got {type(kwargs).__name__}.")
    kwargs = kwargs or {}
    if callable(reward):
        if kwargs:
            raise ValueError(_NO_ARGUMENTS.format(reward=reward_func_name(reward), names=sorted(kwargs)))
        return reward
    if not isinstance(reward, str):
        raise TypeError(f"A reward function must be a callable or a str, got {type(reward).__name__}.")
    if reward in BUILTIN_REWARDS:
        return _build(reward, BUILTIN_REWARDS[reward], kwargs)
    if reward.startswith(("http://", "https://")):
        return _build(reward, partial(RemoteReward, reward), kwargs)
    if "." in reward:
        if kwargs:
            raise ValueError(_NO_ARGUMENTS.format(reward=reward, names=sorted(kwargs)))
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
        "or give a URL (http://...) of a remote scorer, or a dotted import path such as 'my_package.rewards.my_reward'."
    )


def _build(reward: str, factory: Callable[..., RewardFunc], kwargs: dict[str, Any]) -> RewardFunc:
    """``factory(**kwargs)``, with a wrong or missing argument named against the reward, not the factory."""
    # A URL may hold a password: such messages name only that it is one.
    shown = "a URL" if reward.startswith(("http://", "https://")) else repr(reward)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        raise ValueError(f"Reward {shown}: {error} (arguments given: {sorted(kwargs) or 'none'}).") from None
    try:
        return factory(**kwargs)
    except TypeError as error:  # a factory whose own signature is **kwargs, forwarded to one that refuses a name
        if not kwargs:
            raise
        raise ValueError(f"Reward {shown}: {error} (arguments given: {sorted(kwargs)}).") from None


def group_reward(func: RewardFunc) -> RewardFunc:
    """Mark ``func`` as a group-wise reward: the trainer calls it once per group of ``num_generations`` images of one
    prompt, after the round is sampled, rather than on each sampled micro-batch.

    Example:
        >>> @group_reward
        ... def rank(prompts, images, **kwargs):  # 1 for the group's largest image, 0 for its smallest
        ...     order = sorted(range(len(images)), key=lambda i: images[i].width)
        ...     return [order.index(i) / max(len(images) - 1, 1) for i in range(len(images))]
        >>> is_group_reward(rank)
        True
    """
    try:
        func.scores_groups = True
    except AttributeError:
        raise TypeError(
            f"Cannot mark {reward_func_name(func)!r} as a group reward; wrap it in a function, or set "
            "`scores_groups = True` on its class."
        ) from None
    return func


def is_group_reward(func: RewardFunc) -> bool:
    """Whether ``func`` scores one prompt's whole group per call (see :func:`group_reward`)."""
    return getattr(func, "scores_groups", False) is True


def reward_func_name(reward: RewardFunc) -> str:
    """The name a reward is logged under: its `__name__` (functions, built-in reward classes) or its class name."""
    return getattr(reward, "__name__", type(reward).__name__)


__all__ = [
    "BUILTIN_REWARDS",
    "AestheticReward",
    "ClipScoreReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "ImageSimilarityReward",
    "ModelReward",
    "PairwiseWinRate",
    "PickScoreReward",
    "RemoteReward",
    "VLMJudge",
    "group_reward",
    "is_group_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "resolve_reward_func",
    "reward_func_name",
    "video_reward",
]
