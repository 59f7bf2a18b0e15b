"""Real width, few layers: each family's pipeline at its published checkpoint's widths (heads, head dims, RoPE axes,
attention and norm types, text-encoder widths, VAE latent channels; `trl_guard/testing/real_width.py` names the source
of every value) but 1-2 blocks deep trains one LoRA step through the trainer, on the family's default LoRA targets, and
the saved LoRA reloads with the pipeline's own `load_lora_weights` into a freshly built copy.

Tiny widths hide what only real ones show: a head dim that does not fit the RoPE axes, a text width that does not
match `joint_attention_dim`, packing that assumes 4 latent channels, LoRA targets that miss a block type.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from conftest import blueness
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from trl_guard import GuardConfig, GuardGRPODiffusionTrainer
from trl_guard.adapters import (
    FluxAdapter,
    FluxKontextAdapter,
    PromptEmbeddings,
    QwenImageAdapter,
    SD3Adapter,
    WanAdapter,
    get_adapter,
)
from trl_guard.testing import real_width as rw

pytestmark = pytest.mark.slow

SIZE = 32  # pixels: 4x4 latents after the real 8x VAE compression
FRAMES = 5  # Wan: two latent frames after the real 4x temporal compression
PROMPT = "a red cat"  # short: the tiny tokenizers spell most words letter by letter


def source_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@dataclass
class Case:
    """One family at real width: how to build it, and what its default LoRA targets must wrap."""

    build: Callable[[], Any]  # the pipeline, from seed 0
    rebuild_transformer: Callable[[], torch.nn.Module]  # its transformer alone, from the same seed
    family: rw.Family
    adapter_class: type
    #: Transformer config keys cut for cost (depth; SD3's position-table side), not checked against the published value.
    cut: tuple[str, ...]
    #: LoRA-wrapped modules the family's default targets imply, per block, counted by hand from the architecture.
    lora_per_block: dict[str, int]
    #: Wrapped modules whose output cannot reach the velocity, so their LoRA gets no gradient: the text stream's query,
    #: output projection and MLP in the last MMDiT block (the text tokens' outputs of that block are discarded).
    no_gradient: frozenset[str] = frozenset()
    settings: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)  # dataset columns besides the prompt


CASES = {
    # Block 0 is MMDiT-X (dual attention), block 1 the last one (`context_pre_only`: no `attn.to_add_out`). The default
    # targets are `attn.*`, so the dual blocks' second attention (`attn2`) stays frozen, as in Flow-GRPO's SD3.5 LoRA.
    "sd3.5-medium": Case(
        build=lambda: rw.build_real_width_sd3_pipeline(seed=0, variant="medium", num_layers=2),
        rebuild_transformer=lambda: rw.build_real_width_sd3_transformer(seed=0, variant="medium", num_layers=2),
        family=rw.SD35_MEDIUM,
        adapter_class=SD3Adapter,
        cut=("num_layers", "dual_attention_layers", "pos_embed_max_size"),
        lora_per_block={"transformer_blocks.0": 8, "transformer_blocks.1": 7},
        no_gradient=frozenset({"transformer_blocks.1.attn.add_q_proj"}),
        settings=dict(guidance_scale=4.5),  # CFG: both branches batched
    ),
    # One block, the last: 38 heads x 64, no dual attention.
    "sd3.5-large": Case(
        build=lambda: rw.build_real_width_sd3_pipeline(seed=0, variant="large", num_layers=1),
        rebuild_transformer=lambda: rw.build_real_width_sd3_transformer(seed=0, variant="large", num_layers=1),
        family=rw.SD35_LARGE,
        adapter_class=SD3Adapter,
        cut=("num_layers", "pos_embed_max_size"),
        lora_per_block={"transformer_blocks.0": 7},
        no_gradient=frozenset({"transformer_blocks.0.attn.add_q_proj"}),
        settings=dict(guidance_scale=4.5),
    ),
    # One double-stream block (8 attention projections) and one single-stream block, whose attention has only
    # to_q/to_k/to_v (its output projection is the block's own `proj_out`).
    "flux.1-dev": Case(
        build=lambda: rw.build_real_width_flux_pipeline(seed=0),
        rebuild_transformer=lambda: rw.build_real_width_flux_transformer(seed=0),
        family=rw.FLUX_DEV,
        adapter_class=FluxAdapter,
        cut=("num_layers", "num_single_layers"),
        lora_per_block={"transformer_blocks.0": 8, "single_transformer_blocks.0": 3},
        settings=dict(guidance_scale=3.5),  # the guidance embedding
    ),
    "flux.1-kontext-dev": Case(
        build=lambda: rw.build_real_width_flux_pipeline(seed=0, kontext=True),
        rebuild_transformer=lambda: rw.build_real_width_flux_transformer(seed=0),
        family=rw.FLUX_DEV,
        adapter_class=FluxKontextAdapter,
        cut=("num_layers", "num_single_layers"),
        lora_per_block={"transformer_blocks.0": 8, "single_transformer_blocks.0": 3},
        settings=dict(guidance_scale=2.5),
        columns={"image": [source_image()]},
    ),
    # 8 attention projections and both streams' MLP in and out projections.
    "qwen-image": Case(
        build=lambda: rw.build_real_width_qwenimage_pipeline(seed=0),
        rebuild_transformer=lambda: rw.build_real_width_qwenimage_transformer(seed=0),
        family=rw.QWEN_IMAGE,
        adapter_class=QwenImageAdapter,
        cut=("num_layers",),
        lora_per_block={"transformer_blocks.0": 12},
        no_gradient=frozenset(
            f"transformer_blocks.0.{n}"
            for n in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
        ),
        settings=dict(true_cfg_scale=4.0, negative_prompt=" "),
    ),
    # Self- and cross-attention's to_q/to_k/to_v/to_out.0 in each block.
    "wan2.1-t2v-1.3b": Case(
        build=lambda: rw.build_real_width_wan_pipeline(seed=0, variant="1.3b", num_layers=2),
        rebuild_transformer=lambda: rw.build_real_width_wan_transformer(seed=0, variant="1.3b", num_layers=2),
        family=rw.WAN21_T2V_1_3B,
        adapter_class=WanAdapter,
        cut=("num_layers",),
        lora_per_block={"blocks.0": 8, "blocks.1": 8},
        settings=dict(guidance_scale=5.0, num_frames=FRAMES),
    ),
    # Wan2.1-14B (`rw.WAN21_T2V_14B`, width 5120) is left out to keep the suite near ten minutes: its blocks are
    # Wan2.2 A14B's, whose real-width test (tests/test_wan22.py) runs them.
}


def _matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a list of target names: the module's name is one, or ends with "." and one."""
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _block_of(name: str, blocks: dict[str, int]) -> str | None:
    return next((block for block in blocks if name.startswith(f"{block}.")), None)


