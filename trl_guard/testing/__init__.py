"""Tiny, randomly initialised pipelines built from configs: for tests, CI and the offline demo (no download)."""

from __future__ import annotations

import torch


def _byte_level_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_clip_tokenizer():
    """A CLIP tokenizer with no files: the 256 byte-level symbols (plain and word-final) and no merges."""
    from transformers import CLIPTokenizer

    symbols = _byte_level_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_clip_text_config(tokenizer):
    """A 2-layer, 32-wide CLIP text tower for the byte-level tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=77,
    )


def _tiny_vae(latent_channels: int):
    """A two-block AutoencoderKL (downsampling by 2) with SD3's shift and scaling factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_tiny_sd3_pipeline(seed: int = 0):
    """An SD3 pipeline of ~80k transformer parameters (latents 4 x H/2 x W/2, patch 2) for 4-64 px images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer))
    vae = _tiny_vae(latent_channels=4)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_t5_tokenizer():
    """A T5 tokenizer with no files: a Unigram vocabulary of lowercase letters, digits and word starts."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'\""]
    pieces += [("▁" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FLUX pipeline of ~0.1M transformer parameters (1-channel VAE latents at H/2, packed 2x2) for 8-64 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer))
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = _tiny_vae(latent_channels=1)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def build_tiny_flux_kontext_pipeline(seed: int = 0):
    """The tiny FLUX pipeline's components in a `FluxKontextPipeline` (image editing): the same transformer takes the
    source image's tokens after the latents'."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**build_tiny_flux_pipeline(seed).components)


# Sizes of the CLIP towers the built-in rewards use, as (hidden, layers, heads, MLP width) for text and vision; the
# real ones see 224 px images in 14 px patches. "tiny" is for tests.
CLIP_SIZES = {
    "tiny": dict(text=(32, 2, 4, 37), vision=(32, 2, 4, 37), patch=8, image=32, projection=16),
    "vit-l-14": dict(text=(768, 12, 12, 3072), vision=(1024, 24, 16, 4096), patch=14, image=224, projection=768),
    "vit-h-14": dict(text=(1024, 24, 16, 4096), vision=(1280, 32, 16, 5120), patch=14, image=224, projection=1024),
}


def build_tiny_clip(folder: str, seed: int = 0, size: str = "tiny") -> str:
    """Write a random `CLIPModel` and its `CLIPProcessor` to `folder`: the real architecture at a size from
    `CLIP_SIZES` (random weights, byte-level tokenizer), for reward tests and speed measurements without downloads."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    spec = CLIP_SIZES[size]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)

    def tower(hidden: int, layers: int, heads: int, mlp: int) -> dict:
        return dict(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=mlp,
            projection_dim=spec["projection"],
        )

    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **tower(*spec["text"]), **special),
        vision_config=dict(image_size=spec["image"], patch_size=spec["patch"], **tower(*spec["vision"])),
        projection_dim=spec["projection"],
    )
    CLIPModel(config).save_pretrained(folder)
    side = spec["image"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_wan_pipeline(seed: int = 0):
    """A Wan2.1 text-to-video pipeline of ~10k transformer parameters for 16-64 px videos of 4k + 1 frames.

    The VAE keeps Wan's compression (time by 4, space by 8) with 4 latent channels and made-up per-channel latent
    statistics, so decoding exercises the normalisation. The tokenizer is the offline Unigram one of
    `tiny_t5_tokenizer`: umT5's tokenizer is a T5 sentencepiece Unigram model too, only with a 256k vocabulary.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    for module in (transformer, text_encoder, vae):
        module.eval()
    # Wan's checkpoints ship UniPC with flow_shift 3.0; Euler with the same shift makes `pipe()` an exact reference.
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


#: The words of QwenImagePipeline's prompt template (system prompt and chat roles), byte-level with "Ġ" for a leading
#: space. With one BPE merge chain per word, the template's prefix tokenizes to the 34 tokens the pipeline drops
#: (`prompt_template_encode_start_idx`), as Qwen's real tokenizer does, so the embeddings start at the user's prompt.
_QWEN_TEMPLATE_WORDS = (
    "system Describe Ġthe Ġimage Ġby Ġdetailing Ġcolor Ġshape Ġsize Ġtexture Ġquantity Ġtext Ġspatial Ġrelationships "
    "Ġof Ġobjects Ġand Ġbackground user assistant"
).split()


def tiny_qwen2_tokenizer():
    """A Qwen2 (byte-level BPE) tokenizer with no files: the 256 byte symbols, merges that spell the words of Qwen-Image's
    prompt template, and the chat special tokens. Other words fall back to single bytes and partial merges."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_level_symbols())}
    merges: list[tuple[str, str]] = []
    for word in _QWEN_TEMPLATE_WORDS:
        piece = word[0]
        for char in word[1:]:
            if (piece, char) not in merges:
                merges.append((piece, char))
            piece += char
            vocab.setdefault(piece, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwenimage_vae():
    """A 4-channel `AutoencoderKLQwenImage` with a VAE factor of 4 and made-up latent statistics (so that the
    pipeline's normalisation is exercised)."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True],  # two spatial downsamplings: vae_scale_factor 4
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )


def tiny_qwenimage_scheduler():
    """Qwen-Image's scheduler settings: exponential dynamic shift, stretched to a last non-zero sigma of 0.02."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
    )


def tiny_qwenimage_transformer():
    """A 2-layer `QwenImageTransformer2DModel` over 4 latent channels, text width 32 (Qwen-Image and its edit models)."""
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(2, 2, 4),
    )


def build_tiny_qwenimage_pipeline(seed: int = 0):
    """A Qwen-Image pipeline of ~25k transformer parameters (4-channel VAE latents at H/4, packed 2x2) for 16-64 px.

    The text encoder is a real `Qwen2_5_VLForConditionalGeneration` (2 text layers of width 32, a 1-block vision tower
    the pipeline never calls) over `tiny_qwen2_tokenizer`; the VAE keeps Qwen-Image's causal 3-D design and per-channel
    latent statistics (made-up values, so decoding exercises the normalisation); the scheduler has the shift settings
    of Qwen-Image's own (exponential dynamic shift, stretched to a last non-zero sigma of 0.02).
    """
    from diffusers import QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = tiny_qwenimage_transformer()
    tokenizer = tiny_qwen2_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        # Multimodal RoPE splits each head's 8 frequency pairs over (time, height, width).
        rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e6},
        pad_token_id=tokenizer.pad_token_id,
    )
    # Qwen's own ids for these (<|endoftext|>, <|im_end|>) lie beyond this vocabulary.
    special_ids = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    vision_config = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=32,
        patch_size=2,
        temporal_patch_size=1,
        spatial_merge_size=1,
        fullatt_block_indexes=[0],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config={**text_config, **special_ids}, vision_config=vision_config, **special_ids)
    )
    vae = tiny_qwenimage_vae()
    for module in (transformer, text_encoder, vae):
        module.eval()
    scheduler = tiny_qwenimage_scheduler()
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
