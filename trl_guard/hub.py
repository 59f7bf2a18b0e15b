"""The Hub side of a run: an early check that a push can work, and the model card that goes with the LoRA."""

from __future__ import annotations

import os
import shutil
from typing import Any

from . import metrics as names
from .algorithms import algorithm_class

#: Cited by every card, after the run's algorithm family's papers (`Algorithm.citation`).
TRL_CITATION = """@misc{vonwerra2022trl,
  title        = {TRL: Transformer Reinforcement Learning},
  author       = {von Werra, Leandro and others},
  howpublished = {\\url{https://github.com/huggingface/trl}},
  year         = {2020}
}"""


def citations(loss_type: str) -> str:
    """The card's citations: the papers of the family that implements ``loss_type``, then TRL."""
    entries = [algorithm_class(loss_type).citation.strip(), TRL_CITATION]
    return "```bibtex\n" + "\n".join(entry for entry in entries if entry) + "\n```"


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

    fields = algorithm_class(args.loss_type).card_fields
    fields = (*fields, "num_frames") if video else fields
    config = "\n".join(f"| `{name}` | `{getattr(args, name)}` |" for name in fields)
    rewards = ", ".join(
        f"`{n}` (weight {w:g})" for n, w in zip(trainer.rewards.names, trainer.rewards.weights.tolist())
    )
    gold = ", ".join(f"`{n}`" for n in trainer.gold_rewards.names) if trainer.gold_rewards is not None else "none"
    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    load = trainer.adapter.lora_load_code(repo) if trainer.adapter.has_lora else trainer.adapter.full_load_code(repo)
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

{citations(args.loss_type)}
"""
    path = os.path.join(folder, "README.md")
    ModelCard(content).save(path)
    return path
