"""Tiny FLUX.2 [dev] (`Flux2Pipeline`) and FLUX.2 [klein] (`Flux2KleinPipeline`) pipelines built from configs, and
pipelines at the real checkpoints' widths with few layers, whose config values are recorded below as `Published`
entries naming their sources (the convention of `trl_guard.testing.real_width`). Nothing is downloaded.

FLUX.2 stacks three hidden layers of its text encoder per token (`text_encoder_out_layers`: (10, 20, 30) for [dev]'s
Mistral3, (9, 18, 27) for [klein]'s Qwen3), so the tiny text encoders keep 31 and 28 layers, 16 wide, and the
pipelines run with their own defaults. The tiny VAE keeps `AutoencoderKLFlux2`'s design (2x2 patchified latents
normalised by a batch-norm's running statistics, here made-up values so that decoding exercises them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from trl_guard.testing import _byte_level_symbols, tiny_qwen2_tokenizer
from trl_guard.testing.real_width import Family, Published, default_dtype

# ---- the real checkpoints' values -----------------------------------------------------------------------------------
#: FLUX.2 [dev]: 48 heads x 128 = 6144, 8 double- and 48 single-stream blocks, RoPE over four axes of 32 of each head's
#: 128 dims, a guidance embedding, text width 3 x 5120.
FLUX2_DEV_TRANSFORMER = Published(
    "huggingface/diffusers scripts/convert_flux2_to_diffusers.py (commit 58eb52c), get_flux2_transformer_config, "
    "entry 'flux2-dev' (model_id black-forest-labs/FLUX.2-dev)",
    dict(
        patch_size=1,
        in_channels=128,  # 32 VAE channels x a 2x2 patch
        num_layers=8,
        num_single_layers=48,
        attention_head_dim=128,
        num_attention_heads=48,
        joint_attention_dim=15360,  # 3 stacked Mistral hidden states of 5120
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=True,
    ),
    note="The entry leaves guidance_embeds unset: the class default, True. FLUX.2-dev's own transformer/config.json "
    "was not readable here.",
)

#: FLUX.2 [klein] 4B: 24 heads x 128 = 3072, 5 double- and 20 single-stream blocks, no guidance embedding, text width
#: 3 x 2560.
FLUX2_KLEIN_4B_TRANSFORMER = Published(
    "huggingface/diffusers scripts/convert_flux2_to_diffusers.py (commit 58eb52c), get_flux2_transformer_config, "
    "entry 'klein-4b' (the FLUX.2-klein-4B checkpoint)",
    dict(
        patch_size=1,
        in_channels=128,
        num_layers=5,
        num_single_layers=20,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=7680,  # 3 stacked Qwen3 hidden states of 2560
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=False,
    ),
    note="FLUX.2-klein-base-4B is taken to be the undistilled release of the same architecture (not read from its "
    "config).",
)

#: The autoencoder both share: 32 latent channels, 8x compression, normalised after 2x2 patchifying by a batch norm.
FLUX2_VAE = Published(
    "huggingface/diffusers scripts/convert_flux2_to_diffusers.py (commit 58eb52c) converts the released autoencoder "
    "into AutoencoderKLFlux2() with its class defaults, which are these",
    dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=32,
        norm_num_groups=32,
        patch_size=(2, 2),
        batch_norm_eps=1e-4,
        use_quant_conv=True,
        use_post_quant_conv=True,
    ),
)

FLUX2_SCHEDULER = Published(
    "diffusers/FLUX.2-dev-bnb-4bit scheduler/scheduler_config.json",
    dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"),
    note="FLUX.1-dev's settings, which the conversion script copies; FLUX.2's pipelines pass their own mu "
    "(compute_empirical_mu), so only use_dynamic_shifting and time_shift_type matter.",
)

#: Mistral Small 3.x's language model: FLUX.2 [dev]'s `text_encoder`. 32 query heads x 128 (8 key/value heads).
MISTRAL_SMALL_3_TEXT = Published(
    "transformers 5.24 Mistral3Config defaults (documented as mistralai/Mistral-Small-3.1-24B-Instruct-2503's config)",
    dict(
        hidden_size=5120,
        intermediate_size=32768,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=40,
        vocab_size=131072,
        rms_norm_eps=1e-5,
        rope_theta=1e9,
    ),
    note="FLUX.2-dev ships mistralai/Mistral-Small-3.2-24B-Instruct-2506 (convert_flux2_to_diffusers.py), assumed to "
    "have 3.1's architecture: neither config.json was readable here. hidden_size 5120 is confirmed by "
    "joint_attention_dim 15360 = 3 x 5120.",
)

#: Its Pixtral vision tower, which text-to-image never runs (the builders keep one block of it).
MISTRAL_SMALL_3_VISION = Published(
    "transformers 5.24 Mistral3Config defaults, vision_config",
    dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, head_dim=64, num_hidden_layers=24),
)

#: Qwen3-4B: FLUX.2 [klein] 4B's `text_encoder`. 32 query heads x 128 (8 key/value heads).
QWEN3_4B_TEXT = Published(
    "Qwen/Qwen3-4B config.json, as printed in third-party code; hidden_size and vocab_size also in the model card of "
    "latentdivergence/flux2-klein-edit-text ('embedding table [151936, 2560]', 'prompt_embeds [1,64,7680] = hidden "
    "states after layers 9, 18 and 27')",
    dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=36,
        vocab_size=151936,
        rms_norm_eps=1e-6,
    ),
    note="Not read from black-forest-labs/FLUX.2-klein-4B text_encoder/config.json. hidden_size 2560 is confirmed by "
    "joint_attention_dim 7680 = 3 x 2560.",
)

FLUX2_DEV = Family(
    "FLUX.2 [dev]",
    dict(
        transformer=FLUX2_DEV_TRANSFORMER,
        text_encoder=MISTRAL_SMALL_3_TEXT,
        text_encoder_vision=MISTRAL_SMALL_3_VISION,
        vae=FLUX2_VAE,
        scheduler=FLUX2_SCHEDULER,
    ),
)
FLUX2_KLEIN_4B = Family(
    "FLUX.2 [klein] 4B",
    dict(transformer=FLUX2_KLEIN_4B_TRANSFORMER, text_encoder=QWEN3_4B_TEXT, vae=FLUX2_VAE, scheduler=FLUX2_SCHEDULER),
)
FAMILIES = {"dev": FLUX2_DEV, "klein": FLUX2_KLEIN_4B}

# ---- tokenizers ---------------------------------------------------------------------------------------------------
#: Mistral's instruct format (system prompt, then the user turn), reading text parts of list-valued contents as
#: `Flux2Pipeline`'s `format_input` writes them.
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)

#: Qwen3's chat format for one user turn with the generation prompt; `enable_thinking=False` (what
#: `Flux2KleinPipeline` passes; `ZImagePipeline` passes true) appends the empty thinking block, as Qwen3's own template
#: (Qwen/Qwen3-4B's tokenizer_config.json, reduced to these cases) does.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_mistral_tokenizer():
    """A byte-level BPE tokenizer with no files (Mistral's Tekken tokenizer is byte-level BPE too) with Mistral's
    special tokens and instruct chat template.

    `Flux2Pipeline` puts its system message (about 30 tokens for Mistral's tokenizer) before every prompt. Without
    merges it would be ~200 single-byte tokens and a short `max_sequence_length` would truncate every prompt away, so
    the tiny tokenizer knows the whole message as one added token.

    `Flux2Pipeline` ships a `PixtralProcessor`, which needs torchvision (not installed here); for text the pipeline
    only calls `apply_chat_template(..., tokenize=True, padding="max_length")`, which a tokenizer answers the same
    way."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(_byte_level_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=_MISTRAL_CHAT_TEMPLATE,
        model_max_length=2048,
    )
    specials = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([SYSTEM_MESSAGE])
    return tokenizer


def tiny_qwen3_tokenizer():
    """`tiny_qwen2_tokenizer` (Qwen3 keeps Qwen2's byte-level BPE) with Qwen3's chat template and a padding token."""
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    tokenizer.pad_token = "<|endoftext|>"  # Qwen3's padding token
    return tokenizer


# ---- components -----------------------------------------------------------------------------------------------------
def mistral3_text_encoder(tokenizer, text: dict, vision: dict, num_hidden_layers: int, dtype=torch.float32):
    """A `Mistral3ForConditionalGeneration` (Mistral text model plus the Pixtral vision tower the pipeline never calls
    for text) over `tokenizer`, with the given text and vision widths and `num_hidden_layers` text layers."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    widths = {k: v for k, v in text.items() if k not in ("num_hidden_layers", "vocab_size", "rope_theta")}
    text_config = dict(
        model_type="mistral",
        vocab_size=len(tokenizer),
        num_hidden_layers=num_hidden_layers,
        max_position_embeddings=2048,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": text.get("rope_theta", 1e9)},
        **widths,
        **special,
    )
    # One block of the vision tower, on 32 px images: text-to-image never runs it.
    vision_config = dict(model_type="pixtral", **{**vision, "num_hidden_layers": 1, "patch_size": 8, "image_size": 32})
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
        **special,
    )
    return Mistral3ForConditionalGeneration(config).to(dtype)


def qwen3_text_encoder(tokenizer, text: dict, num_hidden_layers: int, dtype=torch.float32):
    """A `Qwen3ForCausalLM` over `tokenizer` with the given widths and `num_hidden_layers` layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    widths = {k: v for k, v in text.items() if k not in ("num_hidden_layers", "vocab_size")}
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        num_hidden_layers=num_hidden_layers,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **widths,
    )
    return Qwen3ForCausalLM(config).to(dtype)


