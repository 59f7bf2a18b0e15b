"""Tiny and real-width Qwen-Image 2.1 pipelines (`QwenImage21Pipeline`) built from configs, for tests (no download).

Qwen-Image 2.1 reads the prompt with a Qwen3-VL model through its processor (a raw chat string, left padded), so the
tiny text encoder is a real `Qwen3VLForConditionalGeneration` (a vision tower text-to-image never runs) and the
processor a `Qwen3VLProcessor` built offline: a byte-level tokenizer that spells each pre-token of the pipeline's
system prompt as one token, the chat and vision special tokens, and a chat template for the system turn (the pipeline
counts the tokens it drops from it). The VAE keeps 2.1's 16x compression, RGBA pixels and per-channel latent
statistics (made-up values, so that decoding exercises them), with narrow blocks.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from trl_guard.testing import _byte_level_symbols
from trl_guard.testing.real_width import Family, Published

#: Where the values below come from. The Hub files are not in the search index.
_QWEN_IMAGE_21_NOTE = (
    "As a third-party MLX serving crate's test fixture reproduces the package's config documents ('the reviewed "
    "package's exact JSON', '_diffusers_version': '0.37.0.dev0'); the transformer's values are also a third-party "
    "loader's DEFAULT_TRANSFORMER_CONFIG for Qwen-Image-2.1-Turbo, and diffusers' QwenImage21Transformer2DModel "
    "defaults."
)

QWEN_IMAGE_21_TRANSFORMER = Published(
    "Qwen/Qwen-Image-2.1 transformer/config.json",
    dict(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=32,
        attention_head_dim=128,
        num_attention_heads=32,
        context_in_dim=4096,
        mlp_ratio=3,
        axes_dims_rope=(16, 56, 56),
        eps=1e-6,
        causal_condition=True,
    ),
    note=_QWEN_IMAGE_21_NOTE,
)

#: Qwen3-VL-8B's language model: 32 query heads x 128 (8 key/value heads), interleaved multimodal RoPE.
QWEN_IMAGE_21_TEXT = Published(
    "Qwen/Qwen-Image-2.1 text_encoder/config.json (text_config)",
    dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=36,
        rms_norm_eps=1e-6,
        rope_theta=5000000.0,
        mrope_section=[24, 20, 20],
        vocab_size=151936,
    ),
    note=_QWEN_IMAGE_21_NOTE,
)

#: Its vision tower, of which the builders keep `out_hidden_size` (the language model's width): text-to-image never
#: runs it.
QWEN_IMAGE_21_VISION = Published(
    "Qwen/Qwen-Image-2.1 text_encoder/config.json (vision_config)",
    dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        out_hidden_size=4096,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        deepstack_visual_indexes=[8, 16, 24],
    ),
    note=_QWEN_IMAGE_21_NOTE,
)

#: 64 latent channels at 16x compression of RGBA pixels (four down-samplings).
QWEN_IMAGE_21_VAE = Published(
    "Qwen/Qwen-Image-2.1 vae/config.json",
    dict(
        base_dim=96,
        decoder_base_dim=144,
        z_dim=64,
        dim_mult=[1, 2, 4, 8, 8],
        num_res_blocks=2,
        temperal_downsample=[False, True, True, True],
        in_channels=4,
        out_channels=4,
        is_residual=True,
        scale_factor_spatial=16,
        scale_factor_temporal=8,
    ),
    note=_QWEN_IMAGE_21_NOTE + " The fixture replaces the 64 latent statistics with stand-ins; the builders keep the "
    "class defaults.",
)

#: Qwen-Image's shift settings: exponential dynamic shift between 256 and 8192 tokens, last non-zero sigma 0.02.
QWEN_IMAGE_21_SCHEDULER = Published(
    "Qwen/Qwen-Image-2.1 scheduler/scheduler_config.json",
    dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    ),
    note=_QWEN_IMAGE_21_NOTE,
)

#: The real checkpoint's values, for `build_real_width_qwenimage21_pipeline`.
QWEN_IMAGE_21_REAL = Family(
    "Qwen-Image-2.1",
    dict(
        transformer=QWEN_IMAGE_21_TRANSFORMER,
        text_encoder=QWEN_IMAGE_21_TEXT,
        vision=QWEN_IMAGE_21_VISION,
        vae=QWEN_IMAGE_21_VAE,
        scheduler=QWEN_IMAGE_21_SCHEDULER,
    ),
)

#: QwenImage21Pipeline's system prompt (`sys_prompt`).
_SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: Qwen3-VL's chat format for text contents (what the pipeline's `apply_chat_template` of the system turn reads).
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen3_vl_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with no files: one token per pre-token of the pipeline's system prompt and of
    the chat roles (as Qwen's real tokenizer spells them), the chat and vision special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_level_symbols())}
    vocab["<|endoftext|>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    probe = Qwen2Tokenizer(vocab=dict(vocab), merges=[], model_max_length=4096)
    pre_tokens = probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(f"system\n{_SYSTEM_PROMPT}")
    for word in [word for word, _ in pre_tokens if word.strip()] + ["user", "assistant"]:
        piece = word[0]
        for char in word[1:]:
            if (piece, char) not in merges:
                merges.append((piece, char))
            piece += char
            vocab.setdefault(piece, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL_TOKENS})
    return tokenizer


def tiny_qwen3_vl_processor(tokenizer, patch_size: int = 8, merge_size: int = 2, max_pixels: int = 32 * 32):
    """A `Qwen3VLProcessor` without downloads: the PIL image processor (a small pixel budget) and no video processor.

    As for `builders.qwenimage_edit.tiny_qwen2_vl_processor`, transformers checks the absent video
    processor's class against a mixin it defines only with torchvision installed, so the check is skipped then: such a
    processor works in memory but a saved pipeline cannot be loaded without torchvision."""
    import transformers
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    factor = patch_size * merge_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=merge_size,
        min_pixels=factor * factor,
        max_pixels=max_pixels,
        size={"shortest_edge": factor * factor, "longest_edge": max_pixels},
    )
    check = contextlib.nullcontext()
    if not hasattr(transformers, "VideoProcessorMixin"):
        check = mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    with check:
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATE)


def qwen3_vl_text_encoder(tokenizer, text: dict, vision: dict):
    """A `Qwen3VLForConditionalGeneration` with the given text and vision settings, wired to `tokenizer`'s ids."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text, vision = dict(text), dict(vision)
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    rope = {
        "rope_type": "default",
        "mrope_section": text.pop("mrope_section"),
        "mrope_interleaved": True,
        "rope_theta": text.pop("rope_theta"),
    }
    text.pop("vocab_size", None)
    text_config = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        rope_parameters=rope,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **text,
    )
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text_config, vision_config=vision, **ids))


