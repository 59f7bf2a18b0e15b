"""CLIP-based rewards: PickScore, CLIP score and the LAION aesthetic predictor, all transformers-native.

Each loads a `CLIPModel` and its processor with `from_pretrained` (a Hub id or a local folder, safetensors,
`trust_remote_code` off) once, on first call, on the device and dtype the trainer places it on.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import ModelReward

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"
# The published head, in the predictor's own repository (a PyTorch pickle of tensors, read with weights_only=True)
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x returned the tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbeddingReward(ModelReward):
    """A reward computed from the L2-normalised CLIP embeddings of each image and its prompt."""

    def __init__(
        self,
        model_name_or_path: str,
        processor_name_or_path: str | None = None,
        *,
        revision: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path or model_name_or_path
        self.revision = revision

    def _load(self) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(self.processor_name_or_path, revision=self.revision)
        self.model = CLIPModel.from_pretrained(
            self.model_name_or_path, revision=self.revision, dtype=self.dtype, use_safetensors=True
        )
        self.model.requires_grad_(False).eval()
        self._move()

    def _move(self) -> None:
        self.model.to(device=self.device, dtype=self.dtype)

    def embed_images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        features = _features(self.model.get_image_features(pixel_values=pixels)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = _features(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        ).float()
        return features / features.norm(dim=-1, keepdim=True)

    def cosine(self, prompts: list[str], images: list) -> torch.Tensor:
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(dim=-1)


class PickScoreReward(ClipEmbeddingReward):
    """PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on human preferences (Pick-a-Pic).

    Score = `logit_scale.exp() * cos(image, prompt)`, the raw PickScore (about 18-24 for typical images; Flow-GRPO
    trains on this divided by 26). Weights: `yuvalkirstain/PickScore_v1` (MIT), processor from
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.

    Example:
        ```python
        reward = PickScoreReward()  # or PickScoreReward("/path/to/PickScore_v1", "/path/to/processor")
        reward(prompts=["a cat"], images=[image])  # -> [21.7]
        ```
    """

    __name__ = "pickscore"

    def __init__(self, model_name_or_path: str | None = None, processor_name_or_path: str | None = None, **kwargs):
        # Defaults are read at call time, so `reward_funcs=["pickscore"]` follows a changed module default.
        super().__init__(
            model_name_or_path or PICKSCORE_MODEL, processor_name_or_path or PICKSCORE_PROCESSOR, **kwargs
        )

    def _score(self, prompts, images):
        return (self.model.logit_scale.exp().float() * self.cosine(prompts, images)).tolist()


class ClipScoreReward(ClipEmbeddingReward):
    """CLIP score (Hessel et al., 2021, in torchmetrics' form): `max(100 * cos(image, prompt), 0)`.

    Default weights `openai/clip-vit-large-patch14` (MIT); any CLIP checkpoint in transformers format works.

    Example:
        ```python
        reward = ClipScoreReward("openai/clip-vit-base-patch32")
        reward(prompts=["a cat"], images=[image])  # -> [31.2]
        ```
    """

    __name__ = "clip_score"

    def __init__(self, model_name_or_path: str | None = None, processor_name_or_path: str | None = None, **kwargs):
        super().__init__(model_name_or_path or CLIP_MODEL, processor_name_or_path, **kwargs)

    def _score(self, prompts, images):
        return (100 * self.cosine(prompts, images)).clamp(min=0).tolist()


class ImageSimilarityReward(ClipEmbeddingReward):
    """CLIP image similarity of each generated image to the row's source image: `cos(image, source)`, in [-1, 1].

    For editing models, it rewards edits that keep the rest of the picture, as Flow-GRPO's counting-edit task does
    (weight 0.5, with a GenEval count score). The source images are the dataset's `image` column, which the trainer
    passes as the `image` keyword argument. Default weights `openai/clip-vit-large-patch14` (MIT), as Flow-GRPO.

    Several sources per row (a list of images, as Qwen-Image-Edit-Plus edits them): by default the score is the mean
    of the similarities to each source, so an edit that combines them (the person of one image in the scene of
    another) is rewarded for keeping each, whatever their order; with one source it is that source's similarity.
    `sources="first"` compares with the first source only, for datasets whose first image is the one edited and the
    others only references (an object or a style to bring in).

    Args:
        model_name_or_path (`str`, *optional*): CLIP weights, a Hub id or a local folder.
        processor_name_or_path (`str`, *optional*): Its processor; defaults to `model_name_or_path`.
        sources (`str`, *optional*, defaults to `"mean"`): How a row's several sources are scored: `"mean"` or
            `"first"`.

    Example:
        ```python
        reward = ImageSimilarityReward("openai/clip-vit-large-patch14")
        reward(prompts=["add a cat"], images=[edited], image=[source])  # -> [0.93]
        reward(prompts=["put her in this room"], images=[edited], image=[[person, room]])  # mean of both -> [0.81]
        ```
    """

    __name__ = "image_similarity"
    SOURCE_REDUCTIONS = ("mean", "first")

    def __init__(
        self,
        model_name_or_path: str | None = None,
        processor_name_or_path: str | None = None,
        sources: str = "mean",
        **kwargs,
    ):
        super().__init__(model_name_or_path or CLIP_MODEL, processor_name_or_path, **kwargs)
        if sources not in self.SOURCE_REDUCTIONS:
            raise ValueError(f"sources={sources!r}: use one of {self.SOURCE_REDUCTIONS} (how several are scored).")
        self.sources = sources

    def __call__(self, prompts, images, image=None, **kwargs):
        if image is None or isinstance(image, str) or len(image) != len(images):
            raise ValueError(
                "image_similarity compares each generated image with its row's source image, passed as `image` (the "
                "dataset's 'image' column, one per sample). Train an editing model on a dataset with that column, "
                "or use a reward that does not need a source image."
            )
        return super().__call__(prompts, images, image=image, **kwargs)

    def _score(self, prompts, images, image):
        rows = [list(entry) if isinstance(entry, (list, tuple)) else [entry] for entry in image]
        if self.sources == "first":
            rows = [row[:1] for row in rows]
        if any(not row for row in rows):
            raise ValueError("image_similarity got a row with an empty list of source images: give each its sources.")
        # every source of the batch through CLIP at once, then each edit against its own row's sources
        sources = self.embed_images([source.convert("RGB") for row in rows for source in row])
        edits = self.embed_images(images)
        return [(own @ edit).mean().item() for own, edit in zip(sources.split([len(row) for row in rows]), edits)]


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP on normalised CLIP ViT-L/14 image embeddings (key names kept so
    the published state dict loads as is)."""

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def _fetch(location: str) -> str:
    """A local path for a file given as a path, an https URL (cached under ~/.cache/trl_guard) or a Hub file."""
    if os.path.exists(location):
        return location
    if location.startswith("https://"):
        import urllib.parse
        import urllib.request

        cache = os.path.join(os.path.expanduser("~"), ".cache", "trl_guard")
        path = os.path.join(cache, urllib.parse.unquote(location.rsplit("/", 1)[-1]))
        if not os.path.exists(path):
            os.makedirs(cache, exist_ok=True)
            urllib.request.urlretrieve(location, path + ".part")
            os.replace(path + ".part", path)  # a killed download never leaves a truncated file under the real name
        return path
    from huggingface_hub import hf_hub_download

    repo_id, _, filename = location.rpartition("/")
    return hf_hub_download(repo_id, filename)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a PyTorch pickle loaded with `weights_only=True` (tensors only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticReward(ClipEmbeddingReward):
    """LAION aesthetic predictor v2 (Schuhmann et al.): an MLP on CLIP ViT-L/14 image embeddings, about 1-10.

    `head` is a local `.safetensors` / `.pth` file, `"repo_id/filename"` on the Hub, or an https URL downloaded once
    to `~/.cache/trl_guard` (default: the published `sac+logos+ava1-l14-linearMSE.pth` from the predictor's
    repository). `.pth` files are read with `torch.load(weights_only=True)`. The prompt is unused.

    Example:
        ```python
        reward = AestheticReward()
        reward(prompts=["a cat"], images=[image])  # -> [5.9]
        ```
    """

    __name__ = "aesthetic"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        head: str | None = None,
        processor_name_or_path: str | None = None,
        **kwargs,
    ):
        super().__init__(model_name_or_path or CLIP_MODEL, processor_name_or_path, **kwargs)
        self.head_path = head or AESTHETIC_HEAD_URL

    def _load(self) -> None:
        super()._load()
        path = _fetch(self.head_path)
        self.head = AestheticHead(self.model.config.projection_dim)
        self.head.load_state_dict(load_state_dict(path))
        self.head.requires_grad_(False).eval()
        self._move()

    def _move(self) -> None:
        super()._move()
        if hasattr(self, "head"):
            self.head.to(device=self.device, dtype=torch.float32)

    def _score(self, prompts, images):
        return self.head(self.embed_images(images)).squeeze(-1).tolist()
