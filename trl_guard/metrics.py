"""The names the trainer logs under, in one place: the trainer writes them; the report, the model card, the demo,
the benchmarks and the tests read them.

======================================  ======================================================================
name                                    what
======================================  ======================================================================
``timestep/{i:02d}/{stat}``             a per-step diagnostic at sampling step ``i`` (a `Stat` name)
``rewards/{name}/mean``, ``/std``       each reward function over a generation round
``{prefix}_reward``                     evaluation: the weighted sum of the reward functions (the proxy)
``{prefix}_rewards/{name}``             evaluation: each reward function
``{prefix}_gold/{name}``                evaluation: each gold reward (never trained on)
``{prefix}_kl``                         evaluation: the policy's KL from the base policy (``eval_kl``)
======================================  ======================================================================

``prefix`` is ``evaluate()``'s ``metric_key_prefix``, ``"eval"`` by default.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


class Stat:
    """The names of the scalar statistics the trainer logs, averaged over timesteps and, for the per-step ones, per
    timestep under ``timestep/{i:02d}/{name}``. The losses return their diagnostics under these names."""

    # per training unit (sampling step), from the losses and the trainer
    LOG_RATIO_MEAN = "log_ratio_mean"
    LOG_RATIO_STD = "log_ratio_std"
    RAW_LOG_RATIO_MEAN = "raw_log_ratio_mean"
    CLIP_FRAC_HIGH = "clip_frac_high"
    CLIP_FRAC_LOW = "clip_frac_low"
    # Flow-DPPO's mask, its stand-in for the clip: samples masked with A > 0 (r > 1) and with A < 0 (r < 1), and the
    # mean KL score the mask compares with its threshold
    MASK_FRAC_POS = "mask_frac_pos"
    MASK_FRAC_NEG = "mask_frac_neg"
    KL_SCORE = "kl_score"
    WEIGHT = "weight"
    KL = "kl"
    GRAD_NORM = "grad_norm"
    # per generation round
    REWARD = "reward"
    REWARD_STD = "reward_std"
    FRAC_REWARD_ZERO_STD = "frac_reward_zero_std"
    ADVANTAGES_ABS_MEAN = "advantages/abs_mean"
    ADVANTAGES_MAX = "advantages/max"
    ADVANTAGES_MIN = "advantages/min"
    SDE_WINDOW_START = "sde_window_start"


TIMESTEP = "timestep/"
REWARDS = "rewards/"
EVAL_REWARD = "eval_reward"
EVAL_REWARDS = "eval_rewards/"
EVAL_GOLD = "eval_gold/"
EVAL_KL = "eval_kl"


def timestep_key(step: int, stat: str) -> str:
    """``timestep_key(3, "grad_norm") == "timestep/03/grad_norm"``."""
    return f"{TIMESTEP}{step:02d}/{stat}"


def parse_timestep_key(key: str) -> tuple[int, str] | None:
    """``(step, stat)`` of a per-step key, or None for any other key.

    Example:
        >>> parse_timestep_key("timestep/03/grad_norm"), parse_timestep_key("reward")
        ((3, 'grad_norm'), None)
    """
    if not key.startswith(TIMESTEP):
        return None
    _, step, stat = key.split("/", 2)
    return int(step), stat


def reward_key(name: str, stat: str) -> str:
    return f"{REWARDS}{name}/{stat}"


def advantage_key(name: str, stat: str) -> str:
    """Where a statistic of one reward function's own (group-normalised) advantage is logged."""
    return f"advantages/{name}/{stat}"


def eval_reward_key(prefix: str = "eval") -> str:
    return f"{prefix}_reward"


def eval_rewards_key(name: str, prefix: str = "eval") -> str:
    return f"{prefix}_rewards/{name}"


def eval_gold_key(name: str, prefix: str = "eval") -> str:
    return f"{prefix}_gold/{name}"


def eval_kl_key(prefix: str = "eval") -> str:
    return f"{prefix}_kl"


def eval_keys(
    reward_names: Iterable[str], gold_names: Iterable[str], eval_kl: bool, prefix: str = "eval"
) -> list[str]:
    """The keys of the metrics an evaluation logs (and hands to callbacks), for reward functions logged under
    ``reward_names`` and gold rewards under ``gold_names``: known before training, for checks that refuse early."""
    keys = [eval_rewards_key(name, prefix) for name in reward_names] + [eval_reward_key(prefix)]
    keys += [eval_gold_key(name, prefix) for name in gold_names]
    return keys + ([eval_kl_key(prefix)] if eval_kl else [])


def timestep_values(history: Iterable[dict], keep=lambda entry: True) -> dict[str, dict[int, list[float]]]:
    """``{stat: {step: [values]}}`` of every per-step diagnostic in the logged entries that ``keep`` accepts."""
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in history:
        if not keep(entry):
            continue
        for key, value in entry.items():
            parsed = parse_timestep_key(key)
            if parsed is not None:
                values[parsed[1]][parsed[0]].append(value)
    return values
