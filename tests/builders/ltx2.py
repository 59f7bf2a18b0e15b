"""LTX-2 (video with audio) pipelines built from configs, for tests (no download): a tiny one, and one at the
published checkpoint's real widths with its layers cut (`LTX2_T2V` records where each value comes from)."""

from __future__ import annotations

import torch

from trl_guard.testing import tiny_qwen2_tokenizer
from trl_guard.testing.real_width import Family, Published

from .flux2 import fill_random, uninitialised

#: The text length the tiny pipeline is used with (`max_sequence_length`): a multiple of its connectors' learnable
#: registers, as the pipeline requires (LTX-2's are 128 registers for 1024 tokens).
TINY_MAX_SEQUENCE_LENGTH = 16


def tiny_gemma3_text_encoder(vocab_size: int, pad_token_id: int, hidden_size: int = 16, layers: int = 2):
    """A `Gemma3ForConditionalGeneration` (LTX-2's text encoder class) of `layers` text layers and a 1-layer SigLIP
    tower the pipeline never runs (it encodes text only)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text_config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=8,
        pad_token_id=pad_token_id,
        bos_token_id=pad_token_id,
        eos_token_id=pad_token_id,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=8, patch_size=4
    )
    config = Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config).eval()


def build_tiny_ltx2_pipeline(seed: int = 0, registers: int | None = 8):
    """An LTX2Pipeline of a 2-layer audio-video transformer (16-wide video stream, 8-wide audio stream) for videos of
    2k + 1 frames at multiples of 2 px, with their audio.

    The video VAE compresses space and time by 2 (4 latent channels; LTX-2's: 32 and 8, 128 channels), the audio
    VAE turns 8 mel bins into 2 latent channels of 2 bins at 25 latent frames a second (LTX-2's rate), and the vocoder
    upsamples mel frames by 4 to a stereo 16 kHz waveform. The text encoder is a 2-layer Gemma3 over the offline
    byte-level tokenizer; the connectors replace padding with `registers` learnable registers as LTX-2's do (None:
    no registers, the padding masked instead).
    """
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "left"  # Gemma's, which the pipeline sets too
    torch.manual_seed(seed)
    text_encoder = tiny_gemma3_text_encoder(len(tokenizer), tokenizer.pad_token_id)
    caption_channels = text_encoder.config.text_config.hidden_size
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,  # 2 latent channels x 2 latent mel bins, one token per latent audio frame
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        caption_channels=caption_channels,
        vae_scale_factors=(8, 2, 2),
        rope_double_precision=False,
        rope_type="split",
    )
    connectors = LTX2TextConnectors(
        caption_channels=caption_channels,
        text_proj_in_factor=text_encoder.config.text_config.num_hidden_layers + 1,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=registers,
        audio_connector_num_attention_heads=2,  # both connectors work at the text encoder's width (LTX-2.0)
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=registers,
        connector_rope_base_seq_len=32,
        rope_double_precision=False,
        rope_type="split",
    )
    vae = AutoencoderKLLTX2Video(
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        resolution=32,
        latent_channels=2,
        mel_bins=8,
        sample_rate=16000,
        mel_hop_length=160,
    )
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins,
        hidden_channels=16,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        output_sampling_rate=16000,
    )
    for module in (transformer, connectors, vae, audio_vae, vocoder):
        module.eval()
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.95,
            max_shift=2.05,
            base_image_seq_len=1024,
            max_image_seq_len=4096,
            shift_terminal=0.1,
        ),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )


# ---- LTX-2 at its published widths -----------------------------------------------------------------------------

#: The checkpoint `examples/recipes/ltx2_guard.yaml` trains (diffusers' LTX2Pipeline example).
LTX2_REPO = "Lightricks/LTX-2"

#: The Hub files are not in the search index. diffusers' conversion script wrote the repository's diffusers folders
#: (its defaults: `--original_state_dict_repo_id Lightricks/LTX-2 --version 2.0`, the combined checkpoint
#: `ltx-2-19b-dev.safetensors`), so its "2.0" tables are the values.
_CONVERSION_SCRIPT = "huggingface/diffusers scripts/convert_ltx2_to_diffusers.py"

#: 48 audio-video blocks: the video stream 32 heads x 128 = 4096 over 128-channel latent tokens (patch 1 x 1 x 1 of
#: the VAE's latents), the audio stream 32 heads x 64 = 2048 over 128 features a latent audio frame (8 channels x 16 mel
#: bins), Gemma3-12B's 3840-wide text states projected to each stream's width, RoPE split over the head's halves.
LTX2_TRANSFORMER = Published(
    f"{LTX2_REPO} transformer/config.json",
    dict(
        in_channels=128,
        out_channels=128,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=32,
        attention_head_dim=128,
        cross_attention_dim=4096,
        vae_scale_factors=(8, 32, 32),
        pos_embed_max_pos=20,
        base_height=2048,
        base_width=2048,
        gated_attn=False,
        cross_attn_mod=False,
        audio_in_channels=128,
        audio_out_channels=128,
        audio_patch_size=1,
        audio_patch_size_t=1,
        audio_num_attention_heads=32,
        audio_attention_head_dim=64,
        audio_cross_attention_dim=2048,
        audio_scale_factor=4,
        audio_pos_embed_max_pos=20,
        audio_sampling_rate=16000,
        audio_hop_length=160,
        audio_gated_attn=False,
        audio_cross_attn_mod=False,
        num_layers=48,
        activation_fn="gelu-approximate",
        qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=3840,
        attention_bias=True,
        attention_out_bias=True,
        rope_theta=10000.0,
        rope_double_precision=True,
        causal_offset=1,
        timestep_scale_multiplier=1000,
        cross_attn_timestep_scale_multiplier=1000,
        rope_type="split",
        use_prompt_embeddings=True,
        perturbed_attn=False,
        ff_bias=True,
        audio_ff_bias=True,
        use_prompt_adaln_single=True,
        use_keyframes_abs_pos_embedding=False,
    ),
    note=f"{_CONVERSION_SCRIPT} get_ltx2_transformer_config('2.0'). Its last four (`ff_bias` to "
    "`use_keyframes_abs_pos_embedding`) are not in that table: LTX2VideoTransformer3DModel's defaults, which its "
    "docstring gives as LTX-2.0's (LTX-2.5 changes them). All are the class defaults but `rope_type` ('interleaved').",
)

#: The text connectors: Gemma3-12B's 49 hidden states (48 layers and the embeddings) normalised and projected to
#: 3840, then one 2-layer, 30 x 128-wide transformer per stream whose 128 learnable registers replace the padding.
LTX2_CONNECTORS = Published(
    f"{LTX2_REPO} connectors/config.json",
    dict(
        caption_channels=3840,
        text_proj_in_factor=49,
        video_connector_num_attention_heads=30,
        video_connector_attention_head_dim=128,
        video_connector_num_layers=2,
        video_connector_num_learnable_registers=128,
        video_gated_attn=False,
        audio_connector_num_attention_heads=30,
        audio_connector_attention_head_dim=128,
        audio_connector_num_layers=2,
        audio_connector_num_learnable_registers=128,
        audio_gated_attn=False,
        connector_rope_base_seq_len=4096,
        rope_theta=10000.0,
        rope_double_precision=True,
        causal_temporal_positioning=False,
        rope_type="split",
        per_modality_projections=False,
        video_hidden_dim=4096,
        audio_hidden_dim=2048,
        proj_bias=False,
    ),
    note=f"{_CONVERSION_SCRIPT} get_ltx2_connectors_config('2.0'); `video_hidden_dim` and `audio_hidden_dim`, read "
    "only with `per_modality_projections` (LTX-2.3), are not in it: the class defaults. All are LTX2TextConnectors' "
    "defaults but `rope_type` ('interleaved').",
)

#: The video VAE: 128 latent channels, 32x spatial (a 4 x 4 patch, then three 2x downsamplings) and 8x temporal
#: compression, per-channel latent statistics (buffers of the checkpoint) and a scaling factor of 1.
LTX2_VAE = Published(
    f"{LTX2_REPO} vae/config.json",
    dict(
        in_channels=3,
        out_channels=3,
        latent_channels=128,
        block_out_channels=(256, 512, 1024, 2048),
        down_block_types=("LTX2VideoDownBlock3D",) * 4,
        decoder_block_out_channels=(256, 512, 1024),
        layers_per_block=(4, 6, 6, 2, 2),
        decoder_layers_per_block=(5, 5, 5, 5),
        spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
        resnet_norm_eps=1e-6,
        scaling_factor=1.0,
        encoder_causal=True,
        decoder_causal=False,
        encoder_spatial_padding_mode="zeros",
        decoder_spatial_padding_mode="reflect",
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    ),
    note=f"{_CONVERSION_SCRIPT} get_ltx2_video_vae_config('2.0') with `timestep_conditioning` its flag's default "
    "(off); `scaling_factor` is not in it (AutoencoderKLLTX2Video's default). The class defaults but "
    "`decoder_causal` (True) and the compression ratios (None: computed from the blocks, the same 32 and 8).",
)

#: The audio VAE: 64-bin mel spectrograms of 16 kHz audio (hop 160) to 8 latent channels of 16 bins (ch_mult 1, 2, 4:
#: 4x along time and frequency), causal along time: 25 latent frames a second.
LTX2_AUDIO_VAE = Published(
    f"{LTX2_REPO} audio_vae/config.json",
    dict(
        base_channels=128,
        output_channels=2,
        ch_mult=(1, 2, 4),
        num_res_blocks=2,
        attn_resolutions=None,
        in_channels=2,
        resolution=256,
        latent_channels=8,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=64,
        double_z=True,
    ),
    note=f"{_CONVERSION_SCRIPT} get_ltx2_audio_vae_config('2.0'): AutoencoderKLLTX2Audio's defaults.",
)

#: The vocoder: the stereo mel spectrogram (2 x 64 bins) to a stereo 24 kHz waveform, upsampling by 6 x 5 x 2 x 2 x 2
#: = 240 samples a mel frame (hop 160 at 16 kHz) from 1024 channels.
LTX2_VOCODER = Published(
    f"{LTX2_REPO} vocoder/config.json",
    dict(
        in_channels=128,
        hidden_channels=1024,
        out_channels=2,
        upsample_kernel_sizes=[16, 15, 8, 4, 4],
        upsample_factors=[6, 5, 2, 2, 2],
        resnet_kernel_sizes=[3, 7, 11],
        resnet_dilations=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        act_fn="leaky_relu",
        leaky_relu_negative_slope=0.1,
        antialias=False,
        antialias_ratio=2,
        antialias_kernel_size=12,
        final_act_fn="tanh",
        final_bias=True,
        output_sampling_rate=24000,
    ),
    note=f"{_CONVERSION_SCRIPT} get_ltx2_vocoder_config('2.0'); `antialias_ratio` and `antialias_kernel_size`, read "
    "only with `antialias` (LTX-2.3), are not in it: the class defaults. All are LTX2Vocoder's defaults.",
)

#: Gemma 3 12B's language model (`text_config` of `Gemma3ForConditionalGeneration`): 16 query heads x 256 (8 key/value
#: heads) in a 3840-wide model, sliding-window layers (1024 tokens) between global ones with linearly scaled RoPE.
GEMMA3_12B_TEXT = Published(
    f"{LTX2_REPO} text_encoder/config.json (= google/gemma-3-12b-it-qat-q4_0-unquantized's text config)",
    dict(
        hidden_size=3840,
        intermediate_size=15360,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        num_hidden_layers=48,
        sliding_window=1024,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        query_pre_attn_scalar=256,
        vocab_size=262_144,
    ),
    note=f"{_CONVERSION_SCRIPT} saves `--text_encoder_model_id` (default google/gemma-3-12b-it-qat-q4_0-unquantized) "
    "as the text encoder; its sizes are transformers' src/transformers/models/gemma3/convert_gemma3_weights.py "
    "_VARIANTS['gemma3_12b'] (hidden 30 x 128, MLP 4x; its `rope_theta` and `rope_local_base_freq` are the two "
    "`rope_theta`s of `rope_parameters` here, transformers 5's form). "
    "`vocab_size` is that table's; the checkpoint's embedding table adds rows for the image tokens (not read here). "
    "LTX2TextConnectors' defaults (caption_channels 3840, text_proj_in_factor 48 + 1) say the same model.",
)

#: Gemma 3's SigLIP vision tower (which LTX2Pipeline never runs: it encodes text only).
GEMMA3_VISION = Published(
    "google/gemma-3-12b-it-qat-q4_0-unquantized config.json vision_config",
    dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
    ),  # fmt: skip
    note="transformers' src/transformers/models/gemma3/convert_gemma3_weights.py _VISION_CONFIG (every variant's).",
)

#: The scheduler of the non-distilled checkpoint (shift from 0.95 at 1024 tokens to 2.05 at 4096, stretched to end at
#: 0.1) and LTX2Pipeline's sampling defaults the recipe keeps.
LTX2_PIPELINE = Published(
    f"{LTX2_REPO} scheduler/scheduler_config.json, and LTX2Pipeline.__call__'s defaults",
    dict(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
        guidance_scale=3.0,
        frame_rate=24.0,
        max_sequence_length=1024,
    ),
    note=f"{_CONVERSION_SCRIPT} `main`, --full_pipeline for a combined file without 'distilled' in its name: "
    "FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, "
    "base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1). `guidance_scale`, `frame_rate` and "
    "`max_sequence_length` are LTX2Pipeline.__call__'s defaults (diffusers 0.42).",
)

#: LTX-2's published configs, by pipeline component (`pipeline`: the scheduler and the sampling defaults), for
#: `build_real_width_ltx2_pipeline`.
LTX2_T2V = Family(
    "LTX-2",
    dict(
        transformer=LTX2_TRANSFORMER,
        connectors=LTX2_CONNECTORS,
        text_encoder=GEMMA3_12B_TEXT,
        text_encoder_vision=GEMMA3_VISION,
        vae=LTX2_VAE,
        audio_vae=LTX2_AUDIO_VAE,
        vocoder=LTX2_VOCODER,
        pipeline=LTX2_PIPELINE,
    ),
)

#: The text length of the real-width pipeline: one block of the connectors' 128 learnable registers.
REAL_WIDTH_MAX_SEQUENCE_LENGTH = 128


def build_real_width_ltx2_transformer(seed: int = 0, num_layers: int = 1):
    """The transformer of `build_real_width_ltx2_pipeline(seed, num_layers)`, alone."""
    from diffusers import LTX2VideoTransformer3DModel

    # 0.7 G parameters with one block (the timestep and cross-modal modulation MLPs are 0.3 G of them): filled
    # without the initialisers, which take ~15 s on CPU.
    with uninitialised(torch.float32):
        transformer = LTX2VideoTransformer3DModel(**{**LTX2_T2V["transformer"].values, "num_layers": num_layers})
    return fill_random(transformer, seed).eval()


def build_real_width_ltx2_pipeline(seed: int = 0, num_layers: int = 1, text_layers: int = 1):
    """LTX-2 at the real widths of `LTX2_T2V`, with `num_layers` audio-video blocks (of 48): 0.73 G transformer
    parameters with one block, in float32, filled by `fill_random` from `seed`.

    The rest is drawn from `seed + 1`. Gemma3-12B's 3840-wide text model has `text_layers` layers (its first, a
    sliding-window one, with 1: the pipeline stacks every hidden state, so the connectors' input projection takes
    `text_layers + 1` of them instead of 49) over the offline byte-level tokenizer, and a one-block, 8-wide SigLIP tower
    the pipeline never runs; the connectors keep their width and 128 registers with one layer each (of 2). Both are
    bfloat16 (as the recipe loads them) and filled by `fill_random`, which is ~3x faster on CPU than float32 and its
    initialisers. The VAEs and the vocoder keep their latent channels, mel bins, compression and upsampling factors
    and sample rates, with narrow blocks (one layer each; the audio VAE keeps its 128 base channels, the size of its
    latent statistics). The scheduler is the checkpoint's.
    """
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    real = LTX2_T2V
    transformer = build_real_width_ltx2_transformer(seed, num_layers)
    torch.manual_seed(seed + 1)
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id
    text = {**real["text_encoder"].values, "num_hidden_layers": text_layers, "vocab_size": len(tokenizer)}
    vision = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=8)
    with uninitialised(torch.bfloat16):
        text_encoder = Gemma3ForConditionalGeneration(
            Gemma3Config(
                text_config=Gemma3TextConfig(**text, pad_token_id=pad, bos_token_id=pad, eos_token_id=pad),
                vision_config=SiglipVisionConfig(**vision, patch_size=4),
                mm_tokens_per_image=4,
            )
        )
        connectors = LTX2TextConnectors(
            **{
                **real["connectors"].values,
                "text_proj_in_factor": text_layers + 1,
                "video_connector_num_layers": 1,
                "audio_connector_num_layers": 1,
            }
        )
    fill_random(text_encoder, seed + 1)
    fill_random(connectors, seed + 2)
    vae_spec = real["vae"].values
    vae = AutoencoderKLLTX2Video(
        **{
            **vae_spec,
            "block_out_channels": (8, 16, 32, 64),
            "decoder_block_out_channels": (16, 32, 64),
            "layers_per_block": (1, 1, 1, 1, 1),
            "decoder_layers_per_block": (1, 1, 1, 1),
        }
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    # `base_channels` stays: the audio VAE's latent statistics have one entry per base channel, 128, which is how
    # they match a packed audio token's 8 channels x 16 mel bins.
    audio_vae = AutoencoderKLLTX2Audio(**{**real["audio_vae"].values, "num_res_blocks": 1})
    vocoder = LTX2Vocoder(**{**real["vocoder"].values, "hidden_channels": 64})
    for module in (text_encoder, connectors, vae, audio_vae, vocoder):
        module.eval()
    schedule = real["pipeline"].values
    scheduler_keys = ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**{k: schedule[k] for k in (*scheduler_keys, "shift_terminal")}),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )
