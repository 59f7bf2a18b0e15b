"""Pipelines at the published checkpoints' real widths, but 1-2 layers deep: for tests that the adapters and the
trainer handle the real shapes (hidden widths, heads and head dims, RoPE axes, attention and norm types, text widths,
latent channels) without downloading anything.

Every number a builder takes from a checkpoint is recorded below as a `Published` config, with the repository and file
it comes from. What the builders change, and only that:

- the transformer's depth (`num_layers`, `num_single_layers`) is cut to 1-2 blocks; everything inside a block is real;
- each text encoder keeps its real width, heads, MLP width and activation, with 1 layer (2 for SD3's CLIP towers,
  whose penultimate hidden state is what SD3 conditions on) and the vocabulary of the offline tiny tokenizers of
  `trl_guard.testing` instead of 32k-256k entries (an embedding table is vocabulary x width);
- each VAE keeps its latent channels, its spatial (and temporal) compression and its latent normalisation, with
  narrow blocks: latents have the real shape, decoding is cheap;
- Qwen2.5-VL's vision tower, which text-to-image pipelines never call, is one narrow block.

Weights are random and seeded: a builder called twice with the same seed gives the same pipeline. Each pipeline's
transformer is drawn from `seed` alone (the other components from `seed + 1`), so
`build_real_width_<family>_transformer(seed, ...)` rebuilds it without the text encoders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import tiny_clip_tokenizer, tiny_qwen2_tokenizer, tiny_t5_tokenizer


@dataclass(frozen=True)
class Published:
    """Config values of one component of a published checkpoint.

    Attributes:
        source: where the values were read: the Hub repository and the file in it.
        values: the values, under the argument names of the diffusers or transformers class that takes them.
        note: anything about how they were found (a class default standing in for a missing key, say).
    """

    source: str
    values: Mapping[str, Any]
    note: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


# ---- text encoders ------------------------------------------------------------------------------------------------

#: CLIP ViT-L/14's text tower: SD3.5's `text_encoder` (with projection) and FLUX.1's `text_encoder` (without).
CLIP_L = Published(
    "stabilityai/stable-diffusion-3.5-medium text_encoder/config.json (= openai/clip-vit-large-patch14's text "
    "config; black-forest-labs/FLUX.1-dev text_encoder/config.json is the same tower)",
    dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        vocab_size=49408,
    ),
)

#: OpenCLIP ViT-bigG/14's text tower: SD3.5's `text_encoder_2`. Its activation is `gelu`, not CLIP-L's `quick_gelu`.
CLIP_G = Published(
    "stabilityai/stable-diffusion-3.5-medium text_encoder_2/config.json",
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_attention_heads=20,
        num_hidden_layers=32,
        projection_dim=1280,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        vocab_size=49408,
    ),
)

#: T5 v1.1 XXL's encoder: SD3.5's `text_encoder_3` and FLUX.1's `text_encoder_2`. 64 heads x 64 = 4096.
T5_XXL = Published(
    "stabilityai/stable-diffusion-3.5-medium text_encoder_3/config.json and black-forest-labs/FLUX.1-dev "
    "text_encoder_2/config.json (both google/t5-v1_1-xxl's config)",
    dict(
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        vocab_size=32128,
    ),
)

#: umT5 XXL's encoder: Wan2.1's `text_encoder` (the same sizes as T5 XXL, a per-layer relative attention bias and a
#: 256k vocabulary).
UMT5_XXL = Published(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers text_encoder/config.json (google/umt5-xxl)",
    {**T5_XXL.values, "vocab_size": 256384},
)

#: Qwen2.5-VL-7B's language model: Qwen-Image's `text_encoder`. 28 query heads x 128 (4 key/value heads), and
#: multimodal RoPE over (time, height, width) in sections of 16, 24 and 24 frequency pairs.
QWEN25_VL_7B_TEXT = Published(
    "Qwen/Qwen-Image text_encoder/config.json (= Qwen/Qwen2.5-VL-7B-Instruct's config)",
    dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        mrope_section=[16, 24, 24],
        max_position_embeddings=128000,
        vocab_size=152064,
    ),
)

#: Qwen2.5-VL-7B's vision tower, of which the builders keep only `out_hidden_size` (its merger's output must be the
#: language model's width): text-to-image pipelines never run it.
QWEN25_VL_7B_VISION = Published(
    "Qwen/Qwen-Image text_encoder/config.json, vision_config",
    dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
)

# ---- SD3.5 --------------------------------------------------------------------------------------------------------

#: SD3.5 Medium (MMDiT-X): 24 heads x 64 = 1536; the first 13 blocks also attend over the image stream alone
#: (`attn2`), and q/k are RMS-normalised.
SD35_MEDIUM_TRANSFORMER = Published(
    "stabilityai/stable-diffusion-3.5-medium transformer/config.json",
    dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    note="The repository is gated: values as quoted from it by public SD3.5 loaders found with code search (one pins "
    "them against the checkpoint's tensor shapes: exactly blocks 0-12 carry `attn2.*`).",
)

#: SD3.5 Large: 38 heads x 64 = 2432, no dual attention, RMS q/k norm.
SD35_LARGE_TRANSFORMER = Published(
    "stabilityai/stable-diffusion-3.5-large transformer/config.json",
    dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=38,
        attention_head_dim=64,
        num_attention_heads=38,
        joint_attention_dim=4096,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
        dual_attention_layers=(),
        qk_norm="rms_norm",
    ),
    note="Gated, quoted as for Medium. The file has no `dual_attention_layers` key (the class default, none, applies) "
    "and the checkpoint no `attn2.*` tensors.",
)

SD35_VAE = Published(
    "stabilityai/stable-diffusion-3.5-medium vae/config.json",
    dict(
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
)

SD35_SCHEDULER = Published(
    "stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json",
    dict(num_train_timesteps=1000, shift=3.0),
)

# ---- FLUX.1 -------------------------------------------------------------------------------------------------------

#: FLUX.1-dev: 24 heads x 128 = 3072, 19 double- and 38 single-stream blocks, RoPE over (16, 56, 56) of each head's
#: 128 dims, a guidance embedding. FLUX.1 Kontext-dev's transformer config is the same.
FLUX_DEV_TRANSFORMER = Published(
    "black-forest-labs/FLUX.1-dev transformer/config.json (black-forest-labs/FLUX.1-Kontext-dev "
    "transformer/config.json has the same values)",
    dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
)

FLUX_VAE = Published(
    "black-forest-labs/FLUX.1-dev vae/config.json",
    dict(
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
)

FLUX_SCHEDULER = Published(
    "black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json",
    dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
)

# ---- Qwen-Image ---------------------------------------------------------------------------------------------------

#: Qwen-Image: 60 MMDiT blocks of 24 heads x 128 = 3072 over Qwen2.5-VL's 3584-wide text states.
QWEN_IMAGE_TRANSFORMER = Published(
    "Qwen/Qwen-Image transformer/config.json",
    dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ),
    note="The file also has `pooled_projection_dim: 768`, which QwenImageTransformer2DModel no longer takes.",
)

#: Wan2.1's causal 3-D VAE design, 16 latent channels, 8x spatial compression (one image is one frame).
QWEN_IMAGE_VAE = Published(
    "Qwen/Qwen-Image vae/config.json",
    dict(
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
        # fmt: off
        latents_mean=[
            -0.7571,
            -0.7089,
            -0.9113,
            0.1075,
            -0.1745,
            0.9653,
            -0.1517,
            1.5508,
            0.4134,
            -0.0715,
            0.5517,
            -0.3632,
            -0.1922,
            -0.9497,
            0.2503,
            -0.2921,
        ],
        latents_std=[
            2.8184,
            1.4541,
            2.3275,
            2.6558,
            1.2196,
            1.7708,
            2.6052,
            2.0743,
            3.2687,
            2.1526,
            2.8652,
            1.5579,
            1.6382,
            1.1253,
            2.8251,
            1.9160,
        ],
        # fmt: on
    ),
    note="The latent statistics equal AutoencoderKLQwenImage's (and AutoencoderKLWan's) class defaults in diffusers.",
)

QWEN_IMAGE_SCHEDULER = Published(
    "Qwen/Qwen-Image scheduler/scheduler_config.json",
    dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
    ),
)

# ---- Wan2.1 -------------------------------------------------------------------------------------------------------

#: Wan2.1 T2V 1.3B: 30 blocks of 12 heads x 128 = 1536, RMS q/k norm across heads, a normalised cross-attention.
WAN21_T2V_1_3B_TRANSFORMER = Published(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json",
    dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ),
    note="Also in huggingface/diffusers scripts/convert_wan_to_diffusers.py (`Wan-T2V-1.3B`).",
)

#: Wan2.1 T2V 14B: 40 blocks of 40 heads x 128 = 5120.
WAN21_T2V_14B_TRANSFORMER = Published(
    "Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json",
    {**WAN21_T2V_1_3B_TRANSFORMER.values, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    note="Also in huggingface/diffusers scripts/convert_wan_to_diffusers.py (`Wan-T2V-14B`).",
)

WAN21_VAE = Published(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json",
    dict(
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
        latents_mean=QWEN_IMAGE_VAE["latents_mean"],
        latents_std=QWEN_IMAGE_VAE["latents_std"],
    ),
    note="The latent statistics equal AutoencoderKLWan's class defaults in diffusers.",
)

#: The checkpoints ship UniPC with flow sigmas; 3.0 is the 480p shift.
WAN21_SCHEDULER = Published(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json",
    dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000),
)


@dataclass(frozen=True)
class Family:
    """The published configs a real-width builder draws on, by pipeline component (`family["transformer"]` is the
    transformer's `Published` config). Every family's configs are recorded this way, in this module or in the family's
    own testing module."""

    name: str
    components: dict[str, Published] = field(default_factory=dict)

    def __getitem__(self, component: str) -> Published:
        return self.components[component]


SD35_MEDIUM = Family(
    "SD3.5 Medium",
    dict(
        transformer=SD35_MEDIUM_TRANSFORMER,
        text_encoder=CLIP_L,
        text_encoder_2=CLIP_G,
        text_encoder_3=T5_XXL,
        vae=SD35_VAE,
        scheduler=SD35_SCHEDULER,
    ),
)
SD35_LARGE = Family("SD3.5 Large", {**SD35_MEDIUM.components, "transformer": SD35_LARGE_TRANSFORMER})
FLUX_DEV = Family(
    "FLUX.1-dev",
    dict(
        transformer=FLUX_DEV_TRANSFORMER,
        text_encoder=CLIP_L,
        text_encoder_2=T5_XXL,
        vae=FLUX_VAE,
        scheduler=FLUX_SCHEDULER,
    ),
)
QWEN_IMAGE = Family(
    "Qwen-Image",
    dict(
        transformer=QWEN_IMAGE_TRANSFORMER,
        text_encoder=QWEN25_VL_7B_TEXT,
        vae=QWEN_IMAGE_VAE,
        scheduler=QWEN_IMAGE_SCHEDULER,
    ),
)
WAN21_T2V_1_3B = Family(
    "Wan2.1-T2V-1.3B",
    dict(transformer=WAN21_T2V_1_3B_TRANSFORMER, text_encoder=UMT5_XXL, vae=WAN21_VAE, scheduler=WAN21_SCHEDULER),
)
WAN21_T2V_14B = Family("Wan2.1-T2V-14B", {**WAN21_T2V_1_3B.components, "transformer": WAN21_T2V_14B_TRANSFORMER})

SD3_VARIANTS = {"medium": SD35_MEDIUM, "large": SD35_LARGE}
WAN_VARIANTS = {"1.3b": WAN21_T2V_1_3B, "14b": WAN21_T2V_14B}

#: Block widths of the narrow VAEs: one per resolution level of the real VAE, so the compression is the real one.
_NARROW_VAE_BLOCKS = (8, 16, 16, 16)


# ---- component builders -------------------------------------------------------------------------------------------


def clip_text_encoder(spec: Published, num_layers: int, with_projection: bool):
    """A CLIP text tower of `spec`'s width with `num_layers` layers over the tiny byte-level CLIP tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    config = CLIPTextConfig(
        **{**spec.values, "num_hidden_layers": num_layers, "vocab_size": len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config), tokenizer


def t5_encoder(spec: Published, num_layers: int, umt5: bool = False):
    """A T5 (or umT5) encoder of `spec`'s width with `num_layers` layers over the tiny Unigram tokenizer."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        **{**spec.values, "num_layers": num_layers, "vocab_size": len(tokenizer)},
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return model_class(config), tokenizer


def narrow_autoencoder_kl(spec: Published):
    """An AutoencoderKL with `spec`'s latent channels, 8x compression, scaling and shift, and narrow blocks."""
    from diffusers import AutoencoderKL

    levels = len(spec["block_out_channels"])
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=_NARROW_VAE_BLOCKS[:levels],
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=spec["latent_channels"],
        scaling_factor=spec["scaling_factor"],
        shift_factor=spec["shift_factor"],
        use_quant_conv=spec["use_quant_conv"],
        use_post_quant_conv=spec["use_post_quant_conv"],
    )


