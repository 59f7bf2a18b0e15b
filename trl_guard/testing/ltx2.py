"""A tiny LTX-2 (video with audio) pipeline built from configs, for tests (no download)."""

from __future__ import annotations

import torch

from . import tiny_qwen2_tokenizer

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