def flux2_vae(seed: int = 0, dtype=torch.float32, **config):
    """An `AutoencoderKLFlux2` with made-up batch-norm statistics (a fresh one has mean 0 and variance 1, which would
    hide a missing or misplaced normalisation)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**config)
    generator = torch.Generator().manual_seed(seed)
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(0.3 * torch.randn(channels, generator=generator))
    vae.bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return vae if vae.dtype == dtype else vae.to(dtype)


#: The tiny VAE: two blocks (factor 2), 2 latent channels, so a token carries 8 channels (2 x a 2x2 patch).
_TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=4,
    sample_size=32,
)


def _tiny_transformer(joint_attention_dim: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * _TINY_VAE["latent_channels"],
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


#: The tiny text encoders' widths: 16 wide, 2 heads of 8 (1 key/value head), 3 x 16 = 48 stacked per token.
_TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def build_tiny_flux2_pipeline(seed: int = 0):
    """A FLUX.2 [dev] pipeline of ~40k transformer parameters (guidance embedding, no CFG) for 8-64 px images.

    The text encoder is a real `Mistral3ForConditionalGeneration` with 31 text layers (the pipeline stacks layers 10,
    20 and 30) of width 16 over `tiny_mistral_tokenizer`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    torch.manual_seed(seed)
    transformer = _tiny_transformer(joint_attention_dim=3 * _TINY_TEXT["hidden_size"], guidance_embeds=True)
    tokenizer = tiny_mistral_tokenizer()
    vision = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, head_dim=8)
    text_encoder = mistral3_text_encoder(tokenizer, _TINY_TEXT, vision, num_hidden_layers=31)
    vae = flux2_vae(seed, **_TINY_VAE)
    for module in (transformer, text_encoder, vae):
        module.eval()
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER.values),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    """A FLUX.2 [klein] pipeline of ~40k transformer parameters (no guidance embedding; CFG unless `is_distilled`, as
    FLUX.2-klein-base-4B and FLUX.2-klein-4B respectively) for 8-64 px images.

    The text encoder is a real `Qwen3ForCausalLM` with 28 layers (the pipeline stacks layers 9, 18 and 27) of width 16
    over `tiny_qwen3_tokenizer`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(seed)
    transformer = _tiny_transformer(joint_attention_dim=3 * _TINY_TEXT["hidden_size"], guidance_embeds=False)
    tokenizer = tiny_qwen3_tokenizer()
    text_encoder = qwen3_text_encoder(tokenizer, _TINY_TEXT, num_hidden_layers=28)
    vae = flux2_vae(seed, **_TINY_VAE)
    for module in (transformer, text_encoder, vae):
        module.eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER.values),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


# ---- real widths ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def uninitialised(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in `dtype` without running torch's or transformers' weight initialisers (buffers such as rotary
    frequencies are still computed): the real widths hold ~1e9 parameters, which those initialisers take ~10 s to
    fill on one CPU thread. Fill the parameters with `fill_random` afterwards."""
    from transformers.initialization import no_init_weights

    with default_dtype(dtype), no_init_weights():
        yield


