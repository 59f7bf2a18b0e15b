"""FLUX.1: MMDiT with packed 2x2 latent patches, CLIP pooled + T5 sequence conditioning, dynamic timestep shift.

The worked example of adding a family (docs/adding_a_model_family.md). What differs from SD3:
- latents are packed: the denoiser takes (B, (H/2)(W/2), 4C) tokens with 3-D position ids (`img_ids`, `txt_ids`);
- the schedule is `linspace(1, 1/N, N)` shifted by `mu`, which grows with the image's token count;
- the transformer takes `timestep = sigma` (not `sigma * 1000`) and, for guidance-distilled checkpoints
  (FLUX.1-dev, `config.guidance_embeds`), the guidance scale as an embedding instead of CFG;
- real CFG is optional (`true_cfg_scale > 1` with a negative prompt), as in `FluxPipeline`.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import ATTENTION_PROJECTIONS, PackedLatentsMixin, PipelineAdapter, PromptEmbeddings, register


@register
class FluxAdapter(PackedLatentsMixin, PipelineAdapter):
    family_name = "FLUX"
    pipeline_classes = ("FluxPipeline",)
    default_lora_target_modules = ATTENTION_PROJECTIONS  # matches both the double- and single-stream blocks
    max_sequence_length_limit = 512  # FluxPipeline.check_inputs (and FluxKontextPipeline's)
    context_parallel_splits_text = True

    @property
    def cfg_scale(self) -> float:
        return self.settings.true_cfg_scale  # guidance_scale feeds the guidance embedding instead

    def _image_ids(self) -> torch.Tensor:
        h, w = self._latent_hw
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.settings.max_sequence_length,
        )
        return PromptEmbeddings({"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled})

    def forward(self, denoiser, latents, sigma, conditioning):
        return self._call_transformer(denoiser, latents, self._image_ids(), sigma, conditioning.tensors)

    def _call_transformer(self, denoiser, tokens, image_ids, sigma, text):
        """The transformer on image `tokens` at positions `image_ids`, with the text conditioning `text`."""
        dtype = denoiser.dtype
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full_like(sigma, self.settings.guidance_scale, dtype=torch.float32)
        text_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3, device=tokens.device)
        return self.run_denoiser(
            denoiser,
            hidden_states=tokens.to(dtype),
            timestep=sigma.to(dtype),
            guidance=guidance,
            txt_ids=text_ids,
            img_ids=image_ids,
            **{k: v.to(dtype) for k, v in text.items()},
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = self.unpack(latents).to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
