"""The Hub side of a run: an early check that a push can work, and the model card that goes with the LoRA."""

from __future__ import annotations

import os
import shutil
from typing import Any

from . import metrics as names
from .losses import FORWARD_LOSS_TYPES

CITATIONS = """```bibtex
@article{wang2025grpoguard,
  title   = {GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping},
  author  = {Wang, Jing and Liang, Jiajun and Liu, Jie and Liu, Henglin and Liu, Gongye and Zheng, Jun and
             Pang, Wanyuan and Ma, Ao and Xie, Zhenyu and Wang, Xintao and Wang, Meng and Wan, Pengfei and
             Liang, Xiaodan},
  journal = {arXiv preprint arXiv:2510.22319},
  year    = {2025}
}
@article{liu2025flowgrpo,
  title   = {Flow-GRPO: Training Flow Matching Models via Online RL},
  author  = {Liu, Jie and others},
  journal = {arXiv preprint arXiv:2505.05470},
  year    = {2025}
}
@article{xue2025dancegrpo,
  title   = {DanceGRPO: Unleashing GRPO on Visual Generation},
  author  = {Xue, Zeyue and others},
  journal = {arXiv preprint arXiv:2505.07818},
  year    = {2025}
}
@inproceedings{zheng2026diffusionnft,
  title     = {DiffusionNFT: Online Diffusion Reinforcement with Forward Process},
  author    = {Zheng, Kaiwen and Chen, Huayu and Ye, Haotian and others},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  note      = {arXiv:2509.16117}
}
@article{xue2025awm,
  title   = {Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models},
  author  = {Xue, Shuchen and Ge, Chongjian and Zhang, Shilong and Li, Yichen and Ma, Zhi-Ming},
  journal = {arXiv preprint arXiv:2509.25050},
  year    = {2025}
}
@misc{vonwerra2022trl,
  title        = {TRL: Transformer Reinforcement Learning},
  author       = {von Werra, Leandro and others},
  howpublished = {\\url{https://github.com/huggingface/trl}},
  year         = {2020}
}
```"""

#: The card's settings every run shows, then those of each algorithm family.
_COMMON_CARD_FIELDS = (
    "epsilon",
    "beta",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "num_generations",
    "learning_rate",
    "max_steps",
    "height",
    "width",
    "timestep_fraction",
    "scale_rewards",
)
CARD_FIELDS = (
    "loss_type",
    *_COMMON_CARD_FIELDS,
    "noise_schedule",
    "noise_level",
    "init_same_noise",
    "dance_weighting",
)
FORWARD_CARD_FIELDS = ("loss_type", "nft_beta", "lagged_decay_schedule", "awm_weighting", *_COMMON_CARD_FIELDS)


def check_hub_setup(args: Any) -> None:
    """With `push_to_hub=True`, fail before any compute if no token can be found (never printing one)."""
    if not args.push_to_hub:
        return
    from huggingface_hub import get_token

    if not (args.hub_token or get_token()):
        raise ValueError(
            "push_to_hub=True but no Hugging Face token was found. Run `hf auth login`, set the HF_TOKEN environment "
            "variable, or pass hub_token; and set hub_model_id (for example 'your-name/sd35m-guard'), otherwise the "
            f"repository is named after output_dir ({os.path.basename(os.path.abspath(args.output_dir))!r})."
        )


def _last(log_history: list[dict], prefix: str) -> dict[str, float]:
    for entry in reversed(log_history):
        picked = {k: v for k, v in entry.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        if picked:
            return picked
    return {}


def write_model_card(trainer: Any, folder: str, base_model: str | None, pipeline_class: str) -> str:
    """Write `README.md` (and `images/samples.png` when an evaluation grid exists) into `folder`."""
    from huggingface_hub import ModelCard, ModelCardData

    args = trainer.args
    video = trainer.adapter.is_video
    task = "text-to-video" if video else "text-to-image"
    tags = [
        "trl",
        "trl-guard",
        "lora" if trainer.adapter.has_lora else "full-finetune",
        task,
        "diffusers",
        args.loss_type.replace("_", "-"),
    ]
    # The Hub validates `base_model` as a repo id: a local folder is named in the text only.
    on_hub = base_model is not None and not os.path.exists(base_model)
    data = ModelCardData(
        base_model=base_model if on_hub else None, library_name="diffusers", tags=tags, pipeline_tag=task
    )
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`"

    history = trainer.state.log_history
    proxy = {k: v for k, v in _last(history, names.REWARDS).items() if k.endswith("/mean")}
    evaluation = {
        **_last(history, names.EVAL_REWARD),
        **_last(history, names.EVAL_REWARDS),
        **_last(history, names.EVAL_GOLD),
    }
    metrics = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in {**proxy, **evaluation}.items()) or "| (none logged) | |"

    sample = ""
    grids = os.path.join(args.output_dir, "eval_images")
    pngs = sorted(f for f in os.listdir(grids) if f.endswith(".png")) if os.path.isdir(grids) else []
    if pngs:  # the newest grid (video runs also keep GIFs there)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        shutil.copyfile(os.path.join(grids, pngs[-1]), os.path.join(folder, "images", "samples.png"))
        sample = (
            "## Samples\n\nEvaluation prompts at the last evaluation, fixed seeds:\n\n![samples](images/samples.png)\n"
        )

    fields = FORWARD_CARD_FIELDS if args.loss_type in FORWARD_LOSS_TYPES else CARD_FIELDS
    fields = (*fields, "num_frames") if video else fields
    config = "\n".join(f"| `{name}` | `{getattr(args, name)}` |" for name in fields)
    rewards = ", ".join(
        f"`{n}` (weight {w:g})" for n, w in zip(trainer.rewards.names, trainer.rewards.weights.tolist())
    )
    gold = ", ".join(f"`{n}`" for n in trainer.gold_rewards.names) if trainer.gold_rewards is not None else "none"
    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    load = (
        trainer.adapter.lora_load_code(repo)
        if trainer.adapter.has_lora
        else f'# full fine-tune: load the transformer from the "transformer" subfolder of {repo}'
    )
    call = 'pipe("a photo of a cat holding a sign that says \\"hello\\"")'
    usage = f"video = {call}.frames[0]  # a list of PIL frames" if video else f"image = {call}.images[0]"
    content = f"""---
{data.to_yaml()}
---

# {repo}

{"A LoRA for" if trainer.adapter.has_lora else "A fine-tune of"} {base_link} \
trained with online RL (`loss_type={args.loss_type}`) by trl_guard's `GuardGRPODiffusionTrainer`, a TRL-style
trainer for flow-matching models.

## Usage

```python
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{base_model}", dtype=torch.bfloat16).to("cuda")
{load}
{usage}
```

## Training

Reward functions: {rewards}. Gold rewards (evaluated, never trained on): {gold}.
Trained for {trainer.state.global_step} optimizer steps.

| setting | value |
|---|---|
{config}

## Final metrics

| metric | value |
|---|---|
{metrics}

{sample}
## Citations

{CITATIONS}
"""
    path = os.path.join(folder, "README.md")
    ModelCard(content).save(path)
    return path
