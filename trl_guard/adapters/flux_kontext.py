"""FLUX.1 Kontext: FLUX.1 that edits a source image given an instruction.

What differs from FLUX.1 (`flux.py`):
- each dataset row carries a source image (column `image`, as `FluxKontextPipeline(image=...)` names it). It is
  resized to the training resolution, encoded once per round by the VAE (the mode of its latent distribution) and
  packed like the latents;
- at every step the denoiser sees the noisy latents followed by the source image's tokens, whose position ids are
  the latents' with the first axis set to 1; only the velocity of the latents' tokens is kept.

The source image is resized to `height` x `width`, as Flow-GRPO's counting-edit training does (512 x 512). The
pipeline's own call instead picks the closest of Kontext's preferred resolutions unless `_auto_resize=False`.
"""

from __future__ import annotations

import torch

from .base import PromptEmbeddings, register, rgb_image
from .flux import FluxAdapter


@register
class FluxKontextAdapter(FluxAdapter):
    family_name = "FLUX.1 Kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    condition_columns = ("image",)
    #: Source images through the VAE at once, at most.
    encode_batch_size = 8

    @torch.no_grad()
    def encode_conditions(self, columns: dict[str, list]) -> PromptEmbeddings:
        images = [rgb_image(image, "FLUX.1 Kontext edits the image") for image in columns["image"]]
        processor, vae = self.pipeline.image_processor, self.pipeline.vae
        parts = []
        for start in range(0, len(images), self.encode_batch_size):
            # preprocess resizes to the training resolution (Lanczos), as FluxKontextPipeline's own preprocessing
            pixels = processor.preprocess(images[start : start + self.encode_batch_size], *self._resolution)
            latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            parts.append(self.pack(latents).float())
        return PromptEmbeddings({"image_latents": torch.cat(parts)})

    @property
    def _resolution(self) -> tuple[int, int]:
        return self.settings.height, self.settings.width

    def forward(self, denoiser, latents, sigma, conditioning):
        text = dict(conditioning.tensors)
        image_latents = text.pop("image_latents")
        latent_ids = self._image_ids()
        source_ids = latent_ids.clone()
        source_ids[:, 0] = 1  # the source image's tokens: the latents' grid on a second "frame"
        tokens = torch.cat([latents, image_latents.to(latents.dtype)], dim=1)
        velocity = self._call_transformer(denoiser, tokens, torch.cat([latent_ids, source_ids]), sigma, text)
        return velocity[:, : latents.shape[1]]
