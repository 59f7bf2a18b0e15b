"""Wan image-to-video: Wan2.1 I2V (one transformer, a CLIP image encoder) and Wan2.2 I2V A14B (two experts).

`WanImageToVideoPipeline` conditions a Wan transformer on a first frame, each dataset row's `image` column (the name
`WanImageToVideoPipeline(image=...)` uses), in two ways that this adapter reproduces:

- the first frame, resized to `height` x `width`, followed by `num_frames - 1` black frames, goes through the VAE (the
  mode of its latent distribution, normalised per channel as the latents are); a mask of `vae_scale_factor_temporal`
  channels marks the first latent frame as given. Mask and latents, `(4 + C, F', H', W')`, are concatenated to the
  noisy latents on the channel axis at every step, so the transformer takes `2C + 4` input channels (36 for the
  published checkpoints) and predicts `C`;
- Wan2.1 I2V only (its transformer has an `image_dim`): the penultimate hidden states of a CLIP vision tower
  (`image_encoder`, ViT-H/14) on the first frame as the pipeline's `image_processor` prepares it, passed as
  `encoder_hidden_states_image` and attended to next to the text. Wan2.2 I2V has no image encoder.

Both are computed once per distinct image per round (`encode_conditions`, as the prompt embeddings are), travel in the
row's `PromptEmbeddings` (so training and a mid-round checkpoint reuse them), and are shared by CFG's two branches:
only the text is negated, as in the pipeline. Everything else (text, schedule, timestep, decoding) is Wan's
(`wan.py`), and Wan2.2's two experts, their boundary (`boundary_ratio`, 0.9 for Wan2.2-I2V-A14B) and
`guidance_scale_2` are `wan22.py`'s.

Refused: per-token timesteps (`expand_timesteps`, Wan2.2 TI2V-5B run through this pipeline), whose first latent frame
is the condition itself at timestep 0 rather than a concatenated channel block; the interface carries one noise level
per sample. The pipeline's optional `last_image` (first-and-last-frame models) is not a dataset column here.
"""

from __future__ import annotations

import html
import re
from typing import Any

import torch
from PIL import Image

from .base import PromptEmbeddings, register, rgb_image
from .wan import WanAdapter
from .wan22 import WAN22_LORA_TARGETS, Wan22Adapter

#: LoRA targets: self- and cross-attention projections and the feed-forward layers of every block, Flow-Factory's
#: `default_target_modules` of its Wan image-to-video adapter (src/flow_factory/models/wan/wan2_i2v.py in
#: X-GenGroup/Flow-Factory), the same list as Wan2.2 text-to-video's.
WAN_I2V_LORA_TARGETS = WAN22_LORA_TARGETS


def clean_prompt(text: str) -> str:
    """A prompt as Wan's pipelines clean it before tokenizing: mojibake fixed by ftfy when it is installed, HTML
    entities unescaped (twice), runs of whitespace collapsed to one space, stripped.

    `WanImageToVideoPipeline` calls ftfy whether or not it is installed (and fails without it), where `WanPipeline`
    skips it; the adapter cleans prompts itself, as `WanPipeline` does, so that training needs no ftfy. ftfy changes
    only broken Unicode, so ordinary prompts encode the same either way.

    Example:
        >>> clean_prompt("  a  cat &amp;amp;    a dog ")
        'a cat & a dog'
    """
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def check_image_to_video(pipeline: Any) -> None:
    """Refuse a `WanImageToVideoPipeline` this adapter cannot drive, saying why: per-token timesteps, a transformer
    whose input channels are not latents + mask + first-frame latents, or an image-conditioned transformer without
    its image encoder."""
    if pipeline.config.get("expand_timesteps", False):
        raise NotImplementedError(
            "This WanImageToVideoPipeline uses per-token timesteps (expand_timesteps: Wan2.2 TI2V-5B), which this "
            "adapter does not carry yet: train Wan2.1 I2V or Wan2.2 I2V A14B checkpoints."
        )
    transformer = pipeline.transformer if pipeline.transformer is not None else pipeline.transformer_2
    z_dim, mask = pipeline.vae.config.z_dim, pipeline.vae_scale_factor_temporal
    if transformer.config.in_channels != 2 * z_dim + mask:
        raise ValueError(
            f"The transformer takes {transformer.config.in_channels} input channels, but WanImageToVideoPipeline feeds "
            f"it {2 * z_dim + mask}: the latents ({z_dim}), the first-frame mask ({mask}) and the first frame's "
            f"latents ({z_dim}). Load an image-to-video checkpoint (a text-to-video transformer takes {z_dim})."
        )
    if getattr(pipeline.transformer, "config", None) is not None and pipeline.transformer.config.image_dim is not None:
        missing = [name for name in ("image_encoder", "image_processor") if getattr(pipeline, name, None) is None]
        if missing:
            raise ValueError(
                f"The transformer attends to CLIP image states (image_dim={pipeline.transformer.config.image_dim}, "
                f"Wan2.1 I2V) but the pipeline has no {' or '.join(missing)}: load the checkpoint's own (its "
                "image_encoder/ and image_processor/ folders)."
            )


