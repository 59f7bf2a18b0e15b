"""The toy world's learned proxy: the shipped weights load and score, rank faithful drawings above broken ones, and
the training script runs end to end."""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import pytest
from PIL import Image

from trl_guard.toy.learned_proxy import WEIGHTS_DIR, learned_proxy, load_learned_proxy, score
from trl_guard.toy.world import COLOURS, SIZE, render, sample_scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scenes(count: int = 40):
    rng = random.Random(7)
    return [sample_scene(rng) for _ in range(count)]


def _flooded(scene) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), COLOURS[scene.things[0].colour])


def test_shipped_weights_load_and_score():
    assert os.path.getsize(os.path.join(WEIGHTS_DIR, "model.safetensors")) < 1_000_000
    with open(os.path.join(WEIGHTS_DIR, "config.json")) as f:
        facts = json.load(f)
    assert facts["heldout"]["pearson"] > 0.3  # a proxy that tracks the gold, not a constant
    scenes = _scenes(6)
    prompts = [s.caption for s in scenes] + ["a purple hexagon"]
    images = [render(s) for s in scenes] + [render(scenes[0])]
    scores = learned_proxy(prompts, images)
    assert len(scores) == len(images) and scores[-1] is None
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores[:-1])
    assert learned_proxy([], []) == []


def test_faithful_scores_above_flood_and_mismatched_caption():
    """Measured on the shipped weights (40 scenes): faithful 0.59, flooded 0.50, same image under another scene's
    caption 0.49; faithful beats its flooded copy on 58% of scenes only, so flooding is a hole a policy can find
    (the 2,048-label proxy shipped before scored floods 0.45 against 0.60). Not asserted because it does not hold:
    recolouring every object scores as high as faithful (0.589 against 0.588): the base model rarely gets colours
    wrong, so its labelled samples never taught the proxy to check them."""
    scenes = _scenes()
    prompts = [s.caption for s in scenes]
    images = [render(s) for s in scenes]
    faithful = np.array(learned_proxy(prompts, images))
    flooded = np.array(learned_proxy(prompts, [_flooded(s) for s in scenes]))
    mismatched = np.array(learned_proxy(prompts[1:] + prompts[:1], images))
    assert faithful.mean() > flooded.mean() + 0.05
    assert faithful.mean() > mismatched.mean() + 0.05
    assert (faithful > mismatched).mean() > 0.6


def test_training_script_runs_end_to_end(tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks.train_learned_proxy import main

    results = tmp_path / "learned_proxy.json"
    facts = main(
        ["--samples", "16", "--heldout-samples", "8", "--epochs", "1", "--width", "4"]
        + ["--output-dir", str(tmp_path / "weights"), "--results", str(results)]
    )
    assert facts["train_samples"] == 16 and facts["heldout_samples"] == 8
    assert json.loads(results.read_text())["width"] == 4
    model = load_learned_proxy(str(tmp_path / "weights"))
    scene = _scenes(1)[0]
    (value,) = score(model, [scene.caption], [render(scene)])
    assert 0.0 <= value <= 1.0


@pytest.mark.parametrize("caption", ["a red circle", "two blue squares", "a green triangle left of a yellow circle"])
def test_split_keeps_study_eval_captions_out(caption):
    sys.path.insert(0, ROOT)
    from benchmarks.train_learned_proxy import split_captions

    train, heldout, study_eval = split_captions(0, 32)
    assert not set(train) & set(study_eval) and not set(heldout) & set(study_eval)
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) + len(study_eval) == 240
    assert (caption in train) + (caption in heldout) + (caption in study_eval) == 1
