"""Reward functions fail early and by name: values float32 cannot hold, dataset columns that collide with the
keywords rewards are called with, and signatures a keyword call cannot fill."""

import math

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
