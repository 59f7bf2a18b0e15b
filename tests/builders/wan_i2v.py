"""Wan image-to-video pipelines built from configs (no download): tiny Wan2.1 I2V (with its CLIP image encoder) and
Wan2.2 I2V A14B (two experts, no image encoder) pipelines for fast tests, and both at the published checkpoints' real
widths with their layers cut, for the real-width tests."""

from __future__ import annotations

import torch

from trl_guard.testing import build_tiny_wan_pipeline
from trl_guard.testing.real_width import (
    UMT5_XXL,
    WAN21_SCHEDULER,
    WAN21_VAE,
    Family,
    Published,
    _narrow_causal_vae_kwargs,
    default_dtype,
    t5_encoder,
)

#: Wan2.1 I2V 14B (480P and 720P share it): Wan2.1-T2V-14B's blocks, 36 input channels (latents 16, first-frame mask
#: 4, first-frame latents 16), and the CLIP image states projected into every cross-attention (`add_k_proj`,
#: `add_v_proj` over 5120-wide image tokens).
WAN21_I2V_14B_TRANSFORMER = Published(
    "huggingface/diffusers scripts/convert_wan_to_diffusers.py, `Wan-I2V-14B-480p` (the config the Diffusers "
    "checkpoints Wan-AI/Wan2.1-I2V-14B-480P-Diffusers and -720P-Diffusers were converted with)",
    dict(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,  # width 5120
        in_channels=36,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=1280,
        added_kv_proj_dim=5120,
        rope_max_seq_len=1024,
    ),
    note="`rope_max_seq_len` is the class default (the script leaves it unset for this model).",
)

#: The image encoder of Wan2.1 I2V: OpenCLIP ViT-H/14's vision tower; the pipeline reads its penultimate hidden states
#: (257 tokens of 1280 at 224 px), so `projection_dim` never matters.
CLIP_VIT_H_14_VISION = Published(
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json, vision_config (what convert_wan_to_diffusers.py loads as "
    "the I2V pipelines' image_encoder and image_processor)",
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=16,
        num_hidden_layers=32,
        patch_size=14,
        image_size=224,
        projection_dim=1024,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
    note="ViT-H/14's published architecture (width 1280, 32 layers, 16 heads, MLP 5120, patch 14, 224 px); the "
    "Diffusers repositories' image_encoder/config.json was not read here. Its processor is OpenAI CLIP's: resize "
    "the short side to 224, centre-crop 224, CLIP's mean and std.",
)

#: Wan2.2 I2V A14B: two experts of Wan2.1 I2V's width and input channels, without image conditioning.
WAN22_I2V_A14B_TRANSFORMER = Published(
    "huggingface/diffusers scripts/convert_wan_to_diffusers.py, `Wan2.2-I2V-14B-720p` (both experts, converted from "
    "Wan-AI/Wan2.2-I2V-A14B `high_noise_model` and `low_noise_model`)",
    {**WAN21_I2V_14B_TRANSFORMER.values, "image_dim": None, "added_kv_proj_dim": None},
    note="Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py gives the same dim 5120, ffn_dim 13824, 40 heads, 40 layers.",
)

WAN22_I2V_A14B_PIPELINE = Published(
    "huggingface/diffusers scripts/convert_wan_to_diffusers.py (`boundary_ratio=0.9` for Wan2.2 I2V, UniPC "
    "`flow_shift=3.0`) and Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py (`boundary = 0.900`, `sample_guide_scale = "
    "(3.5, 3.5)`)",
    dict(boundary_ratio=0.9, flow_shift=3.0, guidance_scale=3.5, guidance_scale_2=3.5),
    note="The original sampler shifts by `sample_shift = 5.0`; the Diffusers conversion writes 3.0 into the scheduler.",
)

#: Wan2.1-I2V-14B's published configs, by component.
WAN21_I2V_14B = Family(
    "Wan2.1-I2V-14B",
    dict(
        transformer=WAN21_I2V_14B_TRANSFORMER,
        image_encoder=CLIP_VIT_H_14_VISION,
        text_encoder=UMT5_XXL,
        vae=WAN21_VAE,
        scheduler=WAN21_SCHEDULER,
    ),
)

#: Wan2.2-I2V-A14B's published configs, by component (`pipeline`: the pipeline's and its sampling's own values).
WAN22_I2V_A14B = Family(
    "Wan2.2-I2V-A14B",
    dict(
        transformer=WAN22_I2V_A14B_TRANSFORMER,
        text_encoder=UMT5_XXL,
        vae=WAN21_VAE,
        pipeline=WAN22_I2V_A14B_PIPELINE,
    ),
)

#: The tiny CLIP vision tower's width (the tiny transformer's `image_dim`) and its input size.
_TINY_CLIP_WIDTH = 16
_TINY_CLIP_SIZE = 32


def tiny_clip_image_processor(size: int = _TINY_CLIP_SIZE):
    """OpenAI CLIP's preprocessing (short side resized, centre crop, CLIP's mean and std) at `size` pixels."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _tiny_i2v_transformer(image_dim: int | None):
    """A transformer of `build_tiny_wan_pipeline`'s sizes taking latents (4), mask (4) and first-frame latents (4)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=12,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
        image_dim=image_dim,
        added_kv_proj_dim=None
        if image_dim is None
        else 16,  # the transformer's width: image tokens are embedded first
    ).eval()