def assert_real_widths(pipeline, case: Case) -> None:
    """The built pipeline carries the published values (all but the ones cut for cost)."""
    components = case.family.components
    config = pipeline.transformer.config
    for key, value in components["transformer"].values.items():
        if key not in case.cut:
            actual = config[key]
            assert (list(actual) if isinstance(actual, tuple | list) else actual) == (
                list(value) if isinstance(value, tuple | list) else value
            ), key
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if name in components:
            encoder_config = getattr(pipeline, name).config
            encoder_config = getattr(encoder_config, "text_config", encoder_config)  # Qwen2.5-VL
            width = getattr(encoder_config, "hidden_size", None) or encoder_config.d_model
            published = components[name].values
            assert width == published.get("hidden_size", published.get("d_model")), name
    vae, published = pipeline.vae.config, components["vae"].values
    for key in ("latent_channels", "z_dim", "scaling_factor", "shift_factor", "temperal_downsample", "latents_mean"):
        if key in published:
            assert vae[key] == published[key], key


def trainer_args(output_dir, **settings) -> GuardConfig:
    kwargs = dict(
        output_dir=str(output_dir),
        num_generations=2,
        per_device_train_batch_size=2,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        max_steps=1,
        height=SIZE,
        width=SIZE,
        max_sequence_length=16,
        num_inference_steps=2,
        guidance_scale=1.0,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    kwargs.update(settings)
    return GuardConfig(**kwargs)


def fixed_output(adapter, columns: dict[str, Any]) -> torch.Tensor:
    """The adapter's transformer on one fixed input: seeded latents at the second noise level of its own grid."""
    conditioning = adapter.encode_prompts([PROMPT])
    if adapter.condition_columns:
        conditioning = PromptEmbeddings({**conditioning.tensors, **adapter.encode_conditions(columns).tensors})
    latents = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = adapter.sigmas(2)[1:2]
    with torch.no_grad():
        return adapter.forward(adapter.denoiser, latents, sigma, conditioning)


@pytest.mark.parametrize("name", list(CASES))
def test_real_width_trains_saves_and_reloads_lora(name, tmp_path):
    case = CASES[name]
    pipeline = case.build()
    assert isinstance(get_adapter(pipeline), case.adapter_class)
    assert_real_widths(pipeline, case)

    adapter_class = case.adapter_class
    targets = list(adapter_class.default_lora_target_modules)
    expected = sorted(n for n, _ in pipeline.transformer.named_modules() if _matches(n, targets))
    per_block = {
        block: sum(_block_of(n, case.lora_per_block) == block for n in expected) for block in case.lora_per_block
    }
    # the targets reach every block, as many projections as counted by hand, and nothing outside the blocks
    assert per_block == case.lora_per_block and sum(per_block.values()) == len(expected)

    seen = []

    def reward(prompts, images, **kwargs):
        seen.extend(images)
        return blueness(prompts, [frames[0] for frames in images] if adapter_class.is_video else images)

    reward.__name__ = "first_frame_blueness" if adapter_class.is_video else "blueness"
    dataset = Dataset.from_dict({"prompt": [PROMPT], **case.columns})
    trainer = GuardGRPODiffusionTrainer(
        model=pipeline,
        reward_funcs=[reward],
        args=trainer_args(tmp_path / "run", **case.settings),
        train_dataset=dataset,
        peft_config=LoraConfig(r=4),  # target_modules unset: the family's defaults
    )
    denoiser = trainer.adapter.denoiser
    wrapped = sorted(n for n, m in denoiser.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert wrapped == expected

    lora = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    trainer.train()

    # The trainer sampled 2 images (videos) at the tiny resolution and took its one step on them.
    assert len(seen) == 2
    first = seen[0][0] if adapter_class.is_video else seen[0]
    assert first.size == (SIZE, SIZE)
    if adapter_class.is_video:
        assert len(seen[0]) == FRAMES
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in lora.values())
    # LoRA B starts at zero (so A gets no gradient on the first step): B moved in every module that reaches the output.
    moved = {
        n.removesuffix(".lora_B.default.weight") for n in lora if "lora_B" in n and not torch.equal(before[n], lora[n])
    }
    assert moved == set(expected) - case.no_gradient

    trainer.save_model()
    trained = fixed_output(trainer.adapter, case.columns)
    settings = trainer.adapter.settings
    # Keep the frozen components (text encoders, VAE: untouched by training) and free the trained transformer before
    # building its fresh copy, so only one real-width transformer is alive at a time.
    frozen = {k: v for k, v in pipeline.components.items() if k != "transformer"}
    pipeline_class = type(pipeline)
    del trainer, denoiser, lora, pipeline
    gc.collect()

    fresh = pipeline_class(**frozen, transformer=case.rebuild_transformer())
    adapter = get_adapter(fresh)
    adapter.configure(settings)
    base = fixed_output(adapter, case.columns)
    fresh.load_lora_weights(str(tmp_path / "run"))
    reloaded = fixed_output(adapter, case.columns)
    change = (trained - base).abs().max()
    assert change > 1e-4  # the step moved the policy: the comparison below can tell LoRA from none
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
