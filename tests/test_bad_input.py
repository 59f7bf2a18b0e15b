"""Bad input fails early with an error that names the field and the fix."""

import pytest
import torch
from conftest import blueness
from datasets import Dataset
from helpers import make_trainer

from trl_guard.adapters import get_adapter

MISSING = "/nonexistent/pipeline"  # loading it would fail: errors raised first prove nothing was loaded


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (Dataset.from_dict({"text": ["a cat"] * 4}), "no 'prompt' column"),
        (Dataset.from_dict({"prompt": ["a cat", "", "a dog", "x"]}), r"train_dataset\['prompt'\]\[1\]"),
        (Dataset.from_dict({"prompt": ["a cat", None, "a dog", "x"]}), r"non-empty string"),
        (Dataset.from_dict({"prompt": []}), "empty"),
        (Dataset.from_dict({"prompt": ["a cat"]}), "distinct prompts"),
    ],
)
def test_bad_datasets_fail_before_loading_the_model(dataset, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_trainer(MISSING, [blueness], dataset, tmp_path)


def test_bad_reward_specs_fail_before_loading_the_model(prompts, tmp_path):
    with pytest.raises(ValueError, match="jpeg_compressibility"):  # the error lists the built-in rewards
        make_trainer(MISSING, ["pickscor"], prompts, tmp_path)
    with pytest.raises(ValueError, match="reward_weights"):
        make_trainer(MISSING, [blueness], prompts, tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="Cannot import"):
        make_trainer(MISSING, ["no_such_module.reward"], prompts, tmp_path)


def test_resolution_the_transformer_cannot_take(tiny_pipeline, prompts, tmp_path):
    with pytest.raises(ValueError, match="height=30"):
        make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, height=30)
    with pytest.raises(ValueError, match="width=512"):
        make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, width=512)


def test_scheduler_must_be_flow_matching(tiny_pipeline, prompts, tmp_path):
    from diffusers import EulerDiscreteScheduler

    tiny_pipeline.scheduler = EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        make_trainer(tiny_pipeline, [blueness], prompts, tmp_path)


def test_unsupported_pipeline_class_names_the_supported_ones():
    class MyPipeline:
        pass

    with pytest.raises(ValueError, match="StableDiffusion3Pipeline"):
        get_adapter(MyPipeline())


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda n: [0.5] * (n - 1), "returned 7 values for 8 images"),
        (lambda n: ["high"] * n, "returned a str for prompt"),
        (lambda n: [float("nan")] * n, "returned nan for prompt 'prompt number"),
        (lambda n: [0.1] * (n - 1) + [float("inf")], "returned inf for prompt"),
        (lambda n: [None] * n, "Every reward function returned None"),
    ],
)
def test_bad_reward_values_name_the_function_and_prompt(returned, message, tiny_pipeline, prompts, tmp_path):
    def faulty_reward(prompts, images, **kwargs):
        return returned(len(images))

    trainer = make_trainer(tiny_pipeline, [faulty_reward], prompts, tmp_path, max_steps=1)
    before = {k: v.clone() for k, v in trainer.adapter.lora_state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        trainer.train()
    if "None" not in message:
        assert "faulty_reward" in str(error.value)
    after = trainer.adapter.lora_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