def build_tiny_wan_i2v_pipeline(seed: int = 0):
    """A Wan2.1 image-to-video pipeline: `build_tiny_wan_pipeline(seed)`'s text encoder, VAE (4 latent channels) and
    scheduler, a transformer taking 12 input channels and CLIP states, and a 2-layer CLIP vision tower at 32 px."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    components = build_tiny_wan_pipeline(seed).components
    torch.manual_seed(seed)
    transformer = _tiny_i2v_transformer(image_dim=_TINY_CLIP_WIDTH)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=_TINY_CLIP_WIDTH,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_TINY_CLIP_SIZE,
            patch_size=8,
            projection_dim=8,
        )
    ).eval()
    return WanImageToVideoPipeline(
        tokenizer=components["tokenizer"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        scheduler=components["scheduler"],
        image_processor=tiny_clip_image_processor(),
        image_encoder=image_encoder,
        transformer=transformer,
    )


def build_tiny_wan22_i2v_pipeline(seed: int = 0, boundary_ratio: float = 0.9):
    """A Wan2.2 image-to-video A14B-style pipeline: `build_tiny_wan_pipeline(seed)`'s text encoder, VAE and scheduler,
    two experts of 12 input channels without image conditioning (the low-noise one drawn from `seed + 1`), no image
    encoder. `boundary_ratio` defaults to Wan2.2-I2V-A14B's."""
    from diffusers import WanImageToVideoPipeline

    components = build_tiny_wan_pipeline(seed).components
    experts = []
    for offset in range(2):
        torch.manual_seed(seed + offset)
        experts.append(_tiny_i2v_transformer(image_dim=None))
    return WanImageToVideoPipeline(
        tokenizer=components["tokenizer"],
        text_encoder=components["text_encoder"],
        vae=components["vae"],
        scheduler=components["scheduler"],
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=boundary_ratio,
    )


def build_wan_i2v_pipeline_at_real_width(
    two_experts: bool = False, num_layers: int = 1, seed: int = 0, dtype: torch.dtype = torch.bfloat16
):
    """Wan2.1-I2V-14B (`two_experts=False`: one transformer, a 1-layer ViT-H/14-wide image encoder at 224 px) or
    Wan2.2-I2V-A14B (`two_experts=True`) at their real widths with `num_layers` blocks per transformer, a 1-layer
    umT5-XXL-wide text encoder over the offline tokenizer, a narrow VAE of the real compression and latent statistics
    (float32), random weights in `dtype`. One 5120-wide block is ~0.6B parameters: ~1.2 GB per expert in bfloat16."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from diffusers.models import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    family = WAN22_I2V_A14B if two_experts else WAN21_I2V_14B
    transformers = []
    with default_dtype(dtype):
        for offset in range(2 if two_experts else 1):
            torch.manual_seed(seed + offset)
            spec = {**family["transformer"].values, "num_layers": num_layers}
            transformers.append(WanTransformer3DModel(**spec).eval())
        torch.manual_seed(seed + 2)
        text_encoder, tokenizer = t5_encoder(UMT5_XXL, num_layers=1, umt5=True)
        image_encoder = None
        if not two_experts:
            vision = {**CLIP_VIT_H_14_VISION.values, "num_hidden_layers": 1}
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).eval()
    vae = AutoencoderKLWan(**_narrow_causal_vae_kwargs(WAN21_VAE)).eval()
    scheduler_values = dict(WAN21_SCHEDULER.values)
    extra = {}
    if two_experts:
        scheduler_values["flow_shift"] = WAN22_I2V_A14B_PIPELINE["flow_shift"]
        extra = dict(transformer_2=transformers[1], boundary_ratio=WAN22_I2V_A14B_PIPELINE["boundary_ratio"])
    else:
        size = CLIP_VIT_H_14_VISION["image_size"]
        extra = dict(image_encoder=image_encoder, image_processor=tiny_clip_image_processor(size))
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae,
        scheduler=UniPCMultistepScheduler(**scheduler_values),
        transformer=transformers[0],
        **extra,
    )
