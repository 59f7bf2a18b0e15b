"""Wan2.1 text-to-video: a 3-D DiT over (C, F, H, W) video latents, UMT5 text conditioning, CFG, flow shift.

What differs from the image families:
- latents are 5-D, (B, C, F', H', W') with F' = (num_frames - 1) / 4 + 1 latent frames (the VAE compresses time by
  4 and space by 8). Nothing else in the trainer changes: the SDE math is per element and the log-probabilities are
  means over every non-batch element, whatever their number;
- `decode` returns one list of PIL frames per sample: the reward contract for video families (docs/rewards.md);
- the VAE normalises latents per channel (`latents_mean`, `latents_std`) instead of one scale and shift;
- Wan's Diffusers checkpoints ship a `UniPCMultistepScheduler` with flow sigmas (`use_flow_sigmas`, `flow_shift`
  3.0 at 480p). Its sigma grid, shifted as WanPipeline's scheduler shifts it, is the one we sample on, with our own
  Euler/SDE steps (as Flow-GRPO's Wan script does); `pipe()` itself runs UniPC's multistep solver on that grid, so
  its images match the adapter's ODE exactly only with a `FlowMatchEulerDiscreteScheduler(shift=...)`.

Wan2.2's two-expert pipelines (`transformer_2`, `boundary_ratio`) go to `Wan22Adapter` (wan22.py); its
per-token-timestep ones (`expand_timesteps`, TI2V-5B) are refused: they need timesteps per latent token, which this
interface does not carry yet.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

from .base import (
    PipelineAdapter,
    PromptEmbeddings,
    SamplingSettings,
    check_frame_count,
    check_resolution_multiple,
    loads_component,
    register,
)

#: Self- and cross-attention projections of every Wan block (`attn1`, `attn2`), the layers Flow-GRPO's Wan script
#: adapts (its list also names MMDiT's `add_*` projections, which a text-to-video Wan has none of).
WAN_ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


@register
class WanAdapter(PipelineAdapter):
    pipeline_classes = ("WanPipeline",)
    default_lora_target_modules = WAN_ATTENTION_PROJECTIONS
    is_video = True

    @classmethod
    def accepts(cls, pipeline: Any) -> bool:
        return getattr(pipeline, "transformer_2", None) is None  # two experts: Wan22Adapter (wan22.py)

    @classmethod
    def accepts_model_index(cls, model_index: dict[str, Any]) -> bool:
        return not loads_component(model_index, "transformer_2")

    def __init__(self, pipeline: Any):
        if pipeline.config.get("expand_timesteps", False):
            raise NotImplementedError(
                "This WanPipeline uses per-token timesteps (expand_timesteps: Wan2.2 TI2V); only the Wan2.1 and "
                "Wan2.2-A14B text-to-video pipelines are supported so far."
            )
        self.check_experts(pipeline)
        super().__init__(pipeline)
        self._integer_timesteps = False  # set by `sigmas`, from the scheduler's own timesteps

    @classmethod
    def check_experts(cls, pipeline: Any) -> None:
        """Refuse a pipeline whose experts are not this adapter's: one transformer (Wan2.1) here, both experts and
        their boundary in `Wan22Adapter`."""
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            raise NotImplementedError(
                "This WanPipeline has two experts (transformer_2, boundary_ratio: Wan2.2 A14B): get_adapter gives it "
                "Wan22Adapter."
            )

    def check_scheduler(self) -> None:
        config = self.pipeline.scheduler.config
        # UniPC (or DPM-Solver) with flow sigmas is a flow-matching schedule too: Wan's checkpoints ship one.
        if config.get("use_flow_sigmas", False) and config.get("prediction_type") == "flow_prediction":
            return
        super().check_scheduler()

    @property
    def cfg_scale(self) -> float:
        return self.settings.guidance_scale

    @property
    def _spatial_multiple(self) -> int:
        """Pixels per latent patch side; WanPipeline also insists on multiples of 16 whatever its VAE."""
        _, patch_h, patch_w = self.denoiser.config.patch_size
        factor = self.pipeline.vae_scale_factor_spatial
        return math.lcm(16, factor * patch_h, factor * patch_w)

    def configure(self, settings: SamplingSettings) -> None:
        check_frame_count(settings.num_frames, self.pipeline.vae_scale_factor_temporal, model="Wan")
        super().configure(settings)

    def check_resolution(self, height: int, width: int) -> None:
        check_resolution_multiple(
            height,
            width,
            self._spatial_multiple,
            model="Wan",
            reason=f"VAE factor {self.pipeline.vae_scale_factor_spatial} x patch size, and WanPipeline's 16",
        )

    def latent_shape(self) -> tuple[int, ...]:
        pipe, settings = self.pipeline, self.settings
        frames = (settings.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        factor = pipe.vae_scale_factor_spatial
        return (self.denoiser.config.in_channels, frames, settings.height // factor, settings.width // factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        # UMT5 states cut at each prompt's length and zero-padded to max_sequence_length, as WanPipeline does: the
        # denoiser's cross-attention has no mask, so the padding length is part of the conditioning.
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.settings.max_sequence_length,
            device=self.device,
        )
        return PromptEmbeddings({"encoder_hidden_states": prompt_embeds})

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        # UniPC hands the denoiser its timesteps as int64 (sigma * 1000 truncated); FlowMatch ones stay float.
        self._integer_timesteps = not torch.is_floating_point(scheduler.timesteps)
        return scheduler.sigmas.detach().clone().float()

    def _timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep WanPipeline gives the denoiser at `sigma`: float32 (the time embedding casts it itself; a
        bfloat16 timestep would round 999 to 1000), truncated to an integer where the scheduler does that."""
        timestep = sigma.double() * self.pipeline.scheduler.config.num_train_timesteps
        if self._integer_timesteps:
            timestep = timestep.floor()
        return timestep.float()

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        return self.run_denoiser(
            denoiser,
            hidden_states=latents.to(dtype),
            timestep=self._timestep(sigma),
            encoder_hidden_states=conditioning.tensors["encoder_hidden_states"].to(dtype),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[list[Image.Image]]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        # Divide by 1/std as WanPipeline does, so the rounding (and the decoded video) is the same bit for bit.
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return self.pipeline.video_processor.postprocess_video(video, output_type="pil")
