"""Pretrain the toy world's text-to-image model by flow matching, on CPU, and save it as a diffusers pipeline.

    python -m trl_guard.toy.train --output-dir trl_guard/toy/pretrained --steps 5400 --minutes 60 --lr-schedule cosine

The recipe is what worked on a 2-core CPU: a pixel-space SD3 transformer (patch 4, 6 layers,
4 heads x 32, about 3.5M parameters) with adaLN modulation and output projection zero-initialised, predicting the
clean image (x-prediction, velocity derived in `forward`). It is conditioned on two frozen, randomly initialised tiny
CLIP text encoders (one token per word of the world by default), with every caption's embedding computed once.
Training uses logit-normal noise levels, 10% caption dropout, AdamW 6e-4 (100 warm-up steps, then constant or a cosine
down to 0.1x over `--steps`), batch 64 and an EMA of 0.998 on freshly drawn scenes. Seeded: a rerun with the same
arguments and step count gives the same weights. The run ends after `--steps` or `--minutes`, whichever comes first,
then measures how often the model's images match their captions and writes that to `metrics.json`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import time

import numpy as np
import torch

from .world import COLOURS, RELATIONS, SHAPES, SIZE, parse_caption, render, sample_scene


def all_captions() -> list[str]:
    """Every caption the world's grammar can produce (240), so their embeddings can be computed once."""
    singles = [f"{n} {c} {s}{'s' if n == 'two' else ''}" for n in ("a", "two") for c in COLOURS for s in SHAPES]
    pairs = [
        f"a {c1} {s1} {r} a {c2} {s2}"
        for c1, s1, r, c2, s2 in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES)
        if c1 != c2
    ]
    return singles + pairs


WORDS = sorted({word for caption in all_captions() for word in caption.split()})


def word_tokenizer(words: list[str] = WORDS):
    """A CLIP tokenizer whose merges turn each of `words` into a single token (other text stays byte-level).

    With one token per word, "a red circle" and "two red circles" differ in two whole tokens instead of a few
    characters, which a small frozen, randomly initialised text encoder keeps apart far better.
    """
    from transformers import CLIPTokenizer

    from ..testing import _byte_level_symbols

    symbols = _byte_level_symbols()
    pieces = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []

    def build(merges: list[tuple[str, str]]):
        vocab = {piece: i for i, piece in enumerate(pieces)}
        vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
        return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)

    # BPE applies merges by rank, so one word's merge can split another ("re" in "green"): add the merge of the first
    # two pieces of every word that is still split, until none is.
    for _ in range(max(map(len, words))):
        tokenizer = build(merges)
        split = [tokenizer.tokenize(word) for word in words]
        split = [tokens for tokens in split if len(tokens) > 1]
        if not split:
            return tokenizer
        for tokens in split:
            pair = (tokens[0], tokens[1])
            if pair not in merges:
                merges.append(pair)
                pieces.append(tokens[0] + tokens[1])
    raise RuntimeError("word_tokenizer: could not merge every word into one token")


def build_untrained_pipeline(seed: int = 0, tokenizer: str = "word", num_layers: int = 6):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from ..testing import _tiny_clip_text_config, tiny_clip_tokenizer
    from .model import PixelSpaceAutoencoder, XPredictionSD3Transformer

    torch.manual_seed(seed)
    transformer = XPredictionSD3Transformer(
        sample_size=SIZE,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=num_layers,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    # Zero-initialised modulation and output: every block starts as the identity and the first prediction is 0.
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and (
            name.endswith("norm1.linear") or "norm1_context.linear" in name or name in ("norm_out.linear", "proj_out")
        ):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    make_tokenizer = word_tokenizer if tokenizer == "word" else tiny_clip_tokenizer
    tokenizer = make_tokenizer()
    encoders = [CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer)).eval() for _ in range(2)]
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=PixelSpaceAutoencoder(),
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=make_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


