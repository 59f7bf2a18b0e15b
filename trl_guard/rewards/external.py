"""ImageReward and HPSv2, the GRPO-Guard paper's gold scores, through their official packages (optional extras).

Both upstream packages pull `torchvision` (and HPSv2 `open_clip_torch`), which on a machine without a matching
torch wheel downloads a multi-GB CUDA build, so they are kept out of the core install: `pip install
"trl-guard[image_reward]"` / `pip install "trl-guard[hpsv2]"`. Their checkpoints are not in transformers format, and
converting them is not implemented yet.
"""

from __future__ import annotations

from .base import ModelReward, require


class ImageRewardReward(ModelReward):
    """ImageReward (Xu et al., 2023): a BLIP-based human-preference reward, about -2 to 2.

    Loads `ImageReward-v1.0` (Apache-2.0) with the `image-reward` package's `ImageReward.load`.

    Example:
        ```python
        reward = ImageRewardReward()  # pip install "trl-guard[image_reward]"
        reward(prompts=["a cat"], images=[image])  # -> [0.42]
        ```
    """

    __name__ = "image_reward"

    def __init__(self, model_name: str = "ImageReward-v1.0", **kwargs):
        super().__init__(**kwargs)
        self.model_name = model_name

    def _load(self) -> None:
        require("ImageReward", "image_reward", "The image_reward reward")
        import ImageReward

        self.model = ImageReward.load(self.model_name, device=str(self.device))
        self.model.requires_grad_(False).eval()

    def _move(self) -> None:
        self.model.to(self.device)

    def _score(self, prompts, images):
        return [float(self.model.score(prompt, image)) for prompt, image in zip(prompts, images)]


class HPSv2Reward(ModelReward):
    """HPSv2 / HPSv2.1 (Wu et al., 2023): an OpenCLIP ViT-H/14 fine-tuned on human preferences, about 0.2-0.35.

    Uses the `hpsv2` package's `hpsv2.score` (weights Apache-2.0, fetched by the package on first use).

    Example:
        ```python
        reward = HPSv2Reward(version="v2.1")  # pip install "trl-guard[hpsv2]"
        reward(prompts=["a cat"], images=[image])  # -> [0.28]
        ```
    """

    __name__ = "hpsv2"

    def __init__(self, version: str = "v2.1", **kwargs):
        super().__init__(**kwargs)
        self.version = version

    def _load(self) -> None:
        require("hpsv2", "hpsv2", "The hpsv2 reward")
        import hpsv2

        self.hpsv2 = hpsv2

    def _score(self, prompts, images):
        return [
            float(self.hpsv2.score([image], prompt, hps_version=self.version)[0])
            for prompt, image in zip(prompts, images)
        ]
