"""HunyuanVideo 1.5 text-to-video: a dual-stream 3-D DiT over (C, F, H, W) video latents, conditioned on Qwen2.5-VL
text states, ByT5 glyph states (the quoted text of the prompt) and, for image-to-video, SigLIP image states.

What differs from Wan2.1 (wan.py):
- the transformer takes `2C + 1` channels: the noisy latents, condition latents and a mask, both zero for
  text-to-video (the image-to-video pipeline puts its first frame there), and `image_embeds`, all zero for
  text-to-video (the transformer then masks them out);
- two text streams, each with its mask: the transformer attends to the valid tokens only, so `forward` trims the
  padding no row of the batch uses (exact: masked tokens are never attended to, and the pooled text state is a masked
  mean), which keeps the attention short;
- CFG is done by the pipeline's `guider` component (`ClassifierFreeGuidance`), whose arithmetic
  (`uncond + scale * (cond - uncond)`) is the base class's. The adapter does CFG itself at `guidance_scale`, and
  refuses guider settings it does not reproduce (a rescale, the original formulation, a step window);
- the schedule is `linspace(1, 0, N + 1)[:-1]` through the checkpoint's `FlowMatchEulerDiscreteScheduler` (its
  constant `shift`), the timestep is `sigma * 1000` in the denoiser's dtype, as the pipeline casts it;
- the VAE has one `scaling_factor` and no shift; its causal attention mask breaks on batches of more than one video
  (diffusers 0.42), so `decode` decodes one video at a time (the pipeline's `vae.enable_slicing()` does the same).

LoRA: diffusers 0.42 gives HunyuanVideo15Pipeline no `load_lora_weights` (no LoRA loader mixin). `save_lora` writes
the standard diffusers file (`transformer.`-prefixed peft keys and the adapter's metadata, as HunyuanVideo 1's
`save_lora_weights` writes it), which the transformer's own loader reads:
`pipe.transformer.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors", prefix="transformer")`.

Text lengths (1000 Qwen tokens after the template's prefix, 256 ByT5 tokens) are the pipeline's own attributes, not
`max_sequence_length`: HunyuanVideo15Pipeline takes no such argument.

`HunyuanVideo15ImageToVideoPipeline` is `hunyuanvideo15_i2v.py`: the same adapter, whose `_image_inputs` fill the
condition channels and image states that text-to-video leaves zero.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.loaders import HunyuanVideoLoraLoaderMixin
from PIL import Image

from .base import (
    PipelineAdapter,
    PromptEmbeddings,
    SamplingSettings,
    check_frame_count,
    check_resolution_multiple,
    register,
)

#: Attention projections of both streams of every dual-stream block (video `to_*`, text `add_*_proj`,
#: `to_add_out`), the layers Flow-GRPO-style LoRAs adapt on MMDiTs.
HUNYUANVIDEO15_ATTENTION_PROJECTIONS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]

#: The `ClassifierFreeGuidance` settings whose default the adapter's own CFG reproduces.
_GUIDER_DEFAULTS = dict(guidance_rescale=0.0, use_original_formulation=False, start=0.0, stop=1.0)


@register
class HunyuanVideo15Adapter(PipelineAdapter):
    pipeline_classes = ("HunyuanVideo15Pipeline",)
    default_lora_target_modules = HUNYUANVIDEO15_ATTENTION_PROJECTIONS
    is_video = True
    # This pipeline class has no LoRA loader mixin (diffusers 0.42); HunyuanVideo 1's writes the same diffusers format
    # (`transformer.`-prefixed keys, the adapter's metadata), which `transformer.load_lora_adapter` reads.
    lora_file_writer = HunyuanVideoLoraLoaderMixin

    def __init__(self, pipeline: Any):
        self.check_guider(pipeline)
        super().__init__(pipeline)

    @staticmethod
    def check_guider(pipeline: Any) -> None:
        """Refuse a guider whose guidance differs from plain CFG at `guidance_scale`, which is what the adapter does."""
        guider = getattr(pipeline, "guider", None)
        if guider is None:
            return
        if type(guider).__name__ != "ClassifierFreeGuidance":
            raise NotImplementedError(
                f"This HunyuanVideo15Pipeline's guider is {type(guider).__name__}; the adapter reproduces "
                "ClassifierFreeGuidance only. Set pipeline.guider = ClassifierFreeGuidance()."
            )
        config = guider.config
        different = {k: config.get(k, v) for k, v in _GUIDER_DEFAULTS.items() if config.get(k, v) != v}
        if different:
            raise NotImplementedError(
                f"This HunyuanVideo15Pipeline's guider sets {different}; the adapter does plain CFG at "
                f"guidance_scale. Use a guider with the defaults {_GUIDER_DEFAULTS}."
            )

    @property
    def cfg_scale(self) -> float:
        return self.settings.guidance_scale

    @property
    def _spatial_multiple(self) -> int:
        patch = self.denoiser.config.patch_size
        return math.lcm(16, self.pipeline.vae_scale_factor_spatial * patch)

    def configure(self, settings: SamplingSettings) -> None:
        check_frame_count(settings.num_frames, self.pipeline.vae_scale_factor_temporal, model="HunyuanVideo 1.5")
        super().configure(settings)

    def check_resolution(self, height: int, width: int) -> None:
        check_resolution_multiple(
            height,
            width,
            self._spatial_multiple,
            model="HunyuanVideo 1.5",
            reason=f"VAE factor {self.pipeline.vae_scale_factor_spatial} x patch size, and 16",
        )

    def latent_shape(self) -> tuple[int, ...]:
        pipe, settings = self.pipeline, self.settings
        frames = (settings.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        factor = pipe.vae_scale_factor_spatial
        return (pipe.num_channels_latents, frames, settings.height // factor, settings.width // factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        # Both streams padded to the pipeline's lengths under their masks, so that rows concatenate; `forward` trims.
        embeds, mask, embeds_2, mask_2 = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, dtype=self.denoiser.dtype, batch_size=len(prompts)
        )
        return PromptEmbeddings(
            {
                "encoder_hidden_states": embeds,
                "encoder_attention_mask": mask,
                "encoder_hidden_states_2": embeds_2,
                "encoder_attention_mask_2": mask_2,
            }
        )

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1], device=self.device)
        return scheduler.sigmas.detach().clone().float()

    @staticmethod
    def _trim(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the padding columns no row uses (at least one column stays: the transformer indexes by the mask)."""
        used = mask.bool().any(dim=0).nonzero()
        length = max(1, int(used.max()) + 1) if len(used) else 1
        return states[:, :length], mask[:, :length]

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        tensors = conditioning.tensors
        text, mask = self._trim(tensors["encoder_hidden_states"], tensors["encoder_attention_mask"])
        text_2, mask_2 = self._trim(tensors["encoder_hidden_states_2"], tensors["encoder_attention_mask_2"])
        latents = latents.to(dtype)
        condition, image_embeds = self._image_inputs(latents, conditioning, denoiser)
        # The pipeline casts the timestep to the denoiser's dtype: so do we, to sample as it does.
        timestep = (sigma * self.pipeline.scheduler.config.num_train_timesteps).to(dtype)
        return self.run_denoiser(
            denoiser,
            hidden_states=torch.cat([latents, condition], dim=1),
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),
            encoder_attention_mask=mask.to(dtype),
            encoder_hidden_states_2=text_2.to(dtype),
            encoder_attention_mask_2=mask_2.to(dtype),
            image_embeds=image_embeds,
            return_dict=False,
        )[0]

    def _image_inputs(
        self, latents: torch.Tensor, conditioning: PromptEmbeddings, denoiser: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The channels concatenated after the latents (condition latents, then the mask: `C + 1`) and the image
        states, in the denoiser's dtype. Text-to-video: zero channels, and all-zero image states, which the
        transformer masks out whatever their number (one token instead of the pipeline's 729)."""
        batch, channels, *grid = latents.shape
        condition = latents.new_zeros(batch, channels + 1, *grid)
        return condition, latents.new_zeros(batch, 1, denoiser.config.image_embed_dim)

    def lora_load_code(self, repo: str) -> str:
        weight_name = self.lora_weight_names["transformer"]
        return f'pipe.transformer.load_lora_adapter("{repo}", weight_name="{weight_name}", prefix="transformer")'

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[list[Image.Image]]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        # One video at a time: the VAE's causal attention mask does not broadcast over a batch (diffusers 0.42).
        video = torch.cat([vae.decode(one, return_dict=False)[0] for one in latents.split(1)])
        return self.pipeline.video_processor.postprocess_video(video, output_type="pil")
