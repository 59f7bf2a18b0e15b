"""Everything up to the upload: the folder, the card, a load_lora_weights round trip, and the upload call."""

import numpy as np
import pytest
import torch
from conftest import blueness
from datasets import Dataset
from diffusers import StableDiffusion3Pipeline
from helpers import make_trainer


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, never touches the network."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise ConnectionError("the Hub is unreachable")
        return "commit"


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    return hub


def push_config(**overrides):
    return dict(
        push_to_hub=True,
        hub_model_id="someone/tiny-guard",
        hub_token="hf_not_a_real_token",
        hub_strategy="end",
        **overrides,
    )


@pytest.mark.parametrize("loss_type", ["grpo_guard", "nft"])
def test_push_uploads_a_folder_that_loads_and_carries_a_complete_card(
    fake_hub, tiny_pipeline_dir, prompts, tmp_path, loss_type
):
    load = dict(text_encoder_3=None, tokenizer_3=None)
    trainer = make_trainer(
        tiny_pipeline_dir,
        [blueness],
        prompts,
        tmp_path / "out",
        max_steps=2,
        model_init_kwargs=load,
        eval_strategy="steps",
        eval_steps=2,
        eval_num_inference_steps=3,
        eval_dataset=Dataset.from_dict({"prompt": ["a red square", "a blue circle"]}),
        gold_reward_funcs=["jpeg_compressibility"],
        loss_type=loss_type,
        **push_config(),
    )
    trainer.train()
    trainer.push_to_hub()

    uploads = [c[1] for c in fake_hub.calls if c[0] == "upload_folder"]
    assert uploads and uploads[-1]["repo_id"] == "someone/tiny-guard"
    assert uploads[-1]["folder_path"] == str(tmp_path / "out")
    assert "checkpoint-*" in uploads[-1]["ignore_patterns"]

    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    for needle in (
        "library_name: diffusers",
        "- trl-guard",
        "- lora",
        "- text-to-image",
        f"- {loss_type.replace('_', '-')}",
        "load_lora_weights",
        "rewards/blueness/mean",
        "eval_reward",
        "eval_gold/jpeg_compressibility",
        *({"grpo_guard": ("2510.22319", "2505.05470"), "nft": ("2509.16117",)}[loss_type]),  # the family's papers
        "TRL",
        f"`loss_type` | `{loss_type}`",
        "images/samples.png",
    ):
        assert needle in card, needle
    assert (out / "images" / "samples.png").exists()
    assert "hf_not_a_real_token" not in card + (out / "guard_config.json").read_text()

    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, **load)
    fresh.set_progress_bar_config(disable=True)
    sample = dict(
        height=32, width=32, num_inference_steps=4, guidance_scale=1.0, max_sequence_length=16, output_type="np"
    )
    base = fresh("a red square", generator=torch.Generator().manual_seed(0), **sample).images
    fresh.load_lora_weights(str(out))
    tuned = fresh("a red square", generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(tuned - base).mean() > 1e-3


def test_failed_upload_keeps_the_output_and_says_why(monkeypatch, tiny_pipeline, prompts, tmp_path):
    hub = FakeHub(fail=True)
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=1, **push_config())
    trainer.train()
    with pytest.raises(RuntimeError, match="intact") as error:
        trainer.push_to_hub()
    assert "someone/tiny-guard" in str(error.value) and "unreachable" in str(error.value)
    assert "hf_not_a_real_token" not in str(error.value)
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists() and (tmp_path / "README.md").exists()


def test_push_without_a_token_fails_before_loading_anything(monkeypatch, prompts, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ValueError, match="hf auth login"):
        make_trainer("/nonexistent/pipeline", [blueness], prompts, tmp_path, push_to_hub=True)


def test_card_names_a_hub_base_model_in_its_metadata(tiny_pipeline, prompts, tmp_path):
    from trl_guard.hub import write_model_card

    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path)
    card = open(
        write_model_card(trainer, str(tmp_path), "stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3Pipeline")
    ).read()
    assert "base_model: stabilityai/stable-diffusion-3.5-medium" in card
    assert "(https://huggingface.co/stabilityai/stable-diffusion-3.5-medium)" in card
