"""FLUX.2 [dev] (`Flux2Pipeline`) and FLUX.2 [klein] (`Flux2KleinPipeline`), text-to-image.

What differs from FLUX.1 (flux.py), and how the adapter follows the pipelines:
- text: one language model, Mistral3 (Mistral Small 3.x) for [dev] and Qwen3 for [klein]. The prompt goes through the
  model's chat template, is padded to `max_sequence_length`, and three hidden layers are stacked per token
  (`text_encoder_out_layers`: (10, 20, 30) for [dev], (9, 18, 27) for [klein]) into `(L, 3 x hidden)`. There is no
  pooled embedding. No text mask reaches the transformer: the padding tokens are attended to, so `max_sequence_length`
  is part of the conditioning (sample and train at the same length; the pipelines default to 512, and [dev]'s system
  message takes about 30 of those tokens). Every prompt's embedding has the same length, so any two concatenate.
  Loading FLUX.2-dev needs torchvision: its tokenizer is a `PixtralProcessor`;
- latents: the VAE's 32 channels are cut into 2x2 patches (128 channels), normalised by the VAE's batch-norm running
  statistics and flattened row-major into `(H/16 x W/16, 128)` tokens: the token layout of FLUX.1's packing
  (`PackedLatentsMixin.pack`), which `decode` undoes after the normalisation;
- position ids have four axes `(t, h, w, l)`: `(0, row, col, 0)` for image tokens, `(0, 0, 0, index)` for text;
- schedule: `linspace(1, 1/N, N)` shifted by `compute_empirical_mu(tokens, N)`, which depends on the number of steps
  too (the 8 training steps and the 28 evaluation steps of a recipe use different shifts, as the pipeline would);
- the transformer takes `t / 1000` with `t = sigma x 1000` in the model's dtype, and for [dev] (guidance-distilled,
  `transformer.config.guidance_embeds`) `guidance_scale` as a guidance embedding, with no CFG: `Flux2Pipeline` has no
  negative prompt, so `true_cfg_scale > 1` is refused;
- [klein] has no guidance embedding. Its `guidance_scale` is real CFG against the empty prompt (the trainer's
  `negative_prompt`, `""` by default; the pipeline always uses `""`) on the undistilled checkpoints
  (FLUX.2-klein-base-4B/9B). The step-distilled ones (FLUX.2-klein-4B/9B, `is_distilled` in their `model_index.json`)
  ignore `guidance_scale`, as `Flux2KleinPipeline` does, with a warning.

Out of scope: image editing with reference images (the pipelines' `image=` argument, whose tokens would join the
latents' on later `t` coordinates), prompt upsampling (`caption_upsample_temperature`), and the klein KV-cache and
inpainting pipelines. Only text-to-image is trained.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image

from .base import (
    ATTENTION_PROJECTIONS,
    PackedLatentsMixin,
    PipelineAdapter,
    PromptEmbeddings,
    SamplingSettings,
    register,
)

#: Flow-Factory's FLUX.2 and FLUX.2 [klein] LoRA targets (X-GenGroup/Flow-Factory at commit a0b2bc5,
#: src/flow_factory/models/flux/flux2.py and flux2_klein.py, `default_target_modules`): both streams' attention
#: projections and MLPs in the double-stream blocks, the fused QKV+MLP input projection of the single-stream blocks.
#: Flow-Factory also lists `attn.to_out.0` for the single-stream blocks, where the output projection is a plain
#: `attn.to_out` Linear, so it adapts none there; neither does this list. (diffusers'
#: examples/dreambooth/train_dreambooth_lora_flux2.py instead adapts the image stream's to_q/k/v/out.0 and, in the
#: single-stream blocks, to_qkv_mlp_proj and each block's to_out, named by index.)
FLUX2_LORA_TARGETS = [
    *ATTENTION_PROJECTIONS,
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
]


@register
class Flux2Adapter(PackedLatentsMixin, PipelineAdapter):
    family_name = "FLUX.2"
    pipeline_classes = ("Flux2Pipeline",)
    default_lora_target_modules = FLUX2_LORA_TARGETS
    context_parallel_splits_text = True
    #: The text encoder's hidden states stacked per token: the pipeline's default `text_encoder_out_layers`. Change it
    #: only together with the pipeline's own argument.
    text_encoder_out_layers: tuple[int, ...] = (10, 20, 30)

    def configure(self, settings: SamplingSettings) -> None:
        self._check_guidance(settings)
        super().configure(settings)

    def _check_guidance(self, settings: SamplingSettings) -> None:
        """Refuse guidance settings the pipeline has no counterpart for, before any compute."""
        if settings.true_cfg_scale > 1:
            raise ValueError(
                f"true_cfg_scale={settings.true_cfg_scale}, but Flux2Pipeline has no real classifier-free guidance: "
                "FLUX.2 [dev] is guidance-distilled and takes guidance_scale (for example 4.0) in its guidance "
                "embedding. Leave true_cfg_scale at 1."
            )

    @property
    def cfg_scale(self) -> float:
        return 1.0  # guidance_scale feeds the guidance embedding

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            max_sequence_length=self.settings.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return PromptEmbeddings({"encoder_hidden_states": prompt_embeds})

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """`linspace(1, 1/N, N)` shifted by FLUX.2's empirical `mu`, a function of the image's token count and of N."""
        mu = compute_empirical_mu(image_seq_len=self.latent_shape()[0], num_steps=num_inference_steps)
        scheduler = self.pipeline.scheduler
        base_sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=base_sigmas, device=self.device, mu=mu)
        return scheduler.sigmas.detach().clone().float()

    def _image_ids(self) -> torch.Tensor:
        """`(0, row, col, 0)` for each latent token, row-major: the pipeline's `_prepare_latent_ids`."""
        h, w = self._latent_hw
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        zeros = torch.zeros_like(rows)
        return torch.stack([zeros, rows, cols, zeros], dim=-1).reshape(-1, 4).to(self.device)

    def _text_ids(self, length: int) -> torch.Tensor:
        """`(0, 0, 0, index)` for each text token: the pipeline's `_prepare_text_ids`."""
        ids = torch.zeros(length, 4, dtype=torch.long, device=self.device)
        ids[:, 3] = torch.arange(length, device=self.device)
        return ids

    def _guidance(self, denoiser: torch.nn.Module, sigma: torch.Tensor) -> torch.Tensor | None:
        if not denoiser.config.guidance_embeds:
            return None
        return torch.full_like(sigma, self.settings.guidance_scale, dtype=torch.float32)

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        text = conditioning.tensors["encoder_hidden_states"]
        # The pipelines hand over t / 1000 with t = sigma * num_train_timesteps cast to the latents' dtype first.
        timestep = (sigma * self.pipeline.scheduler.config.num_train_timesteps).to(dtype) / 1000
        return self.run_denoiser(
            denoiser,
            hidden_states=latents.to(dtype),
            encoder_hidden_states=text.to(dtype),
            timestep=timestep,
            img_ids=self._image_ids(),
            txt_ids=self._text_ids(text.shape[1]),
            guidance=self._guidance(denoiser, sigma),
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        # Each token's 4C channels are one 2x2 patch's, as the VAE's batch norm saw them: un-normalise them per
        # channel, then `unpack` them to the (B, C, h, w) latents, the pipeline's unpatchify of its token grid.
        mean = vae.bn.running_mean.float()
        std = torch.sqrt(vae.bn.running_var.float() + vae.config.batch_norm_eps)
        grid = self.unpack(latents.float() * std + mean)
        images = vae.decode(grid.to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")


@register
class Flux2KleinAdapter(Flux2Adapter):
    family_name = "FLUX.2 [klein]"
    pipeline_classes = ("Flux2KleinPipeline",)
    text_encoder_out_layers = (9, 18, 27)

    @property
    def is_distilled(self) -> bool:
        """Whether the checkpoint is step-distilled (FLUX.2-klein-4B/9B), which has no CFG."""
        return bool(self.pipeline.config.get("is_distilled", False))

    def _check_guidance(self, settings: SamplingSettings) -> None:
        if settings.true_cfg_scale > 1:
            raise ValueError(
                f"true_cfg_scale={settings.true_cfg_scale}, but Flux2KleinPipeline's classifier-free guidance is "
                "guidance_scale (against the empty negative prompt). Set guidance_scale instead and leave "
                "true_cfg_scale at 1."
            )
        if self.is_distilled and settings.guidance_scale > 1:
            warnings.warn(
                f"guidance_scale={settings.guidance_scale} is ignored: this FLUX.2 [klein] checkpoint is "
                "step-distilled (is_distilled), which Flux2KleinPipeline samples without CFG. Set guidance_scale to "
                "1.0, or train an undistilled [klein] base checkpoint to use CFG.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def cfg_scale(self) -> float:
        return 1.0 if self.is_distilled else self.settings.guidance_scale

    def _guidance(self, denoiser: torch.nn.Module, sigma: torch.Tensor) -> None:
        return None  # Flux2KleinPipeline passes no guidance embedding: guidance_scale is CFG
