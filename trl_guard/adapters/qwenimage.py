"""Qwen-Image: a 60-layer MMDiT over packed 2x2 latent patches, Qwen2.5-VL text conditioning with a padding mask,
true CFG with a norm-rescaled combination, a causal 3-D VAE with per-channel latent statistics.

What differs from FLUX (flux.py), and why the adapter does each thing:
- the text conditioning is the Qwen2.5-VL hidden states of the user's prompt (the pipeline's chat template drops
  its system prefix), one row per token and a different length per prompt. `encode_prompts` pads every prompt to
  `max_sequence_length` with a zero attention mask, so that any two embeddings concatenate (the prompt cache, the
  negative prompt next to the batch in CFG). Padding is exact, not an approximation: masked tokens are never
  attended to and the text RoPE positions of the real tokens do not move. `forward` trims the columns no row uses,
  so the padding costs no attention;
- CFG is `QwenImagePipeline`'s: `true_cfg_scale` with a negative prompt, and the guided velocity rescaled, token by
  token, to the norm of the conditional one (`combine_guidance` below). There is no guidance embedding, so
  `guidance_scale` is unused;
- the transformer takes `timestep = sigma` and the latent grid of each image (`img_shapes`) for its RoPE;
- the VAE decodes 5-D `(B, C, 1, H, W)` latents normalised per channel (`latents_mean`, `latents_std`).
"""

from __future__ import annotations

import torch
from PIL import Image

from .base import ATTENTION_PROJECTIONS, PackedLatentsMixin, PipelineAdapter, PromptEmbeddings, register, round_up

#: The attention projections of both streams and both streams' MLPs: the layers Flow-GRPO's Qwen-Image script
#: (scripts/train_qwenimage.py) adapts with LoRA.
QWEN_IMAGE_LORA_TARGETS = [
    *ATTENTION_PROJECTIONS,
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]


@register
class QwenImageAdapter(PackedLatentsMixin, PipelineAdapter):
    family_name = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    default_lora_target_modules = QWEN_IMAGE_LORA_TARGETS
    max_sequence_length_limit = 1024  # QwenImagePipeline.check_inputs (and the edit pipelines')
    context_parallel_splits_text = True

    @property
    def cfg_scale(self) -> float:
        return self.settings.true_cfg_scale

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        length = self.settings.max_sequence_length
        prompt_embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=length
        )
        batch, tokens, _ = prompt_embeds.shape
        if mask is None:  # the pipeline drops the mask when no prompt of the batch is padded
            mask = torch.ones(batch, tokens, dtype=torch.long, device=prompt_embeds.device)
        padding = length - tokens
        return PromptEmbeddings(
            {
                "encoder_hidden_states": torch.nn.functional.pad(prompt_embeds, (0, 0, 0, padding)),
                "encoder_hidden_states_mask": torch.nn.functional.pad(mask, (0, padding)),
            }
        )

    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        text_mask = conditioning.tensors["encoder_hidden_states_mask"]
        # Drop the padding columns that no row of this batch uses: the output is the same, the attention shorter.
        # Under context parallelism the length stays a multiple of the degree, which splits the text tokens too.
        used_columns = text_mask.any(dim=0).nonzero()
        used = int(used_columns[-1]) + 1 if len(used_columns) else text_mask.shape[1]
        used = round_up(used, self.settings.sequence_multiple)  # max_sequence_length is a multiple (check_settings)
        h, w = self._latent_hw
        # QwenImagePipeline hands the transformer t / 1000 with t = sigma * num_train_timesteps.
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps / 1000
        return self.run_denoiser(
            denoiser,
            hidden_states=latents.to(dtype),
            timestep=timestep.to(dtype),
            encoder_hidden_states=conditioning.tensors["encoder_hidden_states"][:, :used].to(dtype),
            encoder_hidden_states_mask=text_mask[:, :used],
            img_shapes=[[(1, h // 2, w // 2)]] * len(latents),
            return_dict=False,
        )[0]

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """QwenImagePipeline's combination: after `uncond + s (cond - uncond)`, each token's velocity is rescaled to
        the norm of the conditional one. The base class's plain combination would make the adapter sample a different
        model than `pipe(...)` as soon as `true_cfg_scale > 1`."""
        guided = super().combine_guidance(uncond, cond, sigma)
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = self.unpack(latents).unsqueeze(2).to(vae.dtype)  # one frame of a causal video VAE
        stats = dict(device=latents.device, dtype=latents.dtype)
        mean = torch.tensor(vae.config.latents_mean, **stats).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, **stats).view(1, -1, 1, 1, 1)
        images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
