"""Z-Image and Z-Image-Turbo: a single-stream DiT over 2x2 latent patches, conditioned on Qwen3 hidden states.

What differs from the families before it, and why the adapter does each thing:
- the transformer takes *lists*: one `(C, 1, H, W)` latent and one `(L_i, D)` caption per sample, each caption as long
  as its own prompt. It pads each caption to a multiple of 32 tokens with a learned pad token that is attended to, and
  places the image's RoPE positions after that padded length: so a caption padded any other way gives another
  output. `encode_prompts` pads the embeddings to `max_sequence_length` under a mask only so that rows concatenate
  (the prompt cache, CFG's negative next to the batch); `forward` hands the transformer each row's unpadded caption;
- the transformer is fed `t = 1 - sigma` (ZImagePipeline passes `(1000 - timestep) / 1000`) and predicts
  `x0 - noise`, the negative of the velocity the scheduler steps with: `forward` negates it, as the pipeline does;
- CFG is `cond + guidance_scale * (cond - uncond)`, on from `guidance_scale > 0` (not 1): the standard form with
  scale `guidance_scale + 1`. Z-Image-Turbo is distilled for `guidance_scale = 0` (no CFG, 8 steps). The pipeline's
  optional `cfg_normalization` and `cfg_truncation` stay at their defaults (off), as in Flow-Factory's Z-Image runs;
- latents are not packed: `(C, H/8, W/8)`, with H and W multiples of 16. The schedule is FLUX's
  `linspace(1, 1/N, N)` with the token-count shift `mu`, which the checkpoints' static-shift schedulers ignore.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from .base import PipelineAdapter, PromptEmbeddings, check_resolution_multiple

#: Attention and SwiGLU projections of every block (the 30 main blocks and the noise and caption refiners):
#: Flow-Factory's default Z-Image LoRA targets (src/flow_factory/models/z_image/z_image.py, `default_target_modules`).
ZIMAGE_LORA_TARGETS = [
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
]


class ZImageAdapter(PipelineAdapter):
    family_name = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    default_lora_target_modules = ZIMAGE_LORA_TARGETS

    @property
    def cfg_scale(self) -> float:
        """The standard-form scale of ZImagePipeline's CFG, `guidance_scale + 1`: CFG is on for `guidance_scale > 0`."""
        return self.settings.guidance_scale + 1.0

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ZImagePipeline's own arithmetic, `cond + g (cond - uncond)`, so that sampling rounds as `pipe(...)` does."""
        return cond + self.settings.guidance_scale * (cond - uncond)

    @property
    def _latent_hw(self) -> tuple[int, int]:
        factor = self.pipeline.vae_scale_factor * 2
        return 2 * (self.settings.height // factor), 2 * (self.settings.width // factor)

    def check_resolution(self, height: int, width: int) -> None:
        factor = self.pipeline.vae_scale_factor
        check_resolution_multiple(
            height, width, factor * 2, model=self.family_name, reason=f"VAE factor {factor} x 2x2 patches"
        )

    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, *self._latent_hw)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """`linspace(1, 1/N, N)` through the scheduler with ZImagePipeline's `mu` (used only by schedulers with
        dynamic shifting; the checkpoints' schedulers shift by a constant)."""
        scheduler = self.pipeline.scheduler
        h, w = self._latent_hw
        mu = calculate_shift(
            (h // 2) * (w // 2),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        base_sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
        scheduler.set_timesteps(sigmas=base_sigmas, device=self.device, mu=mu)
        return scheduler.sigmas.detach().clone().float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        length = self.settings.max_sequence_length
        # a copy: ZImagePipeline writes the chat-templated prompts into the list it is given
        captions, _ = self.pipeline.encode_prompt(
            list(prompts), device=self.device, do_classifier_free_guidance=False, max_sequence_length=length
        )
        width = captions[0].shape[-1]
        padded = captions[0].new_zeros(len(captions), length, width)
        mask = torch.zeros(len(captions), length, dtype=torch.bool, device=padded.device)
        for row, caption in enumerate(captions):
            padded[row, : len(caption)] = caption
            mask[row, : len(caption)] = True
        return PromptEmbeddings({"cap_feats": padded, "cap_mask": mask})

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        feats, mask = conditioning.tensors["cap_feats"], conditioning.tensors["cap_mask"]
        captions = [row[keep].to(dtype) for row, keep in zip(feats, mask.bool())]
        # ZImagePipeline: timestep t = sigma * 1000 from the scheduler, fed as (1000 - t) / 1000
        t = sigma * self.pipeline.scheduler.config.num_train_timesteps
        outputs = self.run_denoiser(
            denoiser,
            x=list(latents.to(dtype).unsqueeze(2).unbind(0)),
            t=(1000 - t) / 1000,
            cap_feats=captions,
            return_dict=False,
        )[0]
        return -torch.stack([out.float() for out in outputs]).squeeze(2)  # x0 - noise, negated to noise - x0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
