"""The toy world draws what its captions say, and its scorers separate faithful images from hacked ones."""

import random

import numpy as np
import pytest
from PIL import Image

from trl_guard.toy import (
    caption_fidelity,
    cleanliness,
    colour_proxy,
    parse_caption,
    render,
    sample_scene,
    seed_diversity,
)
from trl_guard.toy.world import COLOURS, SIZE, Scene, Thing


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(0)
    return [sample_scene(rng) for _ in range(200)]


def test_captions_round_trip_and_renderings_are_faithful(scenes):
    images = [render(s) for s in scenes]
    captions = [s.caption for s in scenes]
    assert all(parse_caption(c) == Scene(s.things, s.count, s.relation) for c, s in zip(captions, scenes))
    assert len(set(captions)) > 50  # the world is not tiny
    fidelity = caption_fidelity(captions, images)
    assert np.mean(fidelity) >= 0.97  # the rule-based gold score reads the renderer's own drawings
    assert min(cleanliness(captions, images)) > 0.9
    assert all(image.size == (SIZE, SIZE) for image in images)


def test_a_hacked_image_beats_a_faithful_one_on_the_proxy_and_loses_on_gold(scenes):
    scene = next(s for s in scenes if s.relation is None and s.count == 2)
    faithful = render(scene)
    flooded = Image.new("RGB", (SIZE, SIZE), COLOURS[scene.things[0].colour])
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    prompts = [scene.caption] * 3
    proxy = colour_proxy(prompts, [faithful, flooded, noisy])
    gold = caption_fidelity(prompts, [faithful, flooded, noisy])
    clean = cleanliness(prompts, [faithful, flooded, noisy])
    assert proxy[1] == 1.0 and proxy[1] > proxy[0] > proxy[2]
    assert gold[0] == 1.0 and gold[1] < 0.5 and gold[2] == 0.0
    assert clean[2] < 0.5 < clean[0]


def test_wrong_count_colour_shape_and_arrangement_are_caught():
    red_square = Thing("red", "square")
    two = render(Scene((red_square,), 2, boxes=((2, 2, 11), (18, 18, 11))))
    assert caption_fidelity(
        ["two red squares", "a red square", "two green squares", "two red circles"], [two] * 4
    ) == [
        1.0,
        0.5,
        0.0,
        0.0,
    ]
    pair = Scene((Thing("red", "circle"), Thing("blue", "triangle")), 2, "above", boxes=((10, 2, 11), (10, 18, 11)))
    image = render(pair)
    fidelity = caption_fidelity(
        [
            "a red circle above a blue triangle",
            "a blue triangle above a red circle",
            "a red circle left of a blue triangle",
        ],
        [image] * 3,
    )
    assert fidelity[0] == 1.0 and fidelity[1] == 0.5
    assert caption_fidelity(["a purple dragon"], [image]) == [None]


def test_seed_diversity_is_zero_for_collapsed_groups(scenes):
    a, b = render(scenes[0]), render(scenes[1])
    scores = seed_diversity(["p", "p", "q", "q", "r"], [a, b, a, a, b])
    assert scores[0] == scores[1] > 0 and scores[2] == scores[3] == 0.0 and scores[4] == 0.0
