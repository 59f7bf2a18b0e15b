"""Stable Diffusion 3 / 3.5: MMDiT transformer, two CLIP encoders plus optional T5, 16-channel VAE latents."""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from PIL import Image

from .base import ATTENTION_PROJECTIONS, PipelineAdapter, PromptEmbeddings, check_resolution_multiple, register


@register
class SD3Adapter(PipelineAdapter):
    pipeline_classes = ("StableDiffusion3Pipeline",)
    default_lora_target_modules = ATTENTION_PROJECTIONS
    max_sequence_length_limit = 512  # StableDiffusion3Pipeline.check_inputs

    @property
    def cfg_scale(self) -> float:
        return self.settings.guidance_scale

    def _latent_hw(self) -> tuple[int, int]:
        factor = self.pipeline.vae_scale_factor
        return self.settings.height // factor, self.settings.width // factor

    def check_resolution(self, height: int, width: int) -> None:
        config, factor = self.denoiser.config, self.pipeline.vae_scale_factor
        multiple = factor * config.patch_size
        check_resolution_multiple(
            height,
            width,
            multiple,
            model="this SD3 transformer",
            reason=f"VAE factor {factor} x patch size {config.patch_size}",
            # the learned position embedding is cropped from a pos_embed_max_size grid, so larger images do not fit
            largest=config.pos_embed_max_size * multiple if config.pos_embed_max_size else None,
        )

    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, *self._latent_hw())

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.settings.max_sequence_length,
        )
        return PromptEmbeddings({"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled})

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            h, w = self._latent_hw()
            patch = self.denoiser.config.patch_size
            kwargs["mu"] = calculate_shift(
                (h // patch) * (w // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_inference_steps, device=self.device, **kwargs)
        return scheduler.sigmas.detach().clone().float()

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps
        return self.run_denoiser(
            denoiser,
            hidden_states=latents.to(dtype),
            # float32, as StableDiffusion3Pipeline passes it: in bf16 a timestep above 512 would round to a multiple
            # of 4 (FluxPipeline and QwenImagePipeline do cast to the latents' dtype, and their adapters follow)
            timestep=timestep.float(),
            **{k: v.to(dtype) for k, v in conditioning.tensors.items()},
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
