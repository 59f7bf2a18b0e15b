"""Issue 32, part C: failures a new user hits in the training loop, at a family's limits and before loading.

Divergence stops before a non-finite step reaches the weights (or a checkpoint); non-finite advantages are refused;
`max_sequence_length` above a family's pipeline limit, `guidance_scale_2` on a one-denoiser family and a family that
refuses FSDP2 (`fsdp2_refusal`) under FSDP2 are refused before loading whenever the pipeline class is known (and under
FSDP2 at the latest as soon as the accelerator exists, before any sampling); a missing source image is named by its row
before training."""

import inspect
import json
import re

import diffusers
import numpy as np
import pytest
import torch
from conftest import blueness
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers import logged, make_trainer, tiny_config
from PIL import Image
from safetensors.torch import load_file

from trl_guard import GuardGRPODiffusionTrainer, distributed, preflight
from trl_guard.adapters import ADAPTERS, SamplingSettings, Wan22Adapter, WanAdapter, get_adapter
from trl_guard.trainer import TrainingDivergedError

WAN_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
WAN22_INDEX = {"_class_name": "WanPipeline", "boundary_ratio": 0.875, **WAN_COMPONENTS}
WAN22_INDEX["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
WAN21_INDEX = {"_class_name": "WanPipeline", "boundary_ratio": None, **WAN_COMPONENTS, "transformer_2": [None, None]}


def index_only_folder(path, index: dict) -> str:
    """A pipeline folder with nothing but its `model_index.json`: loading it fails, so an error about the settings
    proves the check ran before loading."""
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps(index))
    return str(path)


def safetensors_in(folder) -> list:
    return sorted(folder.rglob("*.safetensors"))


# ---- item 11: divergence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["nft", "grpo_guard"])
def test_divergence_stops_before_the_non_finite_step_and_saves_nothing_non_finite(
    loss_type, tiny_pipeline, prompts, tmp_path
):
    """At a learning rate of 1e6 the second step's gradients are NaN (and, for GRPO-Guard, its loss inf, which
    transformers would log as 0): training stops there, naming the step and the last finite values, and neither the
    weights nor the checkpoint written after step 1 hold a non-finite value."""
    output_dir = tmp_path / "run"
    trainer = make_trainer(
        tiny_pipeline,
        [blueness],
        prompts,
        output_dir,
        loss_type=loss_type,
        learning_rate=1e6,
        max_steps=4,
        num_inference_steps=2,
        num_generations=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=1,
    )
    with pytest.raises(TrainingDivergedError, match="diverged at optimizer step 2: ") as error:
        trainer.train()
    assert isinstance(error.value, FloatingPointError)
    assert f"The last finite step was 1: loss {logged(trainer, 'loss')[0]:.4g}, gradient norm " in str(error.value)
    assert trainer.state.global_step == 1  # step 2 was not taken
    assert all(torch.isfinite(p).all() for p in trainer.adapter.lora_state_dict().values())
    assert sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    files = safetensors_in(output_dir)
    assert files
    for file in files:
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file


def test_non_finite_advantages_are_refused(tiny_pipeline, prompts, tmp_path):
    """Rewards that are finite one by one but whose weighted totals overflow float32 give NaN advantages: refused by
    name at the round that makes them, before any loss is computed on them."""

    def huge(prompts, images, **kwargs):
        return [3e38] * len(images)

    trainer = make_trainer(tiny_pipeline, [huge], prompts, tmp_path, reward_weights=[2.0], max_steps=1)
    with pytest.raises(ValueError, match=r"advantages of generation round 0 are not finite.*reward_weights"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_logged_grad_norm_is_the_steps_norm_not_a_mean_of_the_timesteps(tiny_pipeline, prompts, tmp_path):
    """`grad_norm` in the logs is the Trainer's: the norm of the whole step's gradient that `max_grad_norm` clips. The
    per-timestep norms (the paper's Fig. 3) are logged under their own keys and used to replace it."""
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path, max_steps=2)
    measured = []
    original = trainer._get_grad_norm

    def recording(model, grad_norm=None):
        norm = original(model, grad_norm=grad_norm)
        measured.append(float(norm))
        return norm

    trainer._get_grad_norm = recording
    trainer.train()
    assert logged(trainer, "grad_norm") == pytest.approx(measured, rel=1e-6)
    assert logged(trainer, "timestep/00/grad_norm")  # the per-timestep norms are still logged


