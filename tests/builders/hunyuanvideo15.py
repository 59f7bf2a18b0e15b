"""HunyuanVideo 1.5 text-to-video and image-to-video pipelines built from configs, for tests (no download): tiny ones,
and ones at the published 480p checkpoints' real widths with their layers cut (`HUNYUANVIDEO15_480P_T2V` and
`HUNYUANVIDEO15_480P_I2V` record where each value comes from)."""

from __future__ import annotations

import numpy as np
import torch

from trl_guard.testing import tiny_qwen2_tokenizer
from trl_guard.testing.real_width import QWEN25_VL_7B_TEXT, Family, Published

from .flux2 import _QWEN3_CHAT_TEMPLATE, fill_random, uninitialised

#: The checkpoint `examples/recipes/hunyuanvideo15_t2v_guard.yaml` trains (diffusers' HunyuanVideo15Pipeline example).
HUNYUANVIDEO15_REPO = "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v"

#: The Hub files are not in the search index. diffusers' conversion script wrote the repository (its usage line:
#: `--original_state_dict_repo_id tencent/HunyuanVideo-1.5 --save_pipeline --transformer_type 480p_t2v`), so its
#: tables for "480p_t2v" are the values; third-party loaders in the index quote the same config.json files.
_CONVERSION_SCRIPT = "huggingface/diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py"

#: 54 dual-stream blocks of 16 heads x 128 = 2048, patch 1 x 1 x 1 over 32-channel latents (65 input channels: the
#: latents, the condition latents and a mask), a 2-block token refiner over Qwen2.5-VL's 3584-wide states, a projection
#: of ByT5's 1472-wide glyph states and one of SigLIP's 1152-wide image states, RoPE over (16, 56, 56) of each head.
HUNYUANVIDEO15_TRANSFORMER = Published(
    f"{HUNYUANVIDEO15_REPO} transformer/config.json",
    dict(
        in_channels=65,
        out_channels=32,
        num_attention_heads=16,
        attention_head_dim=128,
        num_layers=54,
        num_refiner_layers=2,
        mlp_ratio=4.0,
        patch_size=1,
        patch_size_t=1,
        qk_norm="rms_norm",
        text_embed_dim=3584,
        text_embed_2_dim=1472,
        image_embed_dim=1152,
        rope_theta=256.0,
        rope_axes_dim=(16, 56, 56),
        target_size=640,
        task_type="t2v",
        use_meanflow=False,
    ),
    note=f"From {_CONVERSION_SCRIPT} TRANSFORMER_CONFIGS['480p_t2v']. They are HunyuanVideo15Transformer3DModel's "
    "defaults but for `task_type` (the class default is 'i2v'); 720p_t2v differs only in `target_size` (960).",
)

#: Qwen2.5-VL-7B-Instruct's language model (`Qwen2_5_VLTextModel`): the pipeline reads its third hidden state from
#: the end, after cropping the 108 tokens of its chat template's system message.
HUNYUANVIDEO15_TEXT = Published(
    f"{HUNYUANVIDEO15_REPO} text_encoder/config.json (= Qwen/Qwen2.5-VL-7B-Instruct's text config)",
    QWEN25_VL_7B_TEXT.values,
    note=f"{_CONVERSION_SCRIPT} `load_mllm` loads Qwen/Qwen2.5-VL-7B-Instruct and keeps its `language_model`; the "
    "values are those of `trl_guard.testing.real_width.QWEN25_VL_7B_TEXT` (Qwen-Image's text encoder, the same model).",
)

#: ByT5-small's encoder with Glyph-SDXL-v2's weights: 6 heads x 64 = 384 inside a 1472-wide model (= the transformer's
#: `text_embed_2_dim`), gated GELU. Its vocabulary is ByT5's 384 byte tokens and Glyph-SDXL-v2's color and font tokens.
HUNYUANVIDEO15_BYT5 = Published(
    f"{HUNYUANVIDEO15_REPO} text_encoder_2/config.json (google/byt5-small's encoder, Glyph-SDXL-v2's weights)",
    dict(
        d_model=1472,
        d_ff=3584,
        d_kv=64,
        num_heads=6,
        num_layers=12,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        vocab_size=1510,
    ),
    note=f"{_CONVERSION_SCRIPT} `load_byt5` builds T5EncoderModel.from_pretrained('google/byt5-small') (whose "
    "config.json, quoted verbatim by several repositories in the index, gives the sizes) and adds the color and font "
    "tokens of Glyph-SDXL-v2's assets/color_idx.json and assets/multilingual_10-lang_idx.json; 1510 is the vocabulary "
    "a third-party port in the index pins against the checkpoint's text_encoder_2/config.json (not read here).",
)

