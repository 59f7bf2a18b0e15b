"""Wan2.2 text-to-video pipelines built from configs (no download): a tiny one for fast tests and one at the real
Wan2.2-T2V-A14B widths with its layers cut, for the real-width test."""

from __future__ import annotations

import torch

from . import build_tiny_wan_pipeline, tiny_t5_tokenizer
from .real_width import Family, Published, default_dtype

WAN22_T2V_A14B_TRANSFORMER = Published(
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer_2/config.json (refs/pr/2 on the Hub, read through the search tools)",
    dict(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,  # width 5120
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
        pos_embed_seq_len=None,
    ),
    note="Both experts. Its transformer/config.json was not found there; Wan-Video/Wan2.2 "
    "wan/configs/wan_t2v_A14B.py gives one `dim` 5120, `ffn_dim` 13824, `num_heads` 40, `num_layers` 40 for both "
    "checkpoints (`high_noise_model`, `low_noise_model`), so the same values are used for `transformer`.",
)

WAN22_UMT5_XXL = Published(
    "Wan-AI/Wan2.1-T2V-14B-Diffusers text_encoder/config.json (as mirrored in wavespeed/Wan2.1-T2V-14B-Diffusers-fp16)",
    dict(
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_heads=64,
        num_layers=24,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        vocab_size=256384,
    ),
    note="umT5-XXL (`t5_checkpoint` models_t5_umt5-xxl-enc-bf16.pth in wan_t2v_A14B.py); the A14B repository's own "
    "config was not found.",
)

WAN22_VAE = Published(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json (mirrored in ai-toolkit/wan2.1-vae)",
    dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    note="The Wan2.1 VAE (`vae_checkpoint` Wan2.1_VAE.pth, `vae_stride` (4, 8, 8) in wan_t2v_A14B.py); its config "
    "equals diffusers' `AutoencoderKLWan` defaults, latent statistics included.",
)

WAN22_PIPELINE = Published(
    "Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py at 42bf4cf: `boundary`, `sample_shift`, `sample_guide_scale`",
    dict(
        boundary_ratio=0.875,
        flow_shift=12.0,
        guidance_scale=4.0,  # high-noise expert
        guidance_scale_2=3.0,  # low-noise expert
    ),
    note="The Diffusers scheduler_config.json of the A14B repository was not found: its UniPC `flow_shift` is taken "
    "from `sample_shift`.",
)

#: Wan2.2-T2V-A14B's published configs, by component (`pipeline`: the pipeline's and its sampling's own values).
WAN22_T2V_A14B = Family(
    "Wan2.2-T2V-A14B",
    dict(transformer=WAN22_T2V_A14B_TRANSFORMER, text_encoder=WAN22_UMT5_XXL, vae=WAN22_VAE, pipeline=WAN22_PIPELINE),
)


def build_tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.875):
    """`build_tiny_wan_pipeline(seed)`'s components as a two-expert Wan2.2 pipeline: its transformer is the
    high-noise expert, and a second one of the same shape, drawn from seed `seed + 1`, the low-noise expert.
    `boundary_ratio` defaults to Wan2.2-T2V-A14B's."""
    from diffusers import WanPipeline, WanTransformer3DModel

    components = build_tiny_wan_pipeline(seed).components  # its transformer_2 is None
    torch.manual_seed(seed + 1)
    components["transformer_2"] = WanTransformer3DModel.from_config(components["transformer"].config).eval()
    return WanPipeline(**components, boundary_ratio=boundary_ratio)


def build_wan22_pipeline_at_real_width(num_layers: int = 1, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A Wan2.2-T2V-A14B pipeline at the real widths of `WAN22_T2V_A14B` with `num_layers` blocks per expert and per
    text-encoder stack, the offline tokenizer's small vocabulary, random weights in `dtype` (the VAE in float32).

    One 5120-wide expert block with the time projection is about 0.6B parameters, so each expert is ~1.2 GB in
    bfloat16 with one layer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    spec = WAN22_T2V_A14B
    experts = []
    with default_dtype(dtype):
        for offset in range(2):
            torch.manual_seed(seed + offset)
            experts.append(WanTransformer3DModel(**{**spec["transformer"].values, "num_layers": num_layers}).eval())
        tokenizer = tiny_t5_tokenizer()
        text_config = {**spec["text_encoder"].values, "num_layers": num_layers, "vocab_size": len(tokenizer)}
        text_encoder = UMT5EncoderModel(
            UMT5Config(**text_config, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        ).eval()
    vae = AutoencoderKLWan(**spec["vae"].values).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec["pipeline"]["flow_shift"]
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=spec["pipeline"]["boundary_ratio"],
    )