# ---- item 9: max_sequence_length above the family's limit -------------------------------------------------------
def test_max_sequence_length_above_the_family_limit_is_refused(tiny_pipeline, prompts, tmp_path):
    message = r"max_sequence_length={}, but StableDiffusion3Pipeline takes at most 512 text tokens"
    folder = index_only_folder(tmp_path / "sd3", {"_class_name": "StableDiffusion3Pipeline"})
    with pytest.raises(ValueError, match=message.format(100000)):  # before loading a local folder
        make_trainer(folder, [blueness], prompts, tmp_path / "a", max_sequence_length=100000)
    with pytest.raises(ValueError, match=message.format(600)):  # a pipeline object
        make_trainer(tiny_pipeline, [blueness], prompts, tmp_path / "b", max_sequence_length=600)
    with pytest.raises(ValueError, match=message.format(513)):  # a Hub id: once loaded, by the adapter
        get_adapter(tiny_pipeline).configure(SamplingSettings(32, 32, max_sequence_length=513))
    trainer = make_trainer(tiny_pipeline, [blueness], prompts, tmp_path / "c", max_sequence_length=512)
    assert trainer.adapter.settings.max_sequence_length == 512


def test_each_family_declares_its_pipelines_own_limit():
    """Each adapter's `max_sequence_length_limit` is the one its pipelines enforce in the installed diffusers (in
    `check_inputs`: SD3 and FLUX 512, Qwen-Image 1024), and None where they enforce none (Wan, FLUX.2, Z-Image)."""
    declared = {}
    for adapter in ADAPTERS:
        for name in adapter.pipeline_classes:
            source = inspect.getsource(getattr(diffusers, name))
            found = re.search(r"max_sequence_length > (\d+)", source)
            assert adapter.max_sequence_length_limit == (int(found.group(1)) if found else None), (adapter, name)
            declared[name] = adapter.max_sequence_length_limit
    assert declared["StableDiffusion3Pipeline"] == declared["FluxPipeline"] == 512
    assert declared["QwenImagePipeline"] == declared["QwenImageEditPlusPipeline"] == 1024


# ---- guidance_scale_2 before loading ------------------------------------------------------------------------------
def test_guidance_scale_2_is_refused_before_loading_a_one_denoiser_family(prompts, tmp_path):
    sd3 = index_only_folder(tmp_path / "sd3", {"_class_name": "StableDiffusion3Pipeline"})
    with pytest.raises(ValueError, match="guidance_scale_2=3.0, but StableDiffusion3Pipeline has one denoiser"):
        make_trainer(sd3, [blueness], prompts, tmp_path / "a", guidance_scale_2=3.0)
    wan21 = index_only_folder(tmp_path / "wan21", WAN21_INDEX)
    with pytest.raises(ValueError, match="guidance_scale_2=3.0, but WanPipeline has one denoiser"):
        make_trainer(wan21, [blueness], prompts, tmp_path / "b", guidance_scale_2=3.0, guidance_scale=4.0)
    # Wan2.2's folder takes it; loaded without its second expert, it is Wan2.1 again
    wan22 = index_only_folder(tmp_path / "wan22", WAN22_INDEX)
    settings = SamplingSettings(32, 32, guidance_scale=4.0, guidance_scale_2=3.0)
    config = tiny_config(tmp_path / "c", guidance_scale_2=3.0, guidance_scale=4.0)
    assert preflight.family_adapter(wan22, "WanPipeline") is Wan22Adapter
    preflight.check_family_settings(wan22, "WanPipeline", settings, config)
    assert preflight.family_adapter(wan22, "WanPipeline", {"transformer_2": None}) is WanAdapter
    config.model_init_kwargs = {"transformer_2": None}
    with pytest.raises(ValueError, match="guidance_scale_2=3.0, but WanPipeline has one denoiser"):
        preflight.check_family_settings(wan22, "WanPipeline", settings, config)


# ---- a family refusing FSDP2 --------------------------------------------------------------------------------------
# No family refuses FSDP2 since Wan2.2 shards (tests/test_wan22_fsdp2.py): a stand-in refusal on Wan2.2's adapter
# keeps the mechanism a future family would use tested.
FSDP2_REFUSAL = "This family cannot be sharded with FSDP2 (a stand-in refusal). Train it with DDP."


