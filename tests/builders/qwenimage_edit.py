"""Tiny and real-width Qwen-Image-Edit pipelines built from configs, for tests (no download).

The edit pipelines read each source image twice: the VAE encodes it into tokens the transformer sees next to the
latents, and the Qwen2.5-VL text encoder sees it (through its vision tower) together with the instruction. So the
tiny text encoder here has a working vision tower and a `Qwen2VLProcessor` built offline: a byte-level tokenizer with
the vision special tokens, and the PIL image processor with a small pixel budget (`max_pixels`), so that the 384 x 384
condition image the pipeline makes becomes a few vision tokens.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from trl_guard.testing import (
    _byte_level_symbols,
    tiny_qwenimage_scheduler,
    tiny_qwenimage_transformer,
    tiny_qwenimage_vae,
)
from trl_guard.testing.real_width import Family, Published

#: QwenImageEditPipeline's and QwenImageEditPlusPipeline's system prompt: the tiny tokenizer spells each of its
#: pre-tokens as one token, as Qwen's real tokenizer does, so the prefix is the 64 tokens the pipelines drop
#: (`prompt_template_encode_start_idx`) and the embeddings start at the user's turn.
_EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

#: Qwen-Image-Edit-2509's transformer (2511 is the same plus "zero_cond_t": true).
QWEN_IMAGE_EDIT_TRANSFORMER = Published(
    "Qwen/Qwen-Image-Edit-2509 transformer/config.json",
    dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
        guidance_embeds=False,
        num_layers=60,
    ),
    note="As quoted by third-party loaders in the search index (a benchmark script's config dict for "
    "Qwen-Image-Edit-2511, and a loader's test that calls a config without zero_cond_t 'a valid 2509 config.json'); "
    "the Hub file is not stored.",
)

_QWEN25_VL_7B_NOTE = (
    "Qwen/Qwen2.5-VL-7B-Instruct's config.json, as several repositories in the search index reproduce it (conversion "
    "scripts building Qwen2_5_VLConfig for Qwen-Image's text encoder; a TensorRT-LLM test scenario). transformers' "
    "Qwen2_5_VLConfig defaults are not these (they are the 72B model's)."
)

QWEN_IMAGE_EDIT_TEXT = Published(
    "Qwen/Qwen-Image-Edit-2509 text_encoder/config.json (text_config)",
    dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        rope_theta=1000000.0,
        mrope_section=[16, 24, 24],
        vocab_size=152064,
    ),
    note=_QWEN25_VL_7B_NOTE,
)

QWEN_IMAGE_EDIT_VISION = Published(
    "Qwen/Qwen-Image-Edit-2509 text_encoder/config.json (vision_config)",
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
    note=_QWEN25_VL_7B_NOTE,
)

QWEN_IMAGE_EDIT_VAE = Published(
    "diffusers AutoencoderKLQwenImage class defaults, whose docstring ties them to Qwen-Image",
    dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    note="The edit checkpoints ship Qwen-Image's VAE. Not checked against the Hub file (not in the search index).",
)

#: The real checkpoints' values, for the real-width test (`build_real_width_qwenimage_edit_plus_pipeline`).
QWEN_IMAGE_EDIT_REAL = Family(
    "Qwen-Image-Edit-2511",
    dict(
        transformer=QWEN_IMAGE_EDIT_TRANSFORMER,
        text_encoder=QWEN_IMAGE_EDIT_TEXT,
        vision=QWEN_IMAGE_EDIT_VISION,
        vae=QWEN_IMAGE_EDIT_VAE,
    ),
)


def tiny_qwen2_vl_tokenizer():
    """A Qwen2 byte-level BPE tokenizer with no files: merges that spell each pre-token of the edit pipelines' system
    prompt and chat roles as one token, and the chat and vision special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_level_symbols())}
    vocab["<|endoftext|>"] = len(vocab)
    merges: list[tuple[str, str]] = []

    def build():
        return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=4096)

    tokenizer = build()
    pre_tokens = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(f"system\n{_EDIT_SYSTEM_PROMPT}")
    words = [word for word, _ in pre_tokens] + ["user", "assistant"]
    # Each round joins the pieces a word still falls into with merges of lower rank than all before: a merge made for
    # one word can split another ("co" of "color" inside "Ġconsistency"), which the next round then joins.
    for _ in range(8):
        pieces = [[p.value for p in tokenizer.backend_tokenizer.model.tokenize(word)] for word in words]
        split = [word_pieces for word_pieces in pieces if len(word_pieces) > 1]
        if not split:
            break
        for word_pieces in split:
            piece = word_pieces[0]
            for following in word_pieces[1:]:
                if (piece, following) not in merges:
                    merges.append((piece, following))
                piece += following
                vocab.setdefault(piece, len(vocab))
        tokenizer = build()
    tokenizer.add_special_tokens({"additional_special_tokens": _SPECIAL_TOKENS})
    return tokenizer


