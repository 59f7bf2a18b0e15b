"""The toy world's model: an SD3-architecture pipeline in pixel space that loads with `DiffusionPipeline`.

- `PixelSpaceAutoencoder` stands in for the VAE: latents are the pixels in [-1, 1] (scale factor 1), so the SD3
  pipeline, our adapter and the trainer run unchanged.
- `XPredictionSD3Transformer` is an `SD3Transformer2DModel` whose network predicts the clean image `x0`; its forward
  returns the velocity `(x_t - x0) / max(sigma, 0.05)`, so diffusers' scheduler and the RL trainer see an ordinary
  velocity model. Predicting `x0` is what made a small model draw crisp shapes in a CPU budget: with velocity
  prediction, the same model and time drew colour-correct blobs but not crisp shapes.

`model_index.json` records them under this module's path, `trl_guard.toy.model`, as `save_pretrained` does for
classes outside diffusers and transformers: diffusers takes them from that module once it is imported, which
`load_toy_pipeline` guarantees. They are not exported from the package root.
"""

from __future__ import annotations

import os

import torch
from diffusers import ConfigMixin, ModelMixin, SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import Transformer2DModelOutput

MIN_SIGMA = 0.05


class PixelSpaceAutoencoder(ModelMixin, ConfigMixin):
    """The identity "VAE": encode and decode are the identity on images in [-1, 1]."""

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),  # one entry: pipelines compute vae_scale_factor = 2 ** 0 = 1
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        # Gives the module a dtype and a weights file, which from_pretrained expects of every model.
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, sample: torch.Tensor, return_dict: bool = True):
        return sample

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs):
        return DecoderOutput(sample=z) if return_dict else (z,)


class XPredictionSD3Transformer(SD3Transformer2DModel):
    """Predicts `x0`, returns the velocity: `v = (x_t - x0) / max(sigma, MIN_SIGMA)`, with `sigma = timestep / 1000`."""

    def predict_clean(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs["return_dict"] = False
        return super().forward(hidden_states=hidden_states, timestep=timestep, **kwargs)[0]

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True, **kwargs):
        clean = self.predict_clean(hidden_states, timestep, **kwargs)
        sigma = (timestep.float() / 1000).clamp(min=MIN_SIGMA).view(-1, *([1] * (hidden_states.ndim - 1)))
        velocity = ((hidden_states.float() - clean.float()) / sigma).to(clean.dtype)
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)


PRETRAINED = os.path.join(os.path.dirname(__file__), "pretrained")


def load_toy_pipeline(path: str = PRETRAINED, **kwargs):
    """Load the toy pipeline with `DiffusionPipeline.from_pretrained`. Diffusers only builds classes from modules that
    are already imported (it will not import code a checkpoint names); importing this module is that step."""
    from diffusers import DiffusionPipeline

    from .._logging import quiet_known_noise

    with quiet_known_noise("toy_vae_slot"):  # the identity autoencoder sits in the VAE slot on purpose
        return DiffusionPipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, **kwargs)