#: A causal 3-D VAE: 32 latent channels, 16x spatial and 4x temporal compression, one scaling factor and no shift.
HUNYUANVIDEO15_VAE = Published(
    f"{HUNYUANVIDEO15_REPO} vae/config.json",
    dict(
        in_channels=3,
        out_channels=3,
        latent_channels=32,
        block_out_channels=(128, 256, 512, 1024, 1024),
        layers_per_block=2,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
        downsample_match_channel=True,
        upsample_match_channel=True,
        scaling_factor=1.03682,
    ),
    note=f"{_CONVERSION_SCRIPT} `convert_vae` builds AutoencoderKLHunyuanVideo15() with the class defaults, these. "
    "tencent/HunyuanVideo-1.5 vae/config.json (AutoencoderKLConv3D: `ffactor_spatial` 16, `ffactor_temporal` 4, "
    "`scaling_factor` 1.03682), as a third-party loader in the index quotes it, agrees.",
)

#: The scheduler's constant shift (5.0 at 480p; 9.0 for 720p t2v) and the guider's CFG scale (1.0 for the distilled
#: checkpoints).
HUNYUANVIDEO15_PIPELINE = Published(
    f"{HUNYUANVIDEO15_REPO} scheduler/scheduler_config.json and guider/guider_config.json",
    dict(shift=5.0, guidance_scale=6.0),
    note=f"{_CONVERSION_SCRIPT} SCHEDULER_CONFIGS and GUIDANCE_CONFIGS['480p_t2v']: FlowMatchEulerDiscreteScheduler("
    "shift=5.0), ClassifierFreeGuidance(guidance_scale=6.0).",
)

#: HunyuanVideo 1.5 480p text-to-video's published configs, by component (`pipeline`: the scheduler's shift and the
#: guider's scale), for `build_real_width_hunyuanvideo15_pipeline`.
HUNYUANVIDEO15_480P_T2V = Family(
    "HunyuanVideo-1.5-480p_t2v",
    dict(
        transformer=HUNYUANVIDEO15_TRANSFORMER,
        text_encoder=HUNYUANVIDEO15_TEXT,
        text_encoder_2=HUNYUANVIDEO15_BYT5,
        vae=HUNYUANVIDEO15_VAE,
        pipeline=HUNYUANVIDEO15_PIPELINE,
    ),
)

#: The checkpoint `examples/recipes/hunyuanvideo15_i2v_guard.yaml` trains (HunyuanVideo15ImageToVideoPipeline's example).
HUNYUANVIDEO15_I2V_REPO = "hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v"

#: The image-to-video transformer: text-to-video's but `task_type` (the class default, "i2v"), which no forward reads.
HUNYUANVIDEO15_I2V_TRANSFORMER = Published(
    f"{HUNYUANVIDEO15_I2V_REPO} transformer/config.json",
    {**HUNYUANVIDEO15_TRANSFORMER.values, "task_type": "i2v"},
    note=f"From {_CONVERSION_SCRIPT} TRANSFORMER_CONFIGS['480p_i2v'], the same table as '480p_t2v' but `task_type`.",
)

#: SigLIP so400m/14 at 384 px: 27 layers of 1152 (16 heads), 729 = 27 x 27 patch tokens, the pipeline's
#: `vision_num_semantic_tokens` and the transformer's `image_embed_dim`.
SIGLIP_SO400M_VISION = Published(
    f"{HUNYUANVIDEO15_I2V_REPO} image_encoder/config.json (= black-forest-labs/FLUX.1-Redux-dev image_encoder/, "
    "google/siglip-so400m-patch14-384's vision tower)",
    dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        image_size=384,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
    note=f"{_CONVERSION_SCRIPT} `load_siglip` loads SiglipVisionModel and SiglipImageProcessor from "
    "black-forest-labs/FLUX.1-Redux-dev (subfolders image_encoder and feature_extractor). The values are "
    "google/siglip-so400m-patch14-384's vision config as several repositories in the index quote it (not read from "
    "the Hub here). Its processor resizes to 384 x 384 and normalises with mean and std 0.5.",
)

#: The image-to-video scheduler shift and CFG scale at 480p: text-to-video's (720p i2v shifts by 7.0).
HUNYUANVIDEO15_I2V_PIPELINE = Published(
    f"{HUNYUANVIDEO15_I2V_REPO} scheduler/scheduler_config.json and guider/guider_config.json",
    dict(shift=5.0, guidance_scale=6.0),
    note=f"{_CONVERSION_SCRIPT} SCHEDULER_CONFIGS and GUIDANCE_CONFIGS['480p_i2v'].",
)