def tiny_qwen2_vl_processor(tokenizer, patch_size: int = 8, merge_size: int = 2, max_pixels: int = 32 * 32):
    """A `Qwen2VLProcessor` without downloads: the PIL image processor shrinking every image to at most `max_pixels`
    (a 384 x 384 condition image becomes 32 x 32: 16 patches of 8 px, 4 vision tokens), and no video processor.

    transformers checks the class of each processor attribute, the absent video processor included, against
    `VideoProcessorMixin`, which it defines only when torchvision is installed (it is not a dependency here): the
    processor is then built with that check skipped. Such a processor works in memory but cannot be saved, and a
    saved Qwen-Image-Edit pipeline cannot be loaded without torchvision.
    """
    import transformers
    from transformers import Qwen2VLProcessor
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
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _vl_text_encoder(tokenizer, text: dict, vision: dict):
    """A `Qwen2_5_VLForConditionalGeneration` with the given text and vision settings, wired to `tokenizer`'s ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    special = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    mrope = text.pop("mrope_section")
    text_config = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": text.pop("rope_theta")},
        pad_token_id=tokenizer.pad_token_id,
        **text,
        **special,
    )
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision, **ids, **special)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwenimage_edit_plus_pipeline(seed: int = 0, pipeline_class: str = "QwenImageEditPlusPipeline"):
    """A Qwen-Image-Edit-Plus pipeline (or, with `pipeline_class="QwenImageEditPipeline"`, the one-image edit
    pipeline on the same components) of ~25k transformer parameters for 16-64 px images.

    The transformer and VAE are the tiny Qwen-Image ones (4-channel latents at H/4, packed 2x2). The text encoder is a
    real `Qwen2_5_VLForConditionalGeneration`: 2 text layers of width 32 and a 1-block vision tower (8 px patches,
    2x2 merge) that the pipelines run on each condition image.
    """
    import diffusers

    torch.manual_seed(seed)
    transformer = tiny_qwenimage_transformer()
    tokenizer = tiny_qwen2_vl_tokenizer()
    # Multimodal RoPE splits each text head's 8 frequency pairs over (time, height, width).
    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=[2, 2, 4],
        rope_theta=1e6,
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
        window_size=32,
        fullatt_block_indexes=[0],
    )
    text_encoder = _vl_text_encoder(tokenizer, text, vision)
    vae = tiny_qwenimage_vae()
    for module in (transformer, text_encoder, vae):
        module.eval()
    return getattr(diffusers, pipeline_class)(
        scheduler=tiny_qwenimage_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=tiny_qwen2_vl_processor(tokenizer),
        transformer=transformer,
    )


def build_real_width_qwenimage_edit_plus_pipeline(seed: int = 0, layers: int = 1, zero_cond_t: bool = True):
    """Qwen-Image-Edit-2511's widths (`QWEN_IMAGE_EDIT_REAL`: transformer, Qwen2.5-VL-7B text and vision towers, VAE)
    with `layers` transformer blocks, text layers and vision blocks, a byte-level vocabulary and a narrow VAE.

    About 0.7 G parameters with one layer each: the widths, heads, head dims, RoPE sections, patch sizes and latent
    channels are the checkpoint's, so LoRA targets, packing and every projection's shape are too. The image processor
    keeps the real 14 px patches and 2x2 merge with a small pixel budget.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    real = QWEN_IMAGE_EDIT_REAL
    transformer = QwenImageTransformer2DModel(
        **{**real["transformer"].values, "num_layers": layers}, zero_cond_t=zero_cond_t
    )
    tokenizer = tiny_qwen2_vl_tokenizer()
    text = {**real["text_encoder"].values, "num_hidden_layers": layers}
    text.pop("vocab_size")  # the tiny tokenizer's vocabulary instead of 152k rows of 3584
    vision = {**real["vision"].values, "depth": layers, "fullatt_block_indexes": [layers - 1]}
    text_encoder = _vl_text_encoder(tokenizer, text, vision)
    # The VAE keeps its 16 latent channels, 8x spatial compression and latent statistics, 8-32 channels wide instead
    # of 96-384: latents have the real shape and encoding the sources costs little.
    vae = AutoencoderKLQwenImage(**{**real["vae"].values, "base_dim": 8})
    for module in (transformer, text_encoder, vae):
        module.eval().requires_grad_(False)
    return QwenImageEditPlusPipeline(
        scheduler=tiny_qwenimage_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=tiny_qwen2_vl_processor(tokenizer, patch_size=14, merge_size=2, max_pixels=56 * 56),
        transformer=transformer,
    )