class ImageToVideoMixin:
    """What `WanImageToVideoPipeline` adds to `WanAdapter` (or `Wan22Adapter`): the first-frame conditioning."""

    condition_columns = ("image",)
    default_lora_target_modules = WAN_I2V_LORA_TARGETS
    #: First frames through the VAE at once (each is encoded as a whole `num_frames` video), and through CLIP.
    vae_batch_size = 1
    clip_batch_size = 8

    def __init__(self, pipeline: Any):
        check_image_to_video(pipeline)
        super().__init__(pipeline)

    @property
    def uses_image_encoder(self) -> bool:
        """Whether the transformer attends to CLIP states of the first frame (Wan2.1 I2V): the pipeline's own test,
        on `transformer` only."""
        transformer = self.pipeline.transformer
        return transformer is not None and transformer.config.image_dim is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        # umT5 states cut at each prompt's length and zero-padded to max_sequence_length, as the pipeline's
        # `encode_prompt` computes them (the cross-attention has no mask: the padding is part of the conditioning),
        # with the prompts cleaned as `clean_prompt` says.
        pipe, length = self.pipeline, self.settings.max_sequence_length
        tokens = pipe.tokenizer(
            [clean_prompt(prompt) for prompt in prompts],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        encoder = pipe.text_encoder
        device = next(encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        states = encoder(tokens.input_ids.to(device), mask).last_hidden_state.to(self.device, encoder.dtype)
        kept = torch.arange(length, device=self.device)[None, :] < mask.gt(0).sum(dim=1).to(self.device)[:, None]
        return PromptEmbeddings({"encoder_hidden_states": torch.where(kept[..., None], states, 0.0)})

    def latent_shape(self) -> tuple[int, ...]:
        # The noisy latents alone: VAE channels, not the transformer's input channels (which add mask and condition).
        pipe, settings = self.pipeline, self.settings
        frames = (settings.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        factor = pipe.vae_scale_factor_spatial
        return (pipe.vae.config.z_dim, frames, settings.height // factor, settings.width // factor)

    @torch.no_grad()
    def encode_conditions(self, columns: dict[str, list]) -> PromptEmbeddings:
        images = [
            rgb_image(image, "Wan image-to-video starts each video from the image") for image in columns["image"]
        ]
        tensors = {
            "condition_latents": torch.cat(
                [
                    self._first_frame_condition(images[start : start + self.vae_batch_size])
                    for start in range(0, len(images), self.vae_batch_size)
                ]
            )
        }
        if self.uses_image_encoder:
            tensors["encoder_hidden_states_image"] = torch.cat(
                [
                    self._clip_states(images[start : start + self.clip_batch_size])
                    for start in range(0, len(images), self.clip_batch_size)
                ]
            )
        return PromptEmbeddings(tensors)

    def _first_frame_condition(self, images: list[Image.Image]) -> torch.Tensor:
        """`(B, T + C, F', H', W')` float32: the first-frame mask (T = the VAE's temporal factor channels, ones on the
        first latent frame) and the normalised VAE latents of the first frame followed by black frames."""
        pipe, settings = self.pipeline, self.settings
        vae = pipe.vae
        # preprocess resizes to the training resolution and maps to [-1, 1], as the pipeline's own call does
        first = pipe.video_processor.preprocess(images, height=settings.height, width=settings.width)
        first = first.to(self.device, torch.float32).unsqueeze(2)
        rest = first.new_zeros(first.shape[0], first.shape[1], settings.num_frames - 1, *first.shape[3:])
        video = torch.cat([first, rest], dim=2).to(vae.dtype)
        latents = vae.encode(video).latent_dist.mode().float()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape).to(latents.device)
        # multiply by 1/std, as the pipeline does, so that the condition is the same to the last bit
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape).to(latents.device)
        latents = (latents - mean) * inverse_std
        mask = latents.new_zeros(latents.shape[0], pipe.vae_scale_factor_temporal, *latents.shape[2:])
        mask[:, :, 0] = 1.0  # the first latent frame is given; the pipeline's mask over pixel frames, regrouped
        return torch.cat([mask, latents], dim=1)

    def _clip_states(self, images: list[Image.Image]) -> torch.Tensor:
        """The CLIP vision tower's penultimate hidden states of each image, as the pipeline's `encode_image`."""
        encoder = self.pipeline.image_encoder
        pixels = self.pipeline.image_processor(images=images, return_tensors="pt")["pixel_values"]
        states = encoder(pixel_values=pixels.to(self.device, encoder.dtype), output_hidden_states=True)
        return states.hidden_states[-2].float()

    def forward(self, denoiser, latents, sigma, conditioning):
        tensors = conditioning.tensors
        dtype = denoiser.dtype
        condition = tensors["condition_latents"].to(latents.device, latents.dtype)
        image_states = tensors.get("encoder_hidden_states_image")
        return self.run_denoiser(
            denoiser,
            hidden_states=torch.cat([latents, condition], dim=1).to(dtype),
            timestep=self._timestep(sigma),
            encoder_hidden_states=tensors["encoder_hidden_states"].to(dtype),
            encoder_hidden_states_image=None if image_states is None else image_states.to(dtype),
            return_dict=False,
        )[0]


@register
class WanI2VAdapter(ImageToVideoMixin, WanAdapter):
    """Wan2.1 image-to-video: one transformer, CLIP image states. Two-expert pipelines go to `Wan22I2VAdapter`."""

    pipeline_classes = ("WanImageToVideoPipeline",)

    @classmethod
    def check_experts(cls, pipeline: Any) -> None:
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            raise NotImplementedError(
                "This WanImageToVideoPipeline has two experts (transformer_2, boundary_ratio: Wan2.2 I2V A14B): "
                "get_adapter gives it Wan22I2VAdapter."
            )


@register
class Wan22I2VAdapter(ImageToVideoMixin, Wan22Adapter):
    """Wan2.2 image-to-video A14B: Wan2.2's two experts (`wan22.py`) on the first-frame conditioning. Both experts
    carry a LoRA by default; prefix targets with `transformer.` to train the high-noise expert alone, as Flow-Factory's
    Wan2.2 I2V recipe does (`split_lora_targets`)."""

    pipeline_classes = ("WanImageToVideoPipeline",)
