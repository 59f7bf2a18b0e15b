"""Qwen-Image 2.1 (text to image): a single-stream, block-causal DiT over one token per 16 x 16 pixels, Qwen3-VL text
conditioning, true CFG without rescaling, a 64-channel VAE of RGBA pixels.

What differs from Qwen-Image (qwenimage.py), and why the adapter does each thing:
- text and image share one sequence: the prompt's tokens, then one slot per 2 x 2 latent tokens of the image
  (`img_mask`). Text tokens advance the RoPE position on all three axes and the image sits after them, its height and
  width positions centred on zero. So padding a prompt is never exact: right padding moves the image along the frame
  axis, left padding moves the text against the image on the height and width axes. And every row of a call shares
  one layout (the transformer reads row 0's). `encode_prompts` still pads every prompt to `max_sequence_length`
  under a mask, so that embeddings concatenate (the prompt cache, CFG), and `forward` calls the denoiser once per
  distinct prompt length with the unpadded text: each row gets what `pipe(prompt)` computes for it alone, whatever
  else the batch holds (the pipeline itself pads a batch to its longest prompt, so its rows depend on their batch);
- the text is Qwen3-VL's last layer before its final norm, of the user's turn only (the pipeline's `encode_prompt`);
  the pipeline never truncates it, so a prompt longer than `max_sequence_length` is refused rather than cut;
- latents are not packed in 2 x 2 patches: `(H/16 * W/16, C)`, one token per latent pixel, H and W multiples of 32;
  the schedule's shift counts those tokens;
- the checkpoint may fix its own sigmas (`sample_sigmas` in model_index.json, as Qwen-Image-2.1-Turbo does): the
  pipeline then ignores `num_inference_steps`, and the adapter samples on them and refuses another step count;
- CFG is `true_cfg_scale` with a negative prompt, combined plainly (no norm rescaling as in Qwen-Image); 2.1 is meant
  to be sampled without it (`true_cfg_scale = 1`);
- the transformer takes `timestep = sigma`; its output spans the joint sequence, of which the last tokens are the
  image's velocity;
- the VAE decodes 4 channels: the images are RGBA, as `pipe(...)` returns them.

Condition images (2.1's editing) are not driven here: the adapter is text-to-image.
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import PackedLatentsMixin, PipelineAdapter, PromptEmbeddings, register, token_shifted_sigmas

#: The attention projections and the SwiGLU projections of every single-stream block: the per-block Linear layers
#: (those `QwenImage21Transformer2DModel._tp_plan` shards), the counterpart of Flow-GRPO's Qwen-Image set (attention
#: and MLPs of both streams). The shared modulation and the input and output projections stay frozen.
QWEN_IMAGE_21_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "img_mlp.proj",
    "img_mlp.gate_layer",
    "img_mlp.out",
]

#: Latent tokens per image slot of the joint sequence (`img_mask`): one slot stands for 2 x 2 latent tokens.
_TOKENS_PER_SLOT = 4


@register
class QwenImage21Adapter(PackedLatentsMixin, PipelineAdapter):
    family_name = "Qwen-Image 2.1"
    patch_reason = "x 2: each image slot of the joint sequence stands for 2 x 2 latent tokens"
    pipeline_classes = ("QwenImage21Pipeline",)
    default_lora_target_modules = QWEN_IMAGE_21_LORA_TARGETS

    @property
    def cfg_scale(self) -> float:
        return self.settings.true_cfg_scale

    @property
    def _image_tokens(self) -> int:
        """One token per latent pixel (2.1 does not pack 2 x 2 patches): what `latent_shape` and the shift count."""
        h, w = self._latent_hw
        return h * w

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The checkpoint's `sample_sigmas` when it sets them, else `linspace(1, 1/N, N)`, shifted by the scheduler
        with `mu` from the token count: what QwenImage21Pipeline does."""
        fixed = self.pipeline.config.get("sample_sigmas")
        if fixed is None:
            return super().sigmas(num_inference_steps)
        if len(fixed) != num_inference_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps}, but this checkpoint samples on its own {len(fixed)} "
                f"sigmas (`sample_sigmas` in its model_index.json; QwenImage21Pipeline then ignores "
                f"num_inference_steps). Set num_inference_steps to {len(fixed)}."
            )
        return token_shifted_sigmas(
            self.pipeline.scheduler, num_inference_steps, self._image_tokens, self.device, base_sigmas=fixed
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        length = self.settings.max_sequence_length
        prompt_embeds, mask, _ = self.pipeline.encode_prompt(prompt=list(prompts), device=self.device)
        batch, tokens, _ = prompt_embeds.shape
        if mask is None:  # the pipeline drops the mask when no prompt of the batch is padded
            mask = torch.ones(batch, tokens, dtype=torch.long, device=prompt_embeds.device)
        if tokens > length:
            longest = int(mask.sum(dim=1).argmax())
            raise ValueError(
                f"The prompt {prompts[longest]!r} is {tokens} text tokens long, more than max_sequence_length="
                f"{length}; QwenImage21Pipeline reads every prompt whole, so it is not cut. Set max_sequence_length "
                f"to {tokens} or more, or shorten the prompt."
            )
        padding = length - tokens
        return PromptEmbeddings(
            {
                "encoder_hidden_states": torch.nn.functional.pad(prompt_embeds, (0, 0, 0, padding)),
                "encoder_hidden_states_mask": torch.nn.functional.pad(mask.long(), (0, padding)),
            }
        )

    def _row_groups(self, lengths: list[int], denoiser: torch.nn.Module) -> list[tuple[int, list[int]]]:
        """The denoiser calls of one `forward`: (text length, rows) per distinct prompt length, in order of first
        appearance. Under FSDP2 every forward is a collective, and processes whose batches hold different numbers of
        distinct lengths would wait on each other: there, one call per row, as many as every process has rows."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(denoiser, FSDPModule):
            return [(length, [row]) for row, length in enumerate(lengths)]
        groups: dict[int, list[int]] = {}
        for row, length in enumerate(lengths):
            groups.setdefault(length, []).append(row)
        return list(groups.items())

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        text = conditioning.tensors["encoder_hidden_states"]
        lengths = conditioning.tensors["encoder_hidden_states_mask"].sum(dim=1).tolist()
        h, w = self._latent_hw
        # QwenImage21Pipeline hands the transformer t / 1000 with t = sigma * num_train_timesteps.
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps / 1000
        tokens = latents.shape[1]
        parts, order = [], []
        for length, rows in self._row_groups(lengths, denoiser):
            index = torch.tensor(rows, device=latents.device)
            # Text positions, then one slot per 2 x 2 latent tokens: the pipeline's `img_mask` for text to image.
            slots = torch.arange(length + tokens // _TOKENS_PER_SLOT, device=latents.device) >= length
            output = self.run_denoiser(
                denoiser,
                hidden_states=latents[index].to(dtype),
                timestep=timestep[index].to(dtype),
                encoder_hidden_states=text[index, :length].to(dtype),
                encoder_hidden_states_mask=None,  # unpadded: the pipeline passes no mask then
                img_shapes=[[(1, h, w)]] * len(rows),
                img_mask=slots.expand(len(rows), -1),
                return_dict=False,
            )[0]
            parts.append(output[:, -tokens:])
            order.extend(rows)
        if len(parts) == 1 and order == list(range(len(latents))):
            return parts[0]
        velocity = torch.cat(parts)
        return velocity[torch.argsort(torch.tensor(order, device=velocity.device))]

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) to tokens (B, h*w, C), one per latent pixel, row-major."""
        return latents.flatten(2).transpose(1, 2)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h*w, C) to the VAE's (B, C, 1, h, w): a plain spatial flatten undone."""
        h, w = self._latent_hw
        return latents.transpose(1, 2).reshape(len(latents), latents.shape[2], 1, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = self.unpack(latents).to(vae.dtype)
        stats = dict(device=latents.device, dtype=latents.dtype)
        mean = torch.tensor(vae.config.latents_mean, **stats).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, **stats).view(1, -1, 1, 1, 1)
        images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