def test_a_family_refusing_fsdp2_is_refused_once_the_accelerator_says_fsdp2(prompts, tmp_path, monkeypatch):
    """The accelerator is the authority: with it reporting FSDP2, the trainer refuses a family with an
    `fsdp2_refusal` while it is built, before any sampling."""
    from trl_guard.testing.wan22 import build_tiny_wan22_pipeline

    monkeypatch.setattr(Wan22Adapter, "fsdp2_refusal", FSDP2_REFUSAL)
    monkeypatch.setattr(distributed, "is_fsdp2", lambda accelerator: True)
    sampled = []
    pipeline = build_tiny_wan22_pipeline(seed=0)
    pipeline.transformer.register_forward_pre_hook(lambda *args: sampled.append(1))
    with pytest.raises(NotImplementedError, match=re.escape(FSDP2_REFUSAL)):
        make_trainer(pipeline, [blueness], prompts, tmp_path, num_frames=5)
    assert not sampled


def test_a_family_refusing_a_requested_fsdp2_is_refused_before_loading(prompts, tmp_path, monkeypatch):
    """`accelerate launch` with an FSDP2 config on several GPUs: known from its environment before loading."""
    monkeypatch.setattr(Wan22Adapter, "fsdp2_refusal", FSDP2_REFUSAL)
    folder = index_only_folder(tmp_path / "wan22", WAN22_INDEX)
    config = tiny_config(tmp_path / "out", num_frames=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key, value in {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.fsdp2_requested(config)
    with pytest.raises(NotImplementedError, match=re.escape(FSDP2_REFUSAL)):
        GuardGRPODiffusionTrainer(model=folder, reward_funcs=[blueness], args=config, train_dataset=prompts)
    # conservative where accelerate would not shard (FSDP1, one process, CPUs): left to the accelerator's verdict
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert not distributed.fsdp2_requested(config)
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert not distributed.fsdp2_requested(config)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.fsdp2_requested(config)


# ---- a missing source image ---------------------------------------------------------------------------------------
def test_a_missing_source_image_is_named_by_row_before_loading(tmp_path):
    source = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    features = Features({"prompt": Value("string"), "image": ImageFeature()})
    edits = Dataset.from_dict(
        {"prompt": [f"edit {i}" for i in range(9)], "image": [source] * 7 + [None, source]}, features=features
    )
    check = preflight.check_condition_columns
    for name in ("train_dataset", "eval_dataset"):
        with pytest.raises(ValueError, match=rf"{name}\['image'\]\[7\] is missing \(None\).*filter"):
            check({name: edits}, "QwenImageEditPlusPipeline")
    # rows are counted as the dataset orders them (here through an indices mapping)
    with pytest.raises(ValueError, match=r"train_dataset\['image'\]\[1\] is missing"):
        check({"train_dataset": edits.select([8, 7, 0])}, "FluxKontextPipeline")
    check({"train_dataset": edits.select(range(7))}, "QwenImageEditPlusPipeline")
    folder = index_only_folder(tmp_path / "edit", {"_class_name": "QwenImageEditPlusPipeline"})
    with pytest.raises(ValueError, match=r"train_dataset\['image'\]\[7\] is missing"):
        make_trainer(folder, [blueness], edits, tmp_path / "out")


# ---- MISLEADING: docs/method.md said FSDP raises and that the trainer all-reduces gradients itself ---------------
def test_method_docs_say_what_the_distributed_check_does():
    """docs/method.md's multi-process bullet says what `check_distributed_setup` does: FSDP2 and DDP pass, DeepSpeed
    and FSDP1 are refused by name. Checked against the function on stand-in accelerators, not only against the text."""
    from pathlib import Path
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    text = (Path(__file__).parents[1] / "docs" / "method.md").read_text()
    bullet = next(line for line in text.splitlines() if "Multi-process training" in line)
    bullet += text.split(bullet, 1)[1].splitlines()[1]  # the bullet's second line
    assert "FSDP2" in bullet and "DeepSpeed and FSDP1 are refused by name" in bullet
    assert "raise a clear error for now" not in text and "gradients are all-reduced once per optimizer" not in text

    def accelerator(kind, fsdp2=False):
        return SimpleNamespace(distributed_type=kind, num_processes=2, is_fsdp2=fsdp2)

    for kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        distributed.check_distributed_setup(accelerator(kind))
    distributed.check_distributed_setup(accelerator(DistributedType.FSDP, fsdp2=True))
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        distributed.check_distributed_setup(accelerator(DistributedType.DEEPSPEED))
    with pytest.raises(NotImplementedError, match="FSDP1 is not supported"):
        distributed.check_distributed_setup(accelerator(DistributedType.FSDP))