#: HunyuanVideo 1.5 480p image-to-video's published configs, by component (`image_encoder`: SigLIP's vision tower).
HUNYUANVIDEO15_480P_I2V = Family(
    "HunyuanVideo-1.5-480p_i2v",
    dict(
        HUNYUANVIDEO15_480P_T2V.components,
        transformer=HUNYUANVIDEO15_I2V_TRANSFORMER,
        image_encoder=SIGLIP_SO400M_VISION,
        pipeline=HUNYUANVIDEO15_I2V_PIPELINE,
    ),
)

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


def _qwen_tokenizer():
    """The offline byte-level tokenizer with Qwen's chat template (Qwen2.5's chat format for text turns is Qwen3's)."""
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def _qwen_text_encoder(tokenizer, **sizes):
    """A `Qwen2_5_VLTextModel` of `sizes` over `tokenizer`, with room for the system message's 108 pieces."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    return Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer) + 108,  # and the system message's pieces, added by `_assemble`
            pad_token_id=tokenizer.pad_token_id,
            # Qwen's own ids for these (<|endoftext|>, <|im_end|>) lie beyond this vocabulary.
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            **sizes,
        )
    )


def _assemble(shift: float, guidance_scale: float, pipeline_class: type | None = None, **components):
    """The `HunyuanVideo15Pipeline` (or `pipeline_class`) of `components` (all in eval mode), its system message split
    into tokens and its text lengths `TINY_TEXT_LENGTHS`."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipeline = (pipeline_class or HunyuanVideo15Pipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
        **components,
    )
    # The pipeline sets its system message in __init__. Split into tokens so that the template's prefix is the 108
    # tokens the pipeline crops (`prompt_template_encode_start_idx`, an attribute a saved pipeline loses).
    tokenizer = components["tokenizer"]
    add_system_message_tokens(tokenizer, pipeline.system_message, pipeline.prompt_template_encode_start_idx)
    for name, value in TINY_TEXT_LENGTHS.items():
        setattr(pipeline, name, value)
    return pipeline


