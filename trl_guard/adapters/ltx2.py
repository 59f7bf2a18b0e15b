"""LTX-2 text-to-video with audio: one audio-video DiT denoises packed video tokens and packed audio tokens together,
cross-attending between the two streams, conditioned on Gemma3 text states run through LTX-2's text connectors.

One latent tensor per sample holds both streams: `(S_v * C_v + L_a * D_a,)`, the packed video tokens `(S_v, C_v)`
flattened, then the packed (normalised) audio tokens `(L_a, D_a)` flattened. `forward` splits them for the
transformer and concatenates its two velocities the same way, and `decode` splits them for the two VAEs. So the SDE
step, its Gaussian log-probability and every loss treat the audio as part of the sample, with no change to the
algorithms (the log-probability is a sum over both streams' elements).

What `LTX2Pipeline.__call__` does, and how the adapter does it:
- schedule: the audio has its own copy of the scheduler, set to the same sigmas with the same `mu` (from the video's
  token count), so one sigma per step serves both streams. `linspace(1, 1/N, N)` shifted by that `mu` with the
  scheduler's LTX-2 defaults (1024 to 4096 tokens, shift 0.95 to 2.05); the denoiser gets `sigma * 1000` as its
  `timestep` and `sigma` (`use_cross_timestep=True`, the pipeline's default);
- text: Gemma3's hidden states of every layer, left-padded to `max_sequence_length` (a multiple of the connectors'
  learnable registers, which replace the padding), through the `connectors` component: one state for the video
  stream, one for the audio stream, one mask. `encode_prompts` runs both, once per prompt, so they are frozen;
- positions: video RoPE coordinates at `frame_rate` frames a second (`FRAME_RATE`, the pipeline's default 24; the
  audio's length, `num_frames / frame_rate` seconds of latent audio frames, follows from it);
- guidance: classifier-free guidance at `guidance_scale` on both streams, batched as for every family. The pipeline
  combines the branches on x0 (`x - sigma * v`), the same guided velocity up to float rounding. Its other guidances
  are not exposed: spatio-temporal guidance (`stg_scale`), modality-isolation guidance (`modality_scale`), guidance
  rescaling (`guidance_rescale`) and separate audio scales (`audio_guidance_scale` and the others) are off, which is
  `pipe(..., guidance_scale=g, audio_guidance_scale=g, stg_scale=0, audio_stg_scale=0, modality_scale=1,
  audio_modality_scale=1, guidance_rescale=0, audio_guidance_rescale=0)`; the pipeline's defaults (STG 1, rescale
  0.7, audio CFG 7) are not what the adapter samples. Prompt enhancement and the duration head are not used
  (`num_frames` is the run's);
- decoding: video latents denormalised with the VAE's per-channel statistics (decode timestep 0 for a VAE with
  timestep conditioning, the pipeline's default), audio latents denormalised, through the audio VAE to a mel
  spectrogram and the vocoder to a waveform. `decode` returns `VideosWithAudio`: the frames, as for every video
  family, carrying one `(waveform, sample_rate)` per sample that reward functions receive as `audios`.

LoRA: `LTX2Pipeline.load_lora_weights` reads the file `save_lora` writes (transformer only; the connectors are not
trained). FSDP2: the transformer declares no `_no_split_modules`, so accelerate's transformer-based policy wraps no
block unless the accelerate config names `LTX2VideoTransformerBlock` (`fsdp_transformer_layer_cls_to_wrap`).
"""

from __future__ import annotations

import math

import torch

from .base import (
    PipelineAdapter,
    PromptEmbeddings,
    SamplingSettings,
    VideosWithAudio,
    check_frame_count,
    check_resolution_multiple,
    register,
    token_shifted_sigmas,
)

#: Self-attention, text cross-attention and the two audio-video cross-attentions of every block, both streams:
#: every attention projection, the layers Flow-GRPO-style LoRAs adapt.
LTX2_ATTENTION_PROJECTIONS = [
    f"{attention}.{projection}"
    for attention in ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    for projection in ("to_q", "to_k", "to_v", "to_out.0")
]