MAX_SEQUENCE_LENGTH = 8  # T5 is absent: SD3 pads this many zero tokens after the CLIP ones


@torch.no_grad()
def encode(pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    return embeds, pooled


def to_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1
    return torch.from_numpy(array).permute(0, 3, 1, 2)


@torch.no_grad()
def measure_fidelity(pipeline, captions: list[str], seed: int = 0, steps: int = 20) -> dict[str, float]:
    """Sample one image per caption (ODE, no CFG) and score it with the rule-based gold scorers."""
    from .scorers import caption_fidelity, cleanliness

    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(captions), 32):
        images += pipeline(
            captions[start : start + 32],
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=1.0,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=generator,
        ).images
    fidelity = np.array(caption_fidelity(captions, images), dtype=float)
    kinds = np.array([caption_kind(caption) for caption in captions])
    return {
        "caption_fidelity": float(fidelity.mean()),
        "exact_match": float((fidelity == 1.0).mean()),
        "cleanliness": float(np.mean(cleanliness(captions, images))),
        "num_captions": len(captions),
        "caption_fidelity_by_kind": {kind: float(fidelity[kinds == kind].mean()) for kind in sorted(set(kinds))},
    }


def caption_kind(caption: str) -> str:
    """ "one", "two" (one kind, counted) or the relation of a pair ("above", "left of")."""
    scene = parse_caption(caption)
    return scene.relation or ("one" if scene.count == 1 else "two")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=3400)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=6e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=["word", "byte"], default="word")
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument(
        "--lr-schedule", choices=["constant", "cosine"], default="constant", help="cosine decays to 0.1x over --steps"
    )
    parser.add_argument("--ema-decay", type=float, default=0.998)
    options = parser.parse_args(argv)

    torch.set_num_threads(2)
    pipeline = build_untrained_pipeline(options.seed, tokenizer=options.tokenizer, num_layers=options.num_layers)
    pipeline.set_progress_bar_config(disable=True)
    captions = all_captions()
    index = {caption: i for i, caption in enumerate(captions)}
    embeds, pooled = encode(pipeline, captions + [""])  # the last row is the dropped-caption embedding
    transformer = pipeline.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=options.learning_rate, weight_decay=0.0)
    warmup = 100

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if options.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, options.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng, generator = random.Random(options.seed), torch.Generator().manual_seed(options.seed)

    start, step, losses = time.time(), 0, []
    while step < options.steps and time.time() - start < options.minutes * 60:
        scenes = [sample_scene(rng) for _ in range(options.batch_size)]
        clean = to_tensor([render(s) for s in scenes])
        rows = torch.tensor([index[s.caption] for s in scenes])
        rows[torch.rand(len(rows), generator=generator) < 0.1] = len(captions)  # caption dropout
        sigma = torch.sigmoid(torch.randn(len(rows), generator=generator)).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * torch.randn(clean.shape, generator=generator)
        predicted = transformer.predict_clean(
            noisy, sigma.flatten() * 1000, encoder_hidden_states=embeds[rows], pooled_projections=pooled[rows]
        )
        loss = torch.nn.functional.mse_loss(predicted, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), transformer.parameters()):
                averaged.lerp_(current, 1 - options.ema_decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step}  loss {np.mean(losses[-100:]):.4f}  {time.time() - start:.0f} s", flush=True)

    minutes = (time.time() - start) / 60
    pipeline.transformer = None  # swapped for the EMA weights below
    pipeline.register_modules(transformer=ema)
    os.makedirs(options.output_dir, exist_ok=True)
    pipeline.save_pretrained(options.output_dir)
    metrics = {
        "options": {k: v for k, v in vars(options).items() if k != "output_dir"},
        "steps": step,
        "minutes": round(minutes, 1),
        "final_loss": float(np.mean(losses[-100:])),
        **measure_fidelity(pipeline, captions),
    }
    with open(os.path.join(options.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
