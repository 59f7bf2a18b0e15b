"""Tiny and real-width Z-Image pipelines built from configs, for tests (no download)."""

from __future__ import annotations

import torch

from trl_guard.testing import _tiny_vae
from trl_guard.testing.real_width import FLUX_VAE, Family, Published

from .flux2 import QWEN3_4B_TEXT, tiny_qwen3_tokenizer

#: Where the values below come from: Tongyi-MAI/Z-Image-Turbo's transformer, text_encoder and vae config.json
#: (Z-Image, the base model, has the same architecture). The Hub files are not in the search index.
_ZIMAGE_NOTE = (
    "These are the values third-party loaders in the search index reproduce verbatim from the Hub files (for example "
    "an MLX port's fallback configs and a loader's DEFAULT_ZIMAGE_TRANSFORMER_CONFIG, '_diffusers_version': "
    "'0.36.0.dev0')."
)

ZIMAGE_TRANSFORMER = Published(
    "Tongyi-MAI/Z-Image-Turbo transformer/config.json",
    dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
    ),
    note=_ZIMAGE_NOTE,
)

#: Qwen3-4B (model_index.json loads it as Qwen3Model): FLUX.2 [klein]'s text encoder, with its RoPE base.
ZIMAGE_TEXT = Published(
    "Tongyi-MAI/Z-Image-Turbo text_encoder/config.json",
    {**QWEN3_4B_TEXT.values, "rope_theta": 1000000.0},
    note=_ZIMAGE_NOTE,
)

#: A constant shift, 3.0 for Turbo (6.0 for the base model).
ZIMAGE_TURBO_SCHEDULER = Published(
    "Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json",
    dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
    note=_ZIMAGE_NOTE,
)

#: The real checkpoints' values, for `build_real_width_zimage_pipeline`; the VAE is FLUX.1's AutoencoderKL.
ZIMAGE_REAL = Family(
    "Z-Image-Turbo",
    dict(transformer=ZIMAGE_TRANSFORMER, text_encoder=ZIMAGE_TEXT, vae=FLUX_VAE, scheduler=ZIMAGE_TURBO_SCHEDULER),
)


def _qwen3_text_encoder(tokenizer, **sizes):
    from transformers import Qwen3Config, Qwen3Model

    rope_theta = sizes.pop("rope_theta", 1e6)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **sizes,
    )
    return Qwen3Model(config)


def build_tiny_zimage_pipeline(seed: int = 0, shift: float = 3.0):
    """A Z-Image pipeline of ~0.4M transformer parameters (most of them the timestep MLP's fixed 1024-wide middle) for
    16-64 px images: 4-channel VAE latents at H/2 in 2x2 patches, a 2-layer Qwen3 text model of width 32, and Turbo's
    scheduler (constant shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],  # the head dim, 16, split over (caption/frame, height, width) positions
        axes_lens=[256, 32, 32],
    )
    tokenizer = tiny_qwen3_tokenizer()
    text_encoder = _qwen3_text_encoder(
        tokenizer,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,  # ZImagePipeline takes the second-to-last hidden states
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    vae = _tiny_vae(latent_channels=4)
    for module in (transformer, text_encoder, vae):
        module.eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_real_width_zimage_pipeline(seed: int = 0, layers: int = 1):
    """Z-Image-Turbo's widths (`ZIMAGE_REAL`: 3840-wide blocks of 30 heads, Qwen3-4B's 2560-wide text model, the
    16-channel VAE, narrowed, and the scheduler) with `layers` main blocks, `layers` refiner blocks of each kind, `layers` text
    layers and the byte-level vocabulary: about 0.65 G parameters with one layer each. (ZImagePipeline reads the
    text model's second-to-last hidden states: with one layer, its token embeddings.)"""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    real = ZIMAGE_REAL
    transformer = ZImageTransformer2DModel(
        **{**real["transformer"].values, "n_layers": layers, "n_refiner_layers": layers}
    )
    tokenizer = tiny_qwen3_tokenizer()
    text = {**real["text_encoder"].values, "num_hidden_layers": layers}
    text.pop("vocab_size")
    text_encoder = _qwen3_text_encoder(tokenizer, **text)
    # The VAE keeps its latent channels, 8x compression and latent scaling and shift, with narrow blocks (8-16
    # channels instead of 128-512): latents have the real shape and decoding costs little.
    vae_kwargs = {**real["vae"].values, "block_out_channels": (8, 16, 16, 16), "norm_num_groups": 4}
    blocks = len(vae_kwargs["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks, **vae_kwargs
    )
    for module in (transformer, text_encoder, vae):
        module.eval().requires_grad_(False)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"].values),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