def build_tiny_hunyuanvideo15_pipeline(seed: int = 0, guidance_scale: float = 1.0):
    """A HunyuanVideo 1.5 text-to-video pipeline of 4.3M transformer parameters (all but 35k of them the ByT5
    projection's fixed 2048-wide middle layer) for 16-64 px videos of 4k + 1 frames.

    The VAE keeps HunyuanVideo 1.5's causal design and its time compression (4) with 4 latent channels and a spatial
    factor of 4 (16 in the real one); the text encoders are a 2-layer Qwen2.5-VL text model over the offline byte-level
    tokenizer (given Qwen's chat template, and the pipeline's system message as one token, so that the template's
    prefix the pipeline crops is short) and a 1-layer T5 over ByT5's byte tokenizer. The guider is the pipeline's
    `ClassifierFreeGuidance` at `guidance_scale`.
    """
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = _qwen_tokenizer()
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
    text_encoder = _qwen_text_encoder(
        tokenizer,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,  # the pipeline reads the third hidden state from the end
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e6},
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
    return _assemble(
        5.0,
        guidance_scale,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def build_real_width_hunyuanvideo15_transformer(seed: int = 0, num_layers: int = 1, family: Family | None = None):
    """The transformer of `build_real_width_hunyuanvideo15_pipeline(seed, num_layers)` (of `family`'s config,
    text-to-video's by default), alone."""
    from diffusers import HunyuanVideo15Transformer3DModel

    spec = (family or HUNYUANVIDEO15_480P_T2V)["transformer"].values
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(**{**spec, "num_layers": num_layers, "num_refiner_layers": 1})
    return transformer.eval()


def build_real_width_hunyuanvideo15_pipeline(seed: int = 0, num_layers: int = 1, image_to_video: bool = False):
    """HunyuanVideo 1.5 480p text-to-video at the real widths of `HUNYUANVIDEO15_480P_T2V`, with `num_layers`
    dual-stream blocks and one token-refiner block (of 2): about 0.3 G transformer parameters with one block.

    The Qwen2.5-VL-7B-wide text model has 3 layers, the fewest for which the third hidden state from the end, the one
    the pipeline reads, is a layer's output and not the token embeddings; ByT5's 1472-wide encoder has 1 layer over
    ByT5's own byte tokenizer (without Glyph-SDXL-v2's color and font tokens). Both tokenizers are offline, the Qwen
    one with the chat template and the system message split as in `build_tiny_hunyuanvideo15_pipeline`, and the text
    lengths are `TINY_TEXT_LENGTHS`. The VAE keeps its 32 latent channels, its 16x spatial and 4x temporal compression
    and its scaling factor, with narrow blocks (8-64 channels instead of 128-1024, one layer per block). The scheduler's
    shift (5.0) and the guider's scale (6.0) are the checkpoint's. Weights are random and seeded, in float32 but the
    Qwen text model's (bfloat16, filled by `fill_random`); the transformer is drawn from `seed`, the rest from
    `seed + 1`.

    `image_to_video=True`: `HunyuanVideo15ImageToVideoPipeline` of `HUNYUANVIDEO15_480P_I2V`, with a 1-layer
    SigLIP-so400m-wide vision tower at its 384 px (729 tokens of 1152) and its processor.
    """
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15ImageToVideoPipeline
    from transformers import ByT5Tokenizer, SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel

    real = HUNYUANVIDEO15_480P_I2V if image_to_video else HUNYUANVIDEO15_480P_T2V
    transformer = build_real_width_hunyuanvideo15_transformer(seed, num_layers, real)
    torch.manual_seed(seed + 1)
    tokenizer = _qwen_tokenizer()
    text = {k: v for k, v in real["text_encoder"].values.items() if k not in ("vocab_size", "rope_theta")}
    mrope_section = text.pop("mrope_section")
    # 0.7 G parameters: filled without the initialisers, in bfloat16 (as the recipe loads the checkpoint), which
    # encodes ~3x faster on CPU than float32.
    with uninitialised(torch.bfloat16):
        text_encoder = _qwen_text_encoder(
            tokenizer,
            **{**text, "num_hidden_layers": 3},
            rope_parameters={
                "rope_type": "default",
                "mrope_section": mrope_section,
                "rope_theta": real["text_encoder"]["rope_theta"],
            },
        )
    fill_random(text_encoder, seed + 1)
    tokenizer_2 = ByT5Tokenizer()
    byt5 = {**real["text_encoder_2"].values, "num_layers": 1, "vocab_size": len(tokenizer_2)}
    text_encoder_2 = T5EncoderModel(T5Config(**byt5, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae_spec = real["vae"].values
    vae = AutoencoderKLHunyuanVideo15(**{**vae_spec, "block_out_channels": (8, 16, 32, 64, 64), "layers_per_block": 1})
    images = {}
    if image_to_video:
        vision = {**real["image_encoder"].values, "num_hidden_layers": 1}
        images = dict(
            pipeline_class=HunyuanVideo15ImageToVideoPipeline,
            image_encoder=SiglipVisionModel(SiglipVisionConfig(**vision)),
            feature_extractor=siglip_image_processor(vision["image_size"]),
        )
    return _assemble(
        real["pipeline"]["shift"],
        real["pipeline"]["guidance_scale"],
        **images,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def siglip_image_processor(size: int):
    """SigLIP's preprocessing (resized to `size` x `size`, mean and std 0.5) at `size` pixels."""
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": size, "width": size})


#: The tiny SigLIP vision tower's width (the tiny transformer's `image_embed_dim`) and input size: 16 tokens of 16.
_TINY_SIGLIP_WIDTH = 16
_TINY_SIGLIP_SIZE = 32


def build_tiny_hunyuanvideo15_i2v_pipeline(seed: int = 0, guidance_scale: float = 1.0):
    """A HunyuanVideo 1.5 image-to-video pipeline: `build_tiny_hunyuanvideo15_pipeline(seed, guidance_scale)`'s text
    encoders, VAE and scheduler, the same transformer configured for image-to-video (`task_type="i2v"`, drawn from
    `seed`) and a 2-layer SigLIP vision tower at 32 px (16 tokens of the transformer's `image_embed_dim`, 16) with its
    processor. Its `target_size` (32) makes the pipeline's own size 32 x 32 for square first frames."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Transformer3DModel
    from transformers import SiglipVisionConfig, SiglipVisionModel

    components = build_tiny_hunyuanvideo15_pipeline(seed, guidance_scale).components
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel.from_config(components["transformer"].config, task_type="i2v")
    assert transformer.config.image_embed_dim == _TINY_SIGLIP_WIDTH
    image_encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=_TINY_SIGLIP_WIDTH,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_TINY_SIGLIP_SIZE,
            patch_size=8,
        )
    )
    return _assemble(
        components["scheduler"].config.shift,
        guidance_scale,
        pipeline_class=HunyuanVideo15ImageToVideoPipeline,
        **{k: v for k, v in components.items() if k not in ("scheduler", "guider", "transformer")},
        transformer=transformer,
        image_encoder=image_encoder,
        feature_extractor=siglip_image_processor(_TINY_SIGLIP_SIZE),
    )
