"""Reward functions fail early and by name: values float32 cannot hold, dataset columns that collide with the
keywords rewards are called with, and signatures a keyword call cannot fill."""

import asyncio
import math
import time

import pytest
import torch
from PIL import Image

from trl_guard.scoring import REWARD_KEYWORDS, RewardSet, check_reward_columns, score_images

PROMPTS = ["a red square", "a blue circle"]
IMAGES = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]


def constant_reward(value):
    def big_reward(prompts, images, **kwargs):
        return [0.5, value]

    return big_reward


@pytest.mark.parametrize("value", [1e39, -1e39, float("inf"), float("-inf"), float("nan")])
def test_values_float32_cannot_hold_name_the_function_and_value(value):
    rewards = RewardSet([constant_reward(value)])
    with pytest.raises(ValueError, match=r"'big_reward' returned .* for prompt 'a blue circle'") as error:
        rewards(PROMPTS, IMAGES)
    assert str(value) in str(error.value) and "float32" in str(error.value)


def test_large_values_float32_holds_are_kept_and_none_is_missing():
    largest = float(torch.finfo(torch.float32).max)
    scores = RewardSet([constant_reward(largest), constant_reward(None)])(PROMPTS, IMAGES)
    assert scores.dtype == torch.float32
    assert scores[1, 0].item() == largest and scores[0, 0].item() == 0.5
    assert math.isnan(scores[1, 1].item())


@pytest.mark.parametrize("column", REWARD_KEYWORDS)
def test_columns_named_like_the_reward_keywords_are_refused(column):
    with pytest.raises(ValueError, match=rf"train_dataset has a column named '{column}'") as error:
        check_reward_columns(["prompt", "label", column])
    assert f"rename_column('{column}', " in str(error.value)


def test_other_columns_pass():
    check_reward_columns(["prompt", "image", "label", "prompts_extra"], dataset_name="eval_dataset")


def test_colliding_column_is_refused_before_any_reward_runs():
    calls = []

    def reward(prompts, images, **kwargs):
        calls.append(kwargs)
        return [0.0] * len(images)

    with pytest.raises(ValueError, match=r"column named 'trainer_state'.*rename_column"):
        score_images([reward], ["reward"], PROMPTS, IMAGES, {"trainer_state": [1, 2]}, trainer_state=None)
    with pytest.raises(ValueError, match=r"column named 'images'"):
        score_images([reward], ["reward"], PROMPTS, IMAGES, {"images": [1, 2]})
    assert calls == []
    # the same columns under other names reach the reward
    score_images([reward], ["reward"], PROMPTS, IMAGES, {"label": [1, 2]}, trainer_state="state")
    assert calls == [{"label": [1, 2], "trainer_state": "state"}]


def test_positional_only_prompts_and_images_are_refused_at_construction():
    def positional_reward(prompts, images, /, **kwargs):
        return [0.0] * len(images)

    with pytest.raises(
        ValueError, match=r"gold_reward_funcs: the reward function 'positional_reward' takes prompts, "
    ):
        RewardSet([positional_reward], field="gold_reward_funcs")


def test_positional_only_parameters_with_defaults_are_accepted():
    def reward(scale=1.0, /, **kwargs):  # a keyword call leaves `scale` at its default
        return [scale] * len(kwargs["images"])

    assert RewardSet([reward])(PROMPTS, IMAGES).tolist() == [[1.0], [1.0]]


def latency_reward(value, seconds, log):
    async def slow_reward(prompts, images, **kwargs):
        log.append(("start", value))
        await asyncio.sleep(seconds)
        log.append(("end", value))
        return [value] * len(images)

    return slow_reward


def test_async_rewards_are_awaited_concurrently_within_a_call():
    log = []

    def plain(prompts, images, **kwargs):
        log.append(("plain", None))
        return [9.0] * len(images)

    rewards = RewardSet([latency_reward(float(i), 0.4, log) for i in range(3)] + [plain])
    start = time.perf_counter()
    scores = rewards(PROMPTS, IMAGES, trainer_state=None)
    elapsed = time.perf_counter() - start
    assert scores.tolist() == [[0.0, 1.0, 2.0, 9.0]] * 2  # each function's values in its own column
    assert elapsed < 0.8  # one wait of 0.4 s, not three
    events = [event for event, _ in log]
    assert max(i for i, e in enumerate(events) if e == "start") < min(i for i, e in enumerate(events) if e == "end")


def test_async_rewards_are_checked_and_their_errors_raised_by_name():
    async def short_reward(prompts, images, **kwargs):
        return [1.0]

    async def failing_reward(prompts, images, **kwargs):
        raise RuntimeError("judge crashed")

    with pytest.raises(ValueError, match=r"'short_reward' returned 1 values for 2 images"):
        RewardSet([short_reward])(PROMPTS, IMAGES)
    with pytest.raises(RuntimeError, match="judge crashed"):
        RewardSet([latency_reward(1.0, 0.0, []), failing_reward])(PROMPTS, IMAGES)


def test_async_rewards_run_from_a_thread_that_already_runs_an_event_loop():
    rewards = RewardSet([latency_reward(0.5, 0.01, [])])

    async def notebook_cell():
        return rewards(PROMPTS, IMAGES)

    assert asyncio.run(notebook_cell()).tolist() == [[0.5], [0.5]]