@torch.no_grad()
def fill_random(module: torch.nn.Module, seed: int = 0, pool_size: int = (1 << 22) + 15) -> torch.nn.Module:
    """Random weights at a cost of a memory copy: every matrix or kernel takes uniform values in [-1, 1) from one
    shared pool (rotated by a per-parameter offset, its odd length keeping rows apart), scaled by 1/sqrt(fan-in) as
    torch's default initialisation; 1-D parameters are 1 (norm weights) or 0 (biases)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.rand(pool_size, generator=generator) * 2 - 1
    for index, (name, param) in enumerate(module.named_parameters()):
        if param.ndim < 2:
            param.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        offset = (index * 7919) % pool_size
        scale = param[0].numel() ** -0.5  # 1 / sqrt(fan-in)
        source = (torch.cat([pool[offset:], pool[:offset]]) * scale).to(param.dtype)
        flat = param.view(-1)
        for start in range(0, flat.numel(), pool_size):
            chunk = flat[start : start + pool_size]
            chunk.copy_(source[: chunk.numel()])
    return module


def build_real_width_flux2_pipeline(
    family: str,
    num_layers: int,
    num_single_layers: int,
    text_layers: int,
    text_overrides: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
):
    """A FLUX.2 pipeline with the real checkpoint's widths (`FAMILIES[family]`: transformer, text encoder, VAE,
    scheduler) and the given numbers of double-stream, single-stream and text-encoder layers, over the tiny tokenizers
    (a 260-300 token vocabulary). `text_overrides` replaces text-encoder values (a narrower MLP, to fit a memory
    budget). Weights are random (`fill_random`), seeded.

    With fewer than 28 text layers the pipeline's default `text_encoder_out_layers` do not exist: sample and train with
    layers the cut text encoder has (the pipelines' `text_encoder_out_layers` argument, the adapters' attribute)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    parts = FAMILIES[family].components
    text_config = {**parts["text_encoder"].values, **(text_overrides or {})}
    transformer_config = {
        **parts["transformer"].values,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
    }
    tokenizer = tiny_mistral_tokenizer() if family == "dev" else tiny_qwen3_tokenizer()
    with uninitialised(dtype):
        transformer = Flux2Transformer2DModel(**transformer_config)
        if family == "dev":
            text = (tokenizer, text_config, parts["text_encoder_vision"].values, text_layers)
            text_encoder = mistral3_text_encoder(*text, dtype=dtype)
        else:
            text_encoder = qwen3_text_encoder(tokenizer, text_config, text_layers, dtype=dtype)
        vae = flux2_vae(seed, dtype=dtype, **parts["vae"].values)
    for offset, module in enumerate((transformer, text_encoder, vae)):
        fill_random(module, seed + offset).eval()
    pipeline_class = Flux2Pipeline if family == "dev" else Flux2KleinPipeline
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**parts["scheduler"].values),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
