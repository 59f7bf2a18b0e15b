"""HunyuanVideo 1.5 image-to-video: `HunyuanVideo15ImageToVideoPipeline`, the text-to-video adapter
(`hunyuanvideo15.py`) with each dataset row's `image` column (the name the pipeline's `image=` argument uses) as the
first frame.

The transformer is the same class as text-to-video's (65 input channels at 480p for both); the image fills what
text-to-video leaves zero, as the pipeline does:

- the first frame alone (one frame, not a video as Wan pads it) goes through the VAE (the mode of its latents, times
  the VAE's `scaling_factor`); those latents are the first latent frame of the condition channels, the later latent
  frames are zero, and one mask channel is 1 on the first latent frame. Latents, condition and mask, `2C + 1`
  channels, are the transformer's input at every step;
- the last hidden states of the SigLIP vision tower (`image_encoder`, 729 tokens of 1152 at 384 px for the published
  checkpoints) on the first frame as the pipeline's `feature_extractor` prepares it, passed as `image_embeds`: the
  transformer attends to them next to the text.

Both are computed once per distinct image per round (`encode_conditions`, as the prompt embeddings are), travel in the
row's `PromptEmbeddings` (so training and a mid-round checkpoint reuse them), and are shared by CFG's two branches:
only the text is negated, as in the pipeline. Only the first frame's latents are stored; `_image_inputs` adds the
zero frames and the mask at each call.

Resolution: the pipeline picks its own size from the image's aspect ratio (the bucket of the transformer's
`target_size` nearest to it) and fits the image to it by resizing and centre-cropping. Training needs one size for
every row, so the adapter fits every first frame to `height` x `width` the same way (the video processor's
`resize(..., resize_mode="crop")`): at the bucket's size, this is what the pipeline samples.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .base import PromptEmbeddings, register, rgb_image
from .hunyuanvideo15 import HunyuanVideo15Adapter


def check_image_to_video(pipeline: Any) -> None:
    """Refuse a `HunyuanVideo15ImageToVideoPipeline` without its SigLIP encoder or its processor, or whose transformer
    does not take the latents, the condition latents and the mask."""
    missing = [name for name in ("image_encoder", "feature_extractor") if getattr(pipeline, name, None) is None]
    if missing:
        raise ValueError(
            f"This HunyuanVideo15ImageToVideoPipeline has no {' or '.join(missing)}: the transformer attends to SigLIP "
            "states of the first frame. Load the checkpoint's own (its image_encoder/ and feature_extractor/ folders)."
        )
    channels = pipeline.vae.config.latent_channels
    if pipeline.transformer.config.in_channels != 2 * channels + 1:
        raise ValueError(
            f"The transformer takes {pipeline.transformer.config.in_channels} input channels, but "
            f"HunyuanVideo15ImageToVideoPipeline feeds it {2 * channels + 1}: the latents ({channels}), the first "
            f"frame's latents ({channels}) and a mask (1). Load a HunyuanVideo 1.5 checkpoint with its own VAE."
        )


@register
class HunyuanVideo15I2VAdapter(HunyuanVideo15Adapter):
    """HunyuanVideo 1.5 image-to-video: the text-to-video adapter plus each row's first frame."""

    pipeline_classes = ("HunyuanVideo15ImageToVideoPipeline",)
    condition_columns = ("image",)
    #: First frames through the VAE at once (its causal attention mask takes one video at a time), and through SigLIP.
    vae_batch_size = 1
    image_encoder_batch_size = 8

    def __init__(self, pipeline: Any):
        check_image_to_video(pipeline)
        super().__init__(pipeline)

    def _first_frame(self, image: Any) -> Image.Image:
        """`image` fitted to the training size as the pipeline fits it to its own: resized to cover, centre-cropped."""
        image = rgb_image(image, "HunyuanVideo 1.5 image-to-video starts each video from the image")
        settings = self.settings
        return self.pipeline.video_processor.resize(
            image, height=settings.height, width=settings.width, resize_mode="crop"
        )

    @torch.no_grad()
    def encode_conditions(self, columns: dict[str, list]) -> PromptEmbeddings:
        images = [self._first_frame(image) for image in columns["image"]]
        latents = [
            self._first_frame_latents(images[i : i + self.vae_batch_size])
            for i in range(0, len(images), self.vae_batch_size)
        ]
        states = [
            self._image_states(images[i : i + self.image_encoder_batch_size])
            for i in range(0, len(images), self.image_encoder_batch_size)
        ]
        return PromptEmbeddings({"first_frame_latents": torch.cat(latents), "image_embeds": torch.cat(states)})

    def _first_frame_latents(self, images: list[Image.Image]) -> torch.Tensor:
        """`(B, C, 1, H', W')` float32: the VAE latents of each first frame as one-frame videos, scaled."""
        pipe, settings = self.pipeline, self.settings
        vae = pipe.vae
        pixels = pipe.video_processor.preprocess(images, height=settings.height, width=settings.width)
        pixels = pixels.to(self.device, vae.dtype).unsqueeze(2)
        # scaled in the VAE's dtype, as the pipeline does, so that the condition is the same to the last bit
        return (vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor).float()

    def _image_states(self, images: list[Image.Image]) -> torch.Tensor:
        """`(B, N, D)` float32: the SigLIP vision tower's last hidden states of each first frame."""
        encoder = self.pipeline.image_encoder
        inputs = self.pipeline.feature_extractor(
            images=images, do_resize=True, do_convert_rgb=True, return_tensors="pt"
        )
        pixels = inputs["pixel_values"].to(self.device, next(encoder.parameters()).dtype)
        return encoder(pixel_values=pixels).last_hidden_state.float()

    def _image_inputs(
        self, latents: torch.Tensor, conditioning: PromptEmbeddings, denoiser: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = conditioning.tensors
        first = tensors["first_frame_latents"].to(latents.device, latents.dtype)
        batch, _, frames, *grid = latents.shape
        later = first.new_zeros(batch, first.shape[1], frames - 1, *grid)
        mask = first.new_zeros(batch, 1, frames, *grid)
        mask[:, :, 0] = 1.0  # the first latent frame is given
        condition = torch.cat([torch.cat([first, later], dim=2), mask], dim=1)
        return condition, tensors["image_embeds"].to(latents.device, denoiser.dtype)