def _narrow_causal_vae_kwargs(spec: Published) -> dict[str, Any]:
    """Wan's / Qwen-Image's VAE arguments with `spec`'s latent channels, compression and statistics, narrow blocks."""
    return dict(
        base_dim=8,
        z_dim=spec["z_dim"],
        dim_mult=spec["dim_mult"],
        num_res_blocks=1,
        temperal_downsample=spec["temperal_downsample"],
        latents_mean=spec["latents_mean"],
        latents_std=spec["latents_std"],
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype`: a real-width block built in float32 first would double the peak memory.
    The one dtype helper of the builders (`uninitialised` in tests/builders/flux2.py adds skipping the initialisers)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _eval(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.eval()


# ---- pipelines ----------------------------------------------------------------------------------------------------


def build_real_width_sd3_transformer(
    seed: int = 0, variant: str = "medium", num_layers: int = 2, pos_embed_max_size: int = 16
):
    """The transformer of `build_real_width_sd3_pipeline(seed, variant, num_layers, pos_embed_max_size)`, alone."""
    from diffusers import SD3Transformer2DModel

    spec = SD3_VARIANTS[variant].components["transformer"].values
    sizes = dict(
        num_layers=num_layers,
        dual_attention_layers=tuple(i for i in spec["dual_attention_layers"] if i < num_layers),
        pos_embed_max_size=pos_embed_max_size,
    )
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**spec, **sizes})
    return transformer.eval()


def build_real_width_sd3_pipeline(
    seed: int = 0, variant: str = "medium", num_layers: int = 2, pos_embed_max_size: int = 16
):
    """A `StableDiffusion3Pipeline` with SD3.5's real widths (`variant` "medium" or "large") and `num_layers` blocks.

    For Medium the first block keeps its dual attention (`dual_attention_layers=(0,)`), so two blocks give one MMDiT-X
    block and one plain last block (whose text stream is `context_pre_only`), the two kinds the real model has. The CLIP
    towers get 2 layers: SD3 conditions on their penultimate hidden state, which 1 layer would make the embeddings'.

    `pos_embed_max_size` is the side, in patches, of the sine-cosine position table that images crop theirs from: the
    real 384 (Medium) makes a 384^2 x 1536 table (0.9 GB, ten seconds to compute) for images up to 6144 px; 16 covers
    images up to 256 px.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = build_real_width_sd3_transformer(seed, variant, num_layers, pos_embed_max_size)
    torch.manual_seed(seed + 1)
    text_encoder, tokenizer = clip_text_encoder(CLIP_L, num_layers=2, with_projection=True)
    text_encoder_2, tokenizer_2 = clip_text_encoder(CLIP_G, num_layers=2, with_projection=True)
    text_encoder_3, tokenizer_3 = t5_encoder(T5_XXL, num_layers=1)
    vae = narrow_autoencoder_kl(SD35_VAE)
    _eval(text_encoder, text_encoder_2, text_encoder_3, vae)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER.values),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_real_width_flux_transformer(seed: int = 0, num_layers: int = 1, num_single_layers: int = 1):
    """The transformer of `build_real_width_flux_pipeline(seed, num_layers, num_single_layers)`, alone."""
    from diffusers import FluxTransformer2DModel

    sizes = {"num_layers": num_layers, "num_single_layers": num_single_layers}
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER.values, **sizes})
    return transformer.eval()


def build_real_width_flux_pipeline(
    seed: int = 0, num_layers: int = 1, num_single_layers: int = 1, kontext: bool = False
):
    """A `FluxPipeline` (or, with `kontext`, a `FluxKontextPipeline`: the same components) with FLUX.1-dev's real
    widths, `num_layers` double-stream and `num_single_layers` single-stream blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline

    transformer = build_real_width_flux_transformer(seed, num_layers, num_single_layers)
    torch.manual_seed(seed + 1)
    text_encoder, tokenizer = clip_text_encoder(CLIP_L, num_layers=1, with_projection=False)
    text_encoder_2, tokenizer_2 = t5_encoder(T5_XXL, num_layers=1)
    vae = narrow_autoencoder_kl(FLUX_VAE)
    _eval(text_encoder, text_encoder_2, vae)
    pipeline_class = FluxKontextPipeline if kontext else FluxPipeline
    return pipeline_class(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER.values),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _qwen25_vl_text_encoder(tokenizer):
    """Qwen2.5-VL-7B's language model with 1 layer over `tokenizer`, and a one-block, narrow vision tower (the
    text-to-image pipeline never calls it) whose merger outputs the language model's width."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = QWEN25_VL_7B_TEXT.values
    special_ids = dict(  # Qwen's own ids for these (<|endoftext|>, <|im_end|>) lie beyond the tiny vocabulary
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"],
        num_hidden_layers=1,
        hidden_act=text["hidden_act"],
        rms_norm_eps=text["rms_norm_eps"],
        max_position_embeddings=text["max_position_embeddings"],
        rope_parameters={
            "rope_type": "default",
            "mrope_section": text["mrope_section"],
            "rope_theta": text["rope_theta"],
        },
        pad_token_id=tokenizer.pad_token_id,
        **special_ids,
    )
    vision_config = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=QWEN25_VL_7B_VISION["out_hidden_size"],
        patch_size=2,
        temporal_patch_size=1,
        spatial_merge_size=1,
        fullatt_block_indexes=[0],
    )
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **special_ids)
    )


def build_real_width_qwenimage_transformer(seed: int = 0, num_layers: int = 1):
    """The transformer of `build_real_width_qwenimage_pipeline(seed, num_layers)`, alone."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**{**QWEN_IMAGE_TRANSFORMER.values, "num_layers": num_layers})
    return transformer.eval()


def build_real_width_qwenimage_pipeline(seed: int = 0, num_layers: int = 1):
    """A `QwenImagePipeline` with Qwen-Image's real widths and `num_layers` blocks, over a 1-layer Qwen2.5-VL-7B-wide
    language model."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = build_real_width_qwenimage_transformer(seed, num_layers)
    torch.manual_seed(seed + 1)
    tokenizer = tiny_qwen2_tokenizer()
    text_encoder = _qwen25_vl_text_encoder(tokenizer)
    vae = AutoencoderKLQwenImage(**_narrow_causal_vae_kwargs(QWEN_IMAGE_VAE))
    _eval(text_encoder, vae)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER.values),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_real_width_wan_transformer(seed: int = 0, variant: str = "1.3b", num_layers: int = 2):
    """The transformer of `build_real_width_wan_pipeline(seed, variant, num_layers)`, alone."""
    from diffusers import WanTransformer3DModel

    spec = WAN_VARIANTS[variant].components["transformer"].values
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**spec, "num_layers": num_layers})
    return transformer.eval()


def build_real_width_wan_pipeline(seed: int = 0, variant: str = "1.3b", num_layers: int = 2):
    """A `WanPipeline` with Wan2.1 T2V's real widths (`variant` "1.3b" or "14b") and `num_layers` blocks, over a
    1-layer umT5-XXL-wide encoder, with the checkpoints' UniPC flow scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    transformer = build_real_width_wan_transformer(seed, variant, num_layers)
    torch.manual_seed(seed + 1)
    text_encoder, tokenizer = t5_encoder(UMT5_XXL, num_layers=1, umt5=True)
    vae = AutoencoderKLWan(**_narrow_causal_vae_kwargs(WAN21_VAE))
    _eval(text_encoder, vae)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**WAN21_SCHEDULER.values),
        transformer=transformer,
    )


def parameter_counts(pipeline) -> dict[str, int]:
    """Parameters of each `torch.nn.Module` component of `pipeline`, by component name."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module)
    }
