"""A tiny HunyuanVideo 1.5 text-to-video pipeline built from configs, for tests (no download)."""

from __future__ import annotations

import numpy as np
import torch

from . import tiny_qwen2_tokenizer
from .flux2 import _QWEN3_CHAT_TEMPLATE

#: Text lengths of the tiny pipeline. `HunyuanVideo15Pipeline` sets them as plain attributes (1000 Qwen tokens, 256
#: ByT5 tokens, 729 SigLIP tokens), not as config: the adapter reads them from the pipeline object, so tests shorten
#: them there to keep the reference `pipe(...)` fast. A pipeline saved and loaded again has the published lengths.
TINY_TEXT_LENGTHS = dict(tokenizer_max_length=24, tokenizer_2_max_length=16, vision_num_semantic_tokens=4)


def _prefix_length(tokenizer, system_message: str) -> int:
    """Tokens of the chat template before the user's prompt, as HunyuanVideo15Pipeline formats it."""
    conversation = [{"role": "system", "content": system_message}, {"role": "user", "content": ""}]
    full = tokenizer.apply_chat_template([conversation], add_generation_prompt=True, tokenize=True)
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    return len(full[0]) - len(tokenizer("<|im_end|>\n<|im_start|>assistant\n").input_ids)


def add_system_message_tokens(tokenizer, system_message: str, prefix_tokens: int) -> None:
    """Add `system_message` to `tokenizer` as consecutive pieces, as many as make the template's prefix
    `prefix_tokens` long (108 for HunyuanVideo 1.5's Qwen2.5 tokenizer), so that the pipeline crops exactly it."""
    pieces = prefix_tokens - _prefix_length(tokenizer, "")
    bounds = np.linspace(0, len(system_message), pieces + 1).round().astype(int)
    tokenizer.add_tokens([system_message[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    if _prefix_length(tokenizer, system_message) != prefix_tokens:
        raise RuntimeError("the tiny tokenizer's template prefix is not the pipeline's crop length")


def build_tiny_hunyuanvideo15_pipeline(seed: int = 0, guidance_scale: float = 1.0):
    """A HunyuanVideo 1.5 text-to-video pipeline of 4.3M transformer parameters (all but 35k of them the ByT5
    projection's fixed 2048-wide middle layer) for 16-64 px videos of 4k + 1 frames.

    The VAE keeps HunyuanVideo 1.5's causal design and its time compression (4) with 4 latent channels and a spatial
    factor of 4 (16 in the real one); the text encoders are a 2-layer Qwen2.5-VL text model over the offline byte-level
    tokenizer (given Qwen's chat template, and the pipeline's system message as one token, so that the template's
    prefix the pipeline crops is short) and a 1-layer T5 over ByT5's byte tokenizer. The guider is the pipeline's
    `ClassifierFreeGuidance` at `guidance_scale`.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE  # Qwen2.5's chat format for text turns is the same
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer_2 = ByT5Tokenizer()

    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # latents, the (zero) condition latents and the (zero) mask: 4 + 4 + 1
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=32,
        text_embed_2_dim=32,
        image_embed_dim=16,
        rope_axes_dim=(2, 2, 4),
        target_size=32,
        task_type="t2v",
    )
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer) + 108,  # and the system message's pieces, added below
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,  # the pipeline reads the third hidden state from the end
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e6},
            pad_token_id=tokenizer.pad_token_id,
            # Qwen's own ids for these (<|endoftext|>, <|im_end|>) lie beyond this vocabulary.
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    pipeline = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    # The pipeline sets its system message in __init__. Split into tokens so that the template's prefix is the 108
    # tokens the pipeline crops (`prompt_template_encode_start_idx`, an attribute a saved pipeline loses).
    add_system_message_tokens(tokenizer, pipeline.system_message, pipeline.prompt_template_encode_start_idx)
    for name, value in TINY_TEXT_LENGTHS.items():
        setattr(pipeline, name, value)
    return pipeline
