"""Built-in rewards load for real from folders written here with tiny random weights of the real architecture."""

import numpy as np
import pytest
import torch
from conftest import blueness
from datasets import Dataset
from helpers import make_trainer
from PIL import Image
from safetensors.torch import save_file

from trl_guard.rewards import (
    AestheticReward,
    ClipScoreReward,
    HPSv2Reward,
    ImageRewardReward,
    PickScoreReward,
    resolve_reward_func,
)
from trl_guard.rewards.clip import AestheticHead
from trl_guard.testing import build_tiny_clip

PROMPTS = ["a red square", "a blue circle", "two green triangles"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.mark.parametrize("cls", [PickScoreReward, ClipScoreReward])
def test_clip_rewards_load_from_a_folder_and_score(cls, clip_dir, images):
    reward = cls(clip_dir, clip_dir, batch_size=2)
    scores = reward(prompts=PROMPTS, images=images)
    assert len(scores) == 3 and all(isinstance(s, float) and np.isfinite(s) for s in scores)
    assert reward(prompts=PROMPTS, images=images) == scores  # deterministic
    if cls is PickScoreReward:
        assert len(set(scores)) == 3  # depends on the (prompt, image) pair
    else:
        assert all(s >= 0 for s in scores)  # CLIP score clamps negative similarities to 0


def test_pickscore_is_scaled_cosine(clip_dir, images):
    pick = PickScoreReward(clip_dir, clip_dir)
    clip = ClipScoreReward(clip_dir, clip_dir)
    pick_scores = np.array(pick(prompts=PROMPTS, images=images))
    cosines = np.array(pick_scores) / float(pick.model.logit_scale.exp())
    expected_clip = np.maximum(100 * cosines, 0)
    np.testing.assert_allclose(clip(prompts=PROMPTS, images=images), expected_clip, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_aesthetic_head_loads_safetensors_or_weights_only_pickle(fmt, clip_dir, images, tmp_path):
    torch.manual_seed(0)
    head = AestheticHead(16)
    path = str(tmp_path / f"head.{fmt}")
    if fmt == "safetensors":
        save_file(head.state_dict(), path)
    else:
        torch.save(head.state_dict(), path)
    reward = AestheticReward(clip_dir, head=path)
    scores = reward(prompts=PROMPTS, images=images)
    embeddings = reward.embed_images(images)
    np.testing.assert_allclose(scores, head.eval()(embeddings).squeeze(-1).tolist(), rtol=1e-5, atol=1e-6)


def test_model_rewards_go_where_the_trainer_places_them(clip_dir, images):
    reward = PickScoreReward(clip_dir, clip_dir)
    reward.place("cpu", torch.bfloat16)
    reward(prompts=PROMPTS[:1], images=images[:1])
    assert reward.model.dtype == torch.bfloat16
    fixed = PickScoreReward(clip_dir, clip_dir, dtype=torch.float32)
    fixed.place("cpu", torch.bfloat16)  # the user's choice wins
    fixed(prompts=PROMPTS[:1], images=images[:1])
    assert fixed.model.dtype == torch.float32


@pytest.mark.parametrize(("cls", "extra"), [(ImageRewardReward, "image_reward"), (HPSv2Reward, "hpsv2")])
def test_missing_optional_dependency_names_the_extra(cls, extra, images, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("ImageReward", "hpsv2") else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=rf'pip install "trl-guard\[{extra}\]"'):
        cls()(prompts=PROMPTS[:1], images=images[:1])


def test_names_resolve_to_the_builtin_rewards():
    for name, cls in [
        ("pickscore", PickScoreReward),
        ("clip_score", ClipScoreReward),
        ("aesthetic", AestheticReward),
        ("image_reward", ImageRewardReward),
        ("hpsv2", HPSv2Reward),
    ]:
        reward = resolve_reward_func(name)
        assert isinstance(reward, cls) and reward.__name__ == name
    with pytest.raises(ValueError, match="pickscore"):
        resolve_reward_func("pick_score")


def test_gold_rewards_are_logged_in_evaluate_and_during_training(tiny_pipeline, prompts, clip_dir, tmp_path):
    from helpers import lora_config, tiny_config

    from trl_guard import GuardGRPODiffusionTrainer

    args = tiny_config(
        tmp_path,
        eval_strategy="steps",
        eval_steps=1,
        max_steps=2,
        per_device_eval_batch_size=4,
        eval_num_inference_steps=3,
    )
    trainer = GuardGRPODiffusionTrainer(
        tiny_pipeline,
        [blueness],
        args=args,
        train_dataset=prompts,
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        peft_config=lora_config(),
        gold_reward_funcs=[PickScoreReward(clip_dir, clip_dir), "jpeg_compressibility"],
    )
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_reward" in e]
    assert len(evals) == 2
    for entry in evals:
        assert {"eval_rewards/blueness", "eval_gold/pickscore", "eval_gold/jpeg_compressibility"} <= set(entry)
    assert (tmp_path / "eval_images" / "step-000002.png").exists()
    assert trainer.gold_rewards.funcs[0].model.device.type == "cpu"


def test_ocr_reward_by_name_trains(tiny_pipeline, tmp_path):
    quoted = Dataset.from_dict({"prompt": [f'a sign that says "WORD{i}"' for i in range(8)]})
    trainer = make_trainer(tiny_pipeline, ["ocr"], quoted, tmp_path, max_steps=1)
    trainer.train()
    scores = [e["rewards/ocr/mean"] for e in trainer.state.log_history if "rewards/ocr/mean" in e]
    assert len(scores) == 1 and 0.0 <= scores[0] <= 1.0  # random 32 px images read as (almost) nothing


def test_pickscore_and_ocr_by_name_train_from_a_yaml_recipe(tiny_pipeline_dir, clip_dir, tmp_path, monkeypatch):
    """`reward_funcs: [pickscore, ..., ocr]`, PickScore's default checkpoint pointed at a local copy (as an offline
    cache would be); the prompts quote nothing, so OCR answers None and the other rewards carry the samples."""
    import trl_guard.rewards.clip as clip_module
    from trl_guard.cli import main

    monkeypatch.setattr(clip_module, "PICKSCORE_MODEL", clip_dir)
    monkeypatch.setattr(clip_module, "PICKSCORE_PROCESSOR", clip_dir)
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt {i}" for i in range(4)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tiny_pipeline_dir}\n"
        'model_init_kwargs: {"text_encoder_3": null, "tokenizer_3": null}\n'
        f"dataset_name: {tmp_path / 'prompts.txt'}\nreward_funcs: [pickscore, jpeg_compressibility, ocr]\n"
        f"output_dir: {tmp_path / 'out'}\nuse_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\n"
        "num_generations: 4\nper_device_train_batch_size: 8\nmax_steps: 1\nheight: 32\nwidth: 32\n"
        "num_inference_steps: 3\nmax_sequence_length: 16\nguidance_scale: 1.0\nreport_to: none\nsave_strategy: 'no'\n"
        "reward_weights: [1.0, 0.1, 1.0]\n"
    )
    main(["grpo", "--config", str(recipe)])
    config = (tmp_path / "out" / "guard_config.json").read_text()
    assert '"reward_weights": [\n    1.0,\n    0.1,\n    1.0\n  ]' in config
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
