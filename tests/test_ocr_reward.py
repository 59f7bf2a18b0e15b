"""The OCR reward reads real text rendered with PIL through RapidOCR's bundled models (offline, CPU)."""

import sys

import pytest
from PIL import Image, ImageDraw, ImageFont

from trl_guard.rewards import resolve_reward_func
from trl_guard.rewards.ocr import (
    OcrReward,
    extract_quoted_text,
    levenshtein_distance,
    ocr_reward,
    text_match_score,
)

SIGN_PROMPT = 'a sign that says "HELLO WORLD"'


def render(text: str, size: tuple[int, int] = (256, 64), font_size: int = 32) -> Image.Image:
    """Black text centred on white: PP-OCR reads Pillow's default font at 32 px on 256x64 exactly."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size[0] - right - left) / 2, (size[1] - bottom - top) / 2), text, fill="black", font=font)
    return image


@pytest.fixture(scope="module")
def reward():
    return OcrReward()


def test_correct_spelling_beats_misspelling_beats_blank(reward):
    images = [render("HELLO WORLD"), render("HELLO WORD"), render("")]
    correct, misspelled, blank = reward([SIGN_PROMPT] * 3, images)
    assert correct == 1.0
    assert misspelled == pytest.approx(0.9)  # one deletion out of the 10 characters of "helloworld"
    assert blank == 0.0


def test_unquoted_prompt_gives_none_and_the_rest_of_the_batch_is_scored(reward):
    prompts = [SIGN_PROMPT, "a photo of a cat", "a mug printed with “GRPO”"]
    scores = reward(prompts, [render("HELLO WORLD"), render("HELLO WORLD"), render("grpo")])
    assert scores == [1.0, None, 1.0]


def test_engine_is_created_lazily_once(reward):
    fresh = OcrReward()
    assert fresh._engine is None
    fresh(["no quotes here"], [render("HELLO")])
    assert fresh._engine is None  # nothing to read, so no engine needed yet
    fresh([SIGN_PROMPT], [render("HELLO WORLD")])
    engine = fresh._engine
    fresh([SIGN_PROMPT], [render("HELLO WORLD")])
    assert engine is not None and fresh._engine is engine


def test_module_function_and_builtin_name():
    assert ocr_reward([SIGN_PROMPT, "plain"], [render("HELLO WORLD"), render("x")]) == [1.0, None]
    assert isinstance(resolve_reward_func("ocr"), OcrReward)


def test_mismatched_lengths_raise(reward):
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        reward([SIGN_PROMPT, SIGN_PROMPT], [render("HELLO WORLD")])


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("", "", 0), ("", "abc", 3), ("abc", "", 3), ("abc", "abc", 0), ("abc", "abd", 1), ("kitten", "sitting", 3)],
)
def test_levenshtein_distance(a, b, distance):
    assert levenshtein_distance(a, b) == distance
    assert levenshtein_distance(b, a) == distance


def test_text_match_score_normalisation():
    assert text_match_score("Hello World", "hello\nworld") == 1.0
    assert text_match_score("Hello World", "") == 0.0
    assert text_match_score("ab", "xyzxyzxyz") == 0.0  # clipped, never negative
    assert text_match_score("HELLO", "HELO") == pytest.approx(0.8)
    assert text_match_score("Hello World", "helloworld", ignore_whitespace=False) == pytest.approx(1 - 1 / 11)
    assert text_match_score("Hello", "HELLO", ignore_case=False) == pytest.approx(0.2)
    assert text_match_score("   ", "anything") is None


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ('a sign that says "HELLO WORLD"', "HELLO WORLD"),
        ('"OPEN" above "24/7"', "OPEN 24/7"),
        ("a mug printed with “GRPO”", "GRPO"),
        ("the cat's poster reading 'DON'T PANIC'", "DON'T PANIC"),
        ("‘hi’ in neon", "hi"),
        ("a dog's bowl", None),
        ("a photo of a cat", None),
        ('an unclosed "quote', None),
    ],
)
def test_extract_quoted_text(prompt, target):
    assert extract_quoted_text(prompt) == target


@pytest.mark.parametrize("module", ["rapidocr", "onnxruntime"])
def test_missing_dependency_names_the_extra(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r'pip install "trl-guard\[ocr\]"'):
        OcrReward()