def _tiny_vae(**overrides):
    """A 4-channel `AutoencoderKLQwenImage21` with 2.1's 16x compression of RGBA pixels, 4-wide blocks, and made-up
    latent statistics."""
    from diffusers import AutoencoderKLQwenImage21

    config = dict(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    config.update(overrides)
    return AutoencoderKLQwenImage21(**config)


def _pipeline(transformer, text_encoder, tokenizer, vae, scheduler, sample_sigmas=None):
    from diffusers import QwenImage21Pipeline

    for module in (transformer, text_encoder, vae):
        module.eval()
    return QwenImage21Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        processor=tiny_qwen3_vl_processor(tokenizer),
        transformer=transformer,
        sample_sigmas=sample_sigmas,
    )


def build_tiny_qwenimage21_pipeline(seed: int = 0, sample_sigmas: list[float] | None = None):
    """A Qwen-Image 2.1 pipeline of ~20k transformer parameters for 32-128 px images (multiples of 32): 4-channel
    latents at H/16, one token each, a 2-layer single-stream block-causal transformer, a Qwen3-VL text model of 2
    layers of width 32, and the checkpoint's scheduler settings. `sample_sigmas` as the Turbo checkpoint's
    model_index.json sets them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        context_in_dim=32,
        mlp_ratio=3,
        axes_dims_rope=(2, 2, 4),
    )
    tokenizer = tiny_qwen3_vl_tokenizer()
    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        mrope_section=[2, 3, 3],  # each head's 8 frequency pairs over (time, height, width)
        rope_theta=5e6,
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=32,
        patch_size=8,
        temporal_patch_size=2,
        spatial_merge_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    text_encoder = qwen3_vl_text_encoder(tokenizer, text, vision)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_21_SCHEDULER.values)
    return _pipeline(transformer, text_encoder, tokenizer, _tiny_vae(), scheduler, sample_sigmas)


def build_real_width_qwenimage21_pipeline(seed: int = 0, layers: int = 1):
    """Qwen-Image 2.1's widths (`QWEN_IMAGE_21_REAL`: the 4096-wide transformer of 32 heads, Qwen3-VL-8B's text model,
    the 64-channel VAE at 16x, narrowed, and the scheduler) with `layers` transformer blocks and text layers, a
    one-block narrow vision tower and the byte-level vocabulary."""
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel

    real = QWEN_IMAGE_21_REAL
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(**{**real["transformer"].values, "num_layers": layers})
    torch.manual_seed(seed + 1)
    tokenizer = tiny_qwen3_vl_tokenizer()
    text = {**real["text_encoder"].values, "num_hidden_layers": layers}
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=real["vision"]["out_hidden_size"],
        patch_size=real["vision"]["patch_size"],
        temporal_patch_size=2,
        spatial_merge_size=2,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    text_encoder = qwen3_vl_text_encoder(tokenizer, text, vision)
    # The VAE keeps its latent channels, compression, RGBA pixels and (class default) latent statistics, 4 wide.
    vae = AutoencoderKLQwenImage21(**{**real["vae"].values, "base_dim": 4, "decoder_base_dim": 4, "dim_mult": [1] * 5})
    for module in (transformer, text_encoder, vae):
        module.requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(**real["scheduler"].values)
    return _pipeline(transformer, text_encoder, tokenizer, vae, scheduler)
