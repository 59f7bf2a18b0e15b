"""Bad input fails early with an error that names the field and the fix."""

import pytest
import torch
from conftest import blueness
from datasets import Dataset
from helpers import logged, make_trainer

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


@pytest.mark.parametrize("returned", [{"a": 1.0}, {0.1, 0.2}, "0.5", 0.5])
def test_rewards_must_return_a_sequence(returned, tiny_pipeline, prompts, tmp_path):
    def dict_reward(prompts, images, **kwargs):
        return returned

    trainer = make_trainer(tiny_pipeline, [dict_reward], prompts, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="it must return a list"):
        trainer.train()


def test_rewards_may_return_arrays_and_tensors(tiny_pipeline, prompts, tmp_path):
    import numpy as np

    from trl_guard.metrics import reward_key

    def array_reward(prompts, images, **kwargs):
        return np.asarray(blueness(prompts, images))

    def tensor_reward(prompts, images, **kwargs):
        return torch.tensor(blueness(prompts, images))

    trainer = make_trainer(tiny_pipeline, [blueness, array_reward, tensor_reward], prompts, tmp_path, max_steps=1)
    trainer.train()
    # the three score the same images with the same numbers: an array or a tensor is read as the list would be
    for stat in ("mean", "std"):
        (listed,) = logged(trainer, reward_key("blueness", stat))
        assert 0 < listed < 1  # blueness is in [0, 1], and the 8 images differ
        assert logged(trainer, reward_key("array_reward", stat)) == [listed]
        assert logged(trainer, reward_key("tensor_reward", stat)) == [listed]


def test_reward_without_kwargs_fails_at_construction(prompts, tmp_path):
    def strict_reward(prompts, images):
        return [0.0] * len(images)

    with pytest.raises(ValueError, match=r"no \*\*kwargs"):
        make_trainer(MISSING, [strict_reward], prompts, tmp_path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "a cat"}, {"prompt": None}] * 4, r"\['prompt'\]\[1\] is None"),
        ([{"prompt": "a cat"}, {"prompt": " "}] * 4, r"\['prompt'\]\[1\]"),
        ([{"prompt": "a cat"}, {"text": "a dog"}] * 4, r"train_dataset\[1\]"),
        ([], "empty"),
    ],
)
def test_list_of_dicts_is_validated(rows, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_trainer(MISSING, [blueness], rows, tmp_path)


def test_list_of_dicts_trains(tiny_pipeline, tmp_path):
    rows = [{"prompt": f"prompt number {i}", "label": i} for i in range(8)]
    trainer = make_trainer(tiny_pipeline, [blueness], rows, tmp_path, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1


def test_iterable_dataset_is_refused_at_construction(prompts, tmp_path):
    with pytest.raises(ValueError, match="IterableDataset"):
        make_trainer(MISSING, [blueness], prompts.to_iterable_dataset(), tmp_path)


def test_missing_local_path_says_it_does_not_exist(prompts, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_trainer(str(tmp_path / "no" / "such" / "pipeline"), [blueness], prompts, tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size=0"),
        (dict(model_init_kwargs='{"torch_dtype": bfloat16}'), "model_init_kwargs=.*not valid JSON"),
        (dict(model_init_kwargs='{"torch_dtype": "bf16"}'), "dtype='bf16' is unknown"),
        (dict(model_init_kwargs="[1, 2]"), "must be a JSON object"),
    ],
)
def test_config_errors_name_the_field(overrides, message, tmp_path):
    from helpers import tiny_config

    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides)


def test_report_on_a_missing_folder_and_a_named_checkpoint(tmp_path):
    import json

    from trl_guard.report import load_log_history

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_log_history(str(tmp_path / "nothing-here"))
    for name, history in (("checkpoint-best", [{"step": 1}]), ("checkpoint-4", [{"step": 4}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert load_log_history(str(tmp_path)) == [{"step": 4}]


def test_demo_refuses_zero_steps(capsys):
    from trl_guard.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_unreachable_remote_reward_fails_at_construction(prompts, tmp_path):
    import socket

    from trl_guard.rewards import video_reward
    from trl_guard.rewards.remote import RemoteRewardError

    with socket.socket() as probe:  # a port nothing listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RemoteRewardError, match=rf"gold_reward_funcs: .*127.0.0.1:{port}/score is unreachable"):
        make_trainer(MISSING, [blueness], prompts, tmp_path, gold_reward_funcs=[f"http://127.0.0.1:{port}/score"])
    # also when a video reward scores frames with it
    with pytest.raises(RemoteRewardError, match=rf"reward_funcs: .*127.0.0.1:{port}/score is unreachable"):
        make_trainer(MISSING, [video_reward(f"http://127.0.0.1:{port}/score")], prompts, tmp_path)


def test_guidance_scale_2_is_refused_by_a_one_denoiser_family(tiny_pipeline, prompts, tmp_path):
    with pytest.raises(ValueError, match="guidance_scale_2=3.0, but StableDiffusion3Pipeline has one denoiser"):
        make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, guidance_scale_2=3.0)
