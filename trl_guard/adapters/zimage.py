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

import torch
from PIL import Image

from .base import PackedLatentsMixin, PipelineAdapter, PromptEmbeddings, register

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


@register
class ZImageAdapter(PackedLatentsMixin, PipelineAdapter):
    """The latent grid, resolution check and token-count-shifted schedule are `PackedLatentsMixin`'s; the latents
    stay unpacked (`latent_shape`), as the transformer patchifies them itself."""

    family_name = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    default_lora_target_modules = ZIMAGE_LORA_TARGETS
    patch_reason = "x 2x2 patches"

    @property
    def cfg_scale(self) -> float:
        """The standard-form scale of ZImagePipeline's CFG, `guidance_scale + 1`: CFG is on for `guidance_scale > 0`."""
        return self.settings.guidance_scale + 1.0

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """ZImagePipeline's own arithmetic, `cond + g (cond - uncond)`, so that sampling rounds as `pipe(...)` does."""
        return cond + self.settings.guidance_scale * (cond - uncond)

    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, *self._latent_hw)

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