#: The frame rate LTX2Pipeline conditions on by default; it also fixes the audio's length.
FRAME_RATE = 24.0


@register
class LTX2Adapter(PipelineAdapter):
    pipeline_classes = ("LTX2Pipeline",)
    default_lora_target_modules = LTX2_ATTENTION_PROJECTIONS
    context_parallel_splits_text = True
    is_video = True
    frame_rate = FRAME_RATE

    @property
    def cfg_scale(self) -> float:
        return self.settings.guidance_scale

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        # The connectors run in `encode_prompts`, on the text encoder's output.
        return [self.pipeline.text_encoder, self.pipeline.connectors]

    def configure(self, settings: SamplingSettings) -> None:
        check_frame_count(settings.num_frames, self.pipeline.vae_temporal_compression_ratio, model="LTX-2")
        registers = self.pipeline.connectors.video_connector.num_learnable_registers
        if registers and settings.max_sequence_length % registers:
            suggestion = max(registers, settings.max_sequence_length // registers * registers)
            raise ValueError(
                f"max_sequence_length={settings.max_sequence_length} does not fit LTX-2: its text connectors replace "
                f"the padding with {registers} learnable registers, so the text length is a multiple of {registers}. "
                f"Set max_sequence_length to, for example, {suggestion}."
            )
        super().configure(settings)

    def check_resolution(self, height: int, width: int) -> None:
        factor = self.pipeline.vae_spatial_compression_ratio
        patch = self.denoiser.config.patch_size
        check_resolution_multiple(
            height,
            width,
            math.lcm(32, factor * patch),
            model="LTX-2",
            reason=f"VAE factor {factor} x patch size {patch}, and 32 (LTX2Pipeline's check)",
        )

    # ---- the two streams in one tensor ------------------------------------------------------------------------
    @property
    def _video_grid(self) -> tuple[int, int, int]:
        """Latent frames, height and width of the video."""
        pipe, settings = self.pipeline, self.settings
        factor = pipe.vae_spatial_compression_ratio
        frames = (settings.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
        return frames, settings.height // factor, settings.width // factor

    @property
    def _video_tokens(self) -> tuple[int, int]:
        """Packed video tokens and their features."""
        config = self.denoiser.config
        frames, height, width = self._video_grid
        tokens = (frames // config.patch_size_t) * (height // config.patch_size) * (width // config.patch_size)
        return tokens, config.in_channels

    @property
    def _audio_frames(self) -> int:
        """Latent audio frames: as long as the video plays at `frame_rate`, at the audio VAE's latent rate."""
        pipe = self.pipeline
        per_second = (
            pipe.audio_sampling_rate / pipe.audio_hop_length / float(pipe.audio_vae_temporal_compression_ratio)
        )
        return round(self.settings.num_frames / self.frame_rate * per_second)

    @property
    def _audio_tokens(self) -> tuple[int, int]:
        """Packed audio tokens (one per latent audio frame) and their features (latent channels x mel bins)."""
        return self._audio_frames, self.denoiser.config.audio_in_channels

    def latent_shape(self) -> tuple[int, ...]:
        return (math.prod(self._video_tokens) + math.prod(self._audio_tokens),)

    def split(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of latents `(B, n)` as the packed video `(B, S_v, C_v)` and packed audio `(B, L_a, D_a)`."""
        video_size = math.prod(self._video_tokens)
        video, audio = latents[:, :video_size], latents[:, video_size:]
        return video.reshape(len(latents), *self._video_tokens), audio.reshape(len(latents), *self._audio_tokens)

    @staticmethod
    def join(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The inverse of `split`: packed video and audio tokens as one flat row per sample."""
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)

    # ---- text, schedule, denoiser ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        pipe = self.pipeline
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.settings.max_sequence_length,
            device=self.device,
        )
        padding_side = getattr(pipe.tokenizer, "padding_side", "left")
        video_text, audio_text, text_mask = pipe.connectors(embeds, mask, padding_side=padding_side)
        return PromptEmbeddings(
            {
                "encoder_hidden_states": video_text,
                "audio_encoder_hidden_states": audio_text,
                "encoder_attention_mask": text_mask,
            }
        )

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        # shifted at the video's token count, with LTX2Pipeline's defaults
        return token_shifted_sigmas(
            self.pipeline.scheduler,
            num_inference_steps,
            self._video_tokens[0],
            self.device,
            base_seq_len=1024,
            base_shift=0.95,
            max_shift=2.05,
        )

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        tensors = conditioning.tensors
        video, audio = self.split(latents.to(dtype))
        frames, height, width = self._video_grid
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps
        mask = tensors["encoder_attention_mask"]
        video_velocity, audio_velocity = self.run_denoiser(
            denoiser,
            hidden_states=video,
            audio_hidden_states=audio,
            encoder_hidden_states=tensors["encoder_hidden_states"].to(dtype),
            audio_encoder_hidden_states=tensors["audio_encoder_hidden_states"].to(dtype),
            timestep=timestep,
            sigma=timestep,  # read by LTX-2.3's prompt modulation, as the pipeline passes it
            encoder_attention_mask=mask,
            audio_encoder_attention_mask=mask,
            num_frames=frames,
            height=height,
            width=width,
            fps=self.frame_rate,
            audio_num_frames=self._audio_frames,
            use_cross_timestep=True,
            return_dict=False,
        )
        return self.join(video_velocity, audio_velocity)

    # ---- decoding ----------------------------------------------------------------------------------------------
    def _unpack_video(self, tokens: torch.Tensor) -> torch.Tensor:
        """Packed video tokens `(B, S, C p_t p p)` to VAE latents `(B, C, F, H, W)`."""
        config = self.denoiser.config
        p, pt = config.patch_size, config.patch_size_t
        frames, height, width = self._video_grid
        batch = len(tokens)
        tokens = tokens.reshape(batch, frames // pt, height // p, width // p, -1, pt, p, p)
        return tokens.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, -1, frames, height, width)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> VideosWithAudio:
        pipe = self.pipeline
        video, audio = self.split(latents)
        vae = pipe.vae
        video = self._unpack_video(video.float())
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(video)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(video)
        video = (video * std / vae.config.scaling_factor + mean).to(vae.dtype)
        # A VAE with timestep conditioning decodes at the pipeline's default decode timestep, 0 (and no noise).
        timestep = video.new_zeros(len(video)) if vae.config.timestep_conditioning else None
        frames = pipe.video_processor.postprocess_video(
            vae.decode(video, timestep, return_dict=False)[0], output_type="pil"
        )

        audio_vae, vocoder = pipe.audio_vae, pipe.vocoder
        audio = audio.float().to(audio_vae.device)
        audio = audio * audio_vae.latents_std.to(audio) + audio_vae.latents_mean.to(audio)
        mel_bins = audio_vae.config.mel_bins // pipe.audio_vae_mel_compression_ratio
        audio = audio.unflatten(2, (-1, mel_bins)).transpose(1, 2)  # (B, C, L, M)
        mel = audio_vae.decode(audio.to(audio_vae.dtype), return_dict=False)[0]
        waveforms = vocoder(mel.to(vocoder.device, vocoder.dtype)).float().cpu().numpy()
        rate = int(vocoder.config.output_sampling_rate)
        return VideosWithAudio(frames, [(waveform, rate) for waveform in waveforms])

    def lora_load_code(self, repo: str) -> str:
        return f'pipe.load_lora_weights("{repo}")'

    @classmethod
    def check_settings(cls, settings: SamplingSettings, pipeline_class: str) -> None:
        super().check_settings(settings, pipeline_class)
        if settings.true_cfg_scale > 1:
            raise ValueError(
                f"true_cfg_scale={settings.true_cfg_scale}, but LTX-2's classifier-free guidance is guidance_scale: "
                "leave true_cfg_scale at 1 and set guidance_scale."
            )
