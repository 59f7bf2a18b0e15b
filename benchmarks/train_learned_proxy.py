"""Train the toy world's learned proxy: a small CNN that predicts caption fidelity from labelled base-model samples.

    python benchmarks/train_learned_proxy.py --threads 2                        # the shipped weights (8,192 labels)
    OMP_NUM_THREADS=1 python benchmarks/train_learned_proxy.py --samples 2048  # fewer labels

The 64 held-out captions of the over-optimisation study (`benchmarks/overoptimization.py`) are never used here, so
the proxy is evaluated there on captions it has not seen. The other 176 captions are split by `--data-seed` into
training and held-out captions; the pretrained toy model draws `--samples` images of the training captions and
`--heldout-samples` of the held-out ones (ODE, 10 steps, no CFG, as the study's evaluation), each labelled with the
gold `caption_fidelity`. The model trains by binary cross-entropy on these soft labels; the reported Pearson and
Spearman correlations are on the held-out samples of held-out captions. Weights go to `--output-dir`
(`model.safetensors`, `config.json` with the training facts) and the facts to `--results`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trl_guard.toy.learned_proxy import WEIGHTS_DIR, LearnedProxy, caption_features, images_to_tensor, score  # noqa: E402
from trl_guard.toy.scorers import caption_fidelity, colour_proxy  # noqa: E402
from trl_guard.toy.world import COLOURS, SIZE, parse_caption  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results", "learned_proxy.json")
STEPS = 10


def split_captions(data_seed: int, heldout: int) -> tuple[list[str], list[str], list[str]]:
    """Training, held-out and study-eval captions: the last are the over-optimisation study's 64 held-out captions,
    the first two split the remaining captions by `data_seed`."""
    from benchmarks.overoptimization import captions

    _, study_eval = captions()
    from trl_guard.toy.train import all_captions

    rest = [c for c in all_captions() if c not in set(study_eval)]
    random.Random(data_seed).shuffle(rest)
    return rest[heldout:], rest[:heldout], study_eval


@torch.no_grad()
def sample(pipeline, captions: list[str], count: int, seed: int, batch_size: int = 64) -> tuple[list[str], list]:
    """`count` images cycling through `captions`, each batch from its own seeded generator (reproducible in any
    order)."""
    from trl_guard.toy.train import MAX_SEQUENCE_LENGTH

    prompts = [captions[i % len(captions)] for i in range(count)]
    images = []
    for index, start in enumerate(range(0, count, batch_size)):
        images += pipeline(
            prompts[start : start + batch_size],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(seed * 100_003 + index),
        ).images
    return prompts, images


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (the labels take few distinct values, so ties are the rule)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    result = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        result[order[start : end + 1]] = (start + end) / 2
        start = end + 1
    return result


def correlations(predicted: list[float], gold: list[float]) -> dict[str, float]:
    p, g = np.asarray(predicted, dtype=float), np.asarray(gold, dtype=float)
    if len(p) < 2 or p.std() == 0 or g.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {
        "pearson": float(np.corrcoef(p, g)[0, 1]),
        "spearman": float(np.corrcoef(ranks(p), ranks(g))[0, 1]),
    }


def flood(caption: str):
    """The colour proxy's hack: the whole image in the caption's first colour."""
    from PIL import Image

    return Image.new("RGB", (SIZE, SIZE), COLOURS[parse_caption(caption).things[0].colour])


def train(
    model: LearnedProxy, pixels: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, args
) -> list[float]:
    """Adam on binary cross-entropy with soft labels; horizontal flips are not used as augmentation because they would
    break "left of"."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    losses = []
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            rows = order[start : start + args.batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(pixels[rows], features[rows]), labels[rows]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        losses.append(total / len(labels))
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192, help="labelled samples of the training captions")
    parser.add_argument("--heldout-samples", type=int, default=512, help="samples of the held-out captions")
    parser.add_argument("--heldout-captions", type=int, default=32)
    parser.add_argument("--width", type=int, default=32, help="channels of the first convolution")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--data-seed", type=int, default=0, help="caption split and sampling noise")
    parser.add_argument("--output-dir", default=WEIGHTS_DIR)
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the shipped weights: see config.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from safetensors.torch import save_file

    from trl_guard.toy.model import load_toy_pipeline

    start = time.time()
    train_captions, heldout_captions, study_eval = split_captions(args.data_seed, args.heldout_captions)
    pipeline = load_toy_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    train_prompts, train_images = sample(pipeline, train_captions, args.samples, args.data_seed)
    test_prompts, test_images = sample(pipeline, heldout_captions, args.heldout_samples, args.data_seed + 1)
    train_gold = caption_fidelity(train_prompts, train_images)
    test_gold = caption_fidelity(test_prompts, test_images)
    sampling_seconds = time.time() - start

    torch.manual_seed(args.seed)
    model = LearnedProxy(width=args.width)
    features = torch.stack([caption_features(p) for p in train_prompts])
    labels = torch.tensor(train_gold, dtype=torch.float32)
    start = time.time()
    losses = train(model, images_to_tensor(train_images), features, labels, args)
    training_seconds = time.time() - start
    model.eval()

    train_predicted = score(model, train_prompts, train_images)
    test_predicted = score(model, test_prompts, test_images)
    # The hack check: on held-out captions, the base model's drawings against an image flooded with the caption's
    # colour (which the colour proxy scores 1.0).
    flooded = [flood(p) for p in heldout_captions]
    facts = {
        "width": args.width,
        "parameters": sum(p.numel() for p in model.parameters()),
        "options": vars(args) | {"output_dir": None, "results": None},
        "sampling": f"pretrained toy model, ODE {STEPS} steps, no CFG, seeds from --data-seed",
        "train_captions": len(train_captions),
        "heldout_captions": len(heldout_captions),
        "excluded_study_eval_captions": len(study_eval),
        "train_samples": len(train_prompts),
        "heldout_samples": len(test_prompts),
        "train_gold_mean": float(np.mean(train_gold)),
        "heldout_gold_mean": float(np.mean(test_gold)),
        "final_train_loss": losses[-1] if losses else None,
        "train": correlations(train_predicted, train_gold),
        "heldout": correlations(test_predicted, test_gold),
        "heldout_mae": float(np.mean(np.abs(np.array(test_predicted) - np.array(test_gold)))),
        "heldout_proxy_mean": float(np.mean(test_predicted)),
        "flood_hack": {
            "learned_proxy": float(np.mean(score(model, heldout_captions, flooded))),
            "colour_proxy": float(np.mean(colour_proxy(heldout_captions, flooded))),
            "caption_fidelity": float(np.mean(caption_fidelity(heldout_captions, flooded))),
        },
        "base_colour_proxy_mean": float(np.mean(colour_proxy(test_prompts, test_images))),
        "sampling_seconds": round(sampling_seconds, 1),
        "training_seconds": round(training_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    save_file(model.state_dict(), os.path.join(args.output_dir, "model.safetensors"))
    for path in (os.path.join(args.output_dir, "config.json"), args.results):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(facts, f, indent=1)
    print(json.dumps({k: facts[k] for k in ("train", "heldout", "heldout_mae", "flood_hack", "training_seconds")}))
    return facts


if __name__ == "__main__":
    main()
