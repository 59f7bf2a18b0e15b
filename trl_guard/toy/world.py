"""Scenes of one or two coloured shapes, their captions, and a parser that turns a caption back into a scene spec.

Captions come in three forms:
- "a red circle" / "two blue squares" (one kind, count 1 or 2),
- "a red circle above a green triangle" (two different objects, one above the other),
- "a red circle left of a green triangle" (side by side).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SIZE = 32
BACKGROUND = (235, 235, 235)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "left of")
NUMBERS = {1: "a", 2: "two"}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """What an image should show: `things` with their count, and how two different things are placed."""

    things: tuple[Thing, ...]
    count: int = 1
    relation: str | None = None
    boxes: tuple[tuple[int, int, int], ...] = field(default=(), compare=False)  # (x, y, size) per drawn object

    @property
    def caption(self) -> str:
        if self.relation is not None:
            first, second = self.things
            return f"a {first.colour} {first.shape} {self.relation} a {second.colour} {second.shape}"
        (thing,) = self.things
        plural = "s" if self.count > 1 else ""
        return f"{NUMBERS[self.count]} {thing.colour} {thing.shape}{plural}"


def sample_scene(rng: random.Random) -> Scene:
    """A random scene with random placements (objects 9-12 px, never overlapping)."""
    kind = rng.random()
    if kind < 0.5:
        thing = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES))
        count = rng.choice((1, 2))
        relation, things = None, (thing,)
    else:
        first = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES))
        second = Thing(rng.choice([c for c in COLOURS if c != first.colour]), rng.choice(SHAPES))
        count, relation, things = 2, rng.choice(RELATIONS), (first, second)
    return Scene(things, count, relation, _place(rng, count, relation))


def _place(rng: random.Random, count: int, relation: str | None) -> tuple[tuple[int, int, int], ...]:
    size = rng.randint(9, 12)
    if count == 1:
        return ((rng.randint(2, SIZE - size - 2), rng.randint(2, SIZE - size - 2), size),)
    # Two slots: top/bottom for "above", left/right otherwise; the first object takes the first slot.
    half = SIZE // 2
    jitter = lambda low: rng.randint(low, low + half - size - 2)  # noqa: E731
    if relation == "above" or (relation is None and rng.random() < 0.5):
        x = rng.randint(2, SIZE - size - 2)
        return (x, jitter(1), size), (rng.randint(2, SIZE - size - 2), jitter(half + 1), size)
    y = rng.randint(2, SIZE - size - 2)
    return (jitter(1), y, size), (jitter(half + 1), rng.randint(2, SIZE - size - 2), size)


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a 32x32 RGB image."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    things = scene.things if len(scene.things) == len(scene.boxes) else scene.things * len(scene.boxes)
    for thing, (x, y, size) in zip(things, scene.boxes):
        colour = COLOURS[thing.colour]
        box = (x, y, x + size - 1, y + size - 1)
        if thing.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif thing.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x + (size - 1) / 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=colour)
    return image


_SINGLE = re.compile(rf"^(a|two) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?$")
_PAIR = re.compile(
    rf"^a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (above|left of) a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})$"
)


def parse_caption(caption: str) -> Scene | None:
    """The scene spec a caption asks for (without placements), or None for text outside the world's grammar."""
    caption = caption.strip().lower()
    if match := _SINGLE.match(caption):
        number, colour, shape = match.groups()
        return Scene((Thing(colour, shape),), 1 if number == "a" else 2)
    if match := _PAIR.match(caption):
        c1, s1, relation, c2, s2 = match.groups()
        return Scene((Thing(c1, s1), Thing(c2, s2)), 2, relation)
    return None
