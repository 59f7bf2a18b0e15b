"""Reward functions and how names resolve to them.

A reward function is any callable ``f(prompts, images, **kwargs) -> list[float | None]`` with one value per image:
``prompts`` is a list of str, ``images`` a list of PIL images, and ``kwargs`` carries the dataset's other columns
(one list per column) and ``trainer_state``. ``None`` marks a sample the function does not apply to.

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
======================== =============================================== ======================================

Video families (Wan) pass one list of frames per sample as ``images``; :func:`video_reward` lifts any image reward
to such videos by scoring their frames and reducing (mean or min) per video.

Editing families (FLUX.1 Kontext) read each row's source image from the dataset's ``image`` column, so reward
functions receive it as the ``image`` keyword argument, one per sample, next to the edited ``images``.

A string starting with ``http://`` or ``https://`` becomes a :class:`RemoteReward` for that URL (its module docstring
specifies the JSON protocol a scoring server implements), and any other string with a dot is imported as
``package.module.function``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .base import ModelReward
from .clip import AestheticReward, ClipScoreReward, ImageSimilarityReward, PickScoreReward
from .compression import jpeg_compressibility, jpeg_incompressibility
from .external import HPSv2Reward, ImageRewardReward
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
BUILTIN_REWARDS: dict[str, Callable[[], RewardFunc]] = {
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
}


def resolve_reward_func(reward: str | RewardFunc) -> RewardFunc:
    """A callable for ``reward``: the callable itself, a built-in name, a URL, or a dotted import path."""
    if callable(reward):
        return reward
    if not isinstance(reward, str):
        raise TypeError(f"A reward function must be a callable or a str, got {type(reward).__name__}.")
    if reward in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[reward]()
    if reward.startswith(("http://", "https://")):
        return RemoteReward(reward)
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
        "or give a URL (http://...) of a remote scorer, or a dotted import path such as 'my_package.rewards.my_reward'."
    )


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
    "PickScoreReward",
    "RemoteReward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "resolve_reward_func",
    "reward_func_name",
    "video_reward",
]
