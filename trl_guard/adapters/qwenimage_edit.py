"""Qwen-Image-Edit (2509/2511 "Plus", several source images; and the first, one-image edit model): Qwen-Image that
edits the source images of each row given an instruction.

What differs from Qwen-Image (`qwenimage.py`), and why the adapter does each thing:
- each dataset row carries its source image, or a list of them for the Plus pipeline, in the `image` column (the name
  the pipelines' `image=` uses). Each source is resized to `height` x `width` (Flow-GRPO resizes Kontext's sources to
  the training resolution; Flow-Factory fits them into the training area); the pipeline's own call instead takes
  them at a 1024 x 1024 area. The VAE encodes them (the latent distribution's mode, normalised per channel) and their
  packed tokens follow the noisy latents, each source on its own grid in `img_shapes`; only the latents' velocity is
  kept. Every row of a dataset needs the same number of sources, so that rows batch;
- the text conditioning reads the sources too: Qwen2.5-VL encodes the instruction after the sources themselves
  (through its vision tower; the Plus pipeline shows them at a 384 x 384 area, the first edit pipeline at the
  training size), and the negative prompt of true CFG with the same sources. So the text embeddings belong to a
  (prompt, sources) pair, not to a prompt. The trainer encodes prompts and sources separately (`encode_prompts`,
  `encode_conditions`), so the adapter keeps each prompt's token ids and each row's condition images, and `forward`
  runs the pipeline's own `encode_prompt` on each distinct pair the first time it meets it, keeping the result in a
  bounded cache (`text_cache_size` pairs): the text encoder runs once per distinct (prompt, sources) pair as long as
  a round's pairs fit in the cache, as it does for a prompt in other families. The encoding is a pure function of its
  inputs, so a resumed run (whose cache starts empty) computes the same embeddings;
- true CFG and its norm rescaling are Qwen-Image's (`true_cfg_scale` with `negative_prompt`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict

import numpy as np
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image

from .base import PromptEmbeddings, register, round_up
from .qwenimage import QWEN_IMAGE_LORA_TARGETS, QwenImageAdapter


@register
class QwenImageEditAdapter(QwenImageAdapter):
    family_name = "Qwen-Image-Edit"
    pipeline_classes = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")
    #: Attention and MLPs of both streams: Flow-Factory's default Qwen-Image-Edit-Plus LoRA targets
    #: (src/flow_factory/models/qwen_image/qwen_image_edit_plus.py, `default_target_modules`), Flow-GRPO's Qwen-Image set.
    default_lora_target_modules = QWEN_IMAGE_LORA_TARGETS
    condition_columns = ("image",)
    #: Source images through the VAE at once, at most.
    encode_batch_size = 8
    #: (prompt, sources) text embeddings kept between denoiser calls; a round's distinct pairs should fit.
    text_cache_size = 512

    def __init__(self, pipeline):
        super().__init__(pipeline)
        self._text_cache: OrderedDict[tuple[bytes, bytes], torch.Tensor] = OrderedDict()

    @property
    def _plus(self) -> bool:
        """Whether the pipeline takes several sources (Plus), each shown to the text encoder at a 384 x 384 area."""
        return type(self.pipeline).__name__ == "QwenImageEditPlusPipeline"

    # ---- prompts and sources ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        """Each prompt's token ids, padded to `max_sequence_length` (longer prompts are cut there): the text encoder
        runs in `forward`, once it knows the row's sources."""
        tokens = self.pipeline.tokenizer(
            prompts,
            max_length=self.settings.max_sequence_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return PromptEmbeddings(
            {"prompt_ids": tokens.input_ids.to(self.device), "prompt_mask": tokens.attention_mask.to(self.device)}
        )

    @torch.no_grad()
    def encode_conditions(self, columns: dict[str, list]) -> PromptEmbeddings:
        rows = [self._sources(entry) for entry in columns["image"]]
        counts = sorted({len(sources) for sources in rows})
        if len(counts) > 1:
            raise ValueError(
                f"The rows' `image` entries hold {' and '.join(map(str, counts))} source images: every row needs the "
                "same number, so that rows batch. Split the dataset by the number of sources."
            )
        if not self._plus and counts != [1]:
            raise ValueError(
                f"QwenImageEditPipeline edits one source image per row, and the rows hold {counts[0]}: give one "
                "image per row, or use QwenImageEditPlusPipeline (Qwen/Qwen-Image-Edit-2509 or -2511)."
            )
        latents = torch.cat([self._vae_tokens([sources[k] for sources in rows]) for k in range(counts[0])], dim=1)
        views = torch.stack([torch.stack([self._text_view(s) for s in sources]) for sources in rows])
        keys = torch.tensor([self._digest(sources) for sources in rows], dtype=torch.int64)
        return PromptEmbeddings(
            {"image_latents": latents, "condition_pixels": views.to(self.device), "source_key": keys.to(self.device)}
        )

    def _sources(self, entry) -> list[Image.Image]:
        """A row's sources, RGB at the training resolution."""
        images = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(
                    f"{self.family_name} edits the image(s) in each row's `image` column, which holds a "
                    f"{type(image).__name__}. Give PIL images (or lists of them): a datasets.Image() column, or cast "
                    "a column of file paths with `dataset.cast_column('image', datasets.Image())`."
                )
        size = (self.settings.width, self.settings.height)
        return [image.convert("RGB").resize(size, Image.LANCZOS) for image in images]

    def _vae_tokens(self, images: list[Image.Image]) -> torch.Tensor:
        """Packed, normalised VAE latents of one source per row: (rows, tokens, 4 C), as the pipelines encode them."""
        vae = self.pipeline.vae
        parts = []
        for start in range(0, len(images), self.encode_batch_size):
            pixels = self.pipeline.image_processor.preprocess(
                images[start : start + self.encode_batch_size], self.settings.height, self.settings.width
            )
            latents = vae.encode(pixels.unsqueeze(2).to(self.device, vae.dtype)).latent_dist.mode()
            stats = dict(device=latents.device, dtype=latents.dtype)
            mean = torch.tensor(vae.config.latents_mean, **stats).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std, **stats).view(1, -1, 1, 1, 1)
            parts.append(self.pack(((latents - mean) / std)[:, :, 0]).float())
        return torch.cat(parts)

    def _text_view(self, image: Image.Image) -> torch.Tensor:
        """The picture of a source the text encoder sees, as uint8 pixels: resized to a 384 x 384 area by the Plus
        pipeline (`CONDITION_IMAGE_SIZE`), the source itself for the first edit pipeline."""
        if self._plus:
            width, height = pipeline_qwenimage_edit_plus.calculate_dimensions(
                pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE, image.width / image.height
            )
            image = self.pipeline.image_processor.resize(image, height, width)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())

    @staticmethod
    def _digest(images: list[Image.Image]) -> list[int]:
        digest = hashlib.blake2b(b"".join(image.tobytes() for image in images), digest_size=16).digest()
        return [int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True)]

    # ---- text with sources --------------------------------------------------------------------------------------
    def _text_states(self, conditioning: PromptEmbeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's Qwen2.5-VL embeddings of its prompt read after its sources, padded to the longest row under a
        mask: from the cache, or through the pipeline's own `encode_prompt`."""
        tensors = conditioning.tensors
        keys, missing = [], {}
        for ids, keep, pixels, key in zip(
            tensors["prompt_ids"], tensors["prompt_mask"].bool(), tensors["condition_pixels"], tensors["source_key"]
        ):
            ids = ids[keep]
            keys.append((ids.cpu().numpy().tobytes(), key.cpu().numpy().tobytes()))
            if keys[-1] not in self._text_cache:
                missing[keys[-1]] = (ids, pixels)
        if missing:
            with self._text_encoder_on_device():  # once for all the pairs this call meets first
                for cache_key, (ids, pixels) in missing.items():
                    self._text_cache[cache_key] = self._encode_pair(ids, pixels)
        rows = []
        for cache_key in keys:
            self._text_cache.move_to_end(cache_key)
            rows.append(self._text_cache[cache_key])
        while len(self._text_cache) > max(self.text_cache_size, len(keys)):
            self._text_cache.popitem(last=False)
        length = max(len(row) for row in rows)
        length = round_up(length, self.settings.sequence_multiple)  # context parallelism splits the text tokens
        text = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, length - len(row))) for row in rows])
        mask = torch.stack([(torch.arange(length, device=text.device) < len(row)).long() for row in rows])
        return text, mask

    @torch.no_grad()
    def _encode_pair(self, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """QwenImageEdit(Plus)Pipeline.encode_prompt of one prompt (its ids decoded back: byte-level BPE round-trips)
        with its sources' text-encoder pictures."""
        prompt = self.pipeline.tokenizer.decode(ids.tolist())
        images = [Image.fromarray(picture.cpu().numpy()) for picture in pixels]
        embeds, _ = self.pipeline.encode_prompt(
            prompt=[prompt], image=images if self._plus else images[0], device=self.device
        )
        return embeds[0]

    @contextlib.contextmanager
    def _text_encoder_on_device(self):
        """The text encoder on the denoiser's device for the block (with `offload_frozen_modules` it waits on the CPU
        between uses)."""
        encoder = self.pipeline.text_encoder
        home = encoder.device
        encoder.to(self.device)
        try:
            yield
        finally:
            encoder.to(home)

    # ---- denoiser -----------------------------------------------------------------------------------------------
    def forward(self, denoiser, latents, sigma, conditioning):
        dtype = denoiser.dtype
        text, text_mask = self._text_states(conditioning)
        sources = conditioning.tensors["condition_pixels"].shape[1]
        h, w = self._latent_hw
        tokens = torch.cat([latents, conditioning.tensors["image_latents"].to(latents.dtype)], dim=1)
        # QwenImageEdit(Plus)Pipeline hands the transformer t / 1000 with t = sigma * num_train_timesteps.
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps / 1000
        velocity = self.run_denoiser(
            denoiser,
            hidden_states=tokens.to(dtype),
            timestep=timestep.to(dtype),
            encoder_hidden_states=text.to(dtype),
            # the pipelines drop an all-ones mask; keeping it would take another attention path
            encoder_hidden_states_mask=None if text_mask.all() else text_mask,
            img_shapes=[[(1, h // 2, w // 2)] * (1 + sources)] * len(latents),
            return_dict=False,
        )[0]
        return velocity[:, : latents.shape[1]]
