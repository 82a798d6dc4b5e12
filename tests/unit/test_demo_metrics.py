"""The demo's measurements read the right answer off rendered videos, and the wrong one off wrong videos."""

import numpy as np
import pytest

from finetune.demo_world import (
    BACKGROUNDS,
    CAPTIONS,
    PAPER,
    analyse,
    content_score,
    largest_blob,
    parse_caption,
    render,
    style_distance,
    style_features,
)


@pytest.mark.parametrize("style", ["plain", "ink"])
def test_analyse_reads_colour_shape_and_direction_of_every_caption(style):
    rng = np.random.default_rng(0)
    for caption in CAPTIONS:
        words = caption.split()
        seen = analyse(render(words[1], words[2], words[4], rng, style=style))
        assert (seen["color"], seen["shape"], seen["direction"]) == (words[1], words[2], words[4]), caption


def test_content_score_counts_each_wrong_attribute():
    video = render("red", "circle", "left", np.random.default_rng(1))
    assert content_score(video, "inkstyle a red circle moving left") == 1.0
    assert content_score(video, "a red circle moving right") == pytest.approx(2 / 3)
    assert content_score(video, "a blue square moving right") == 0.0
    # A still frame repeated has no direction; a blank video has nothing at all.
    assert content_score(np.repeat(video[:1], 17, axis=0), "a red circle moving left") == pytest.approx(2 / 3)
    assert content_score(np.full_like(video, 90), "a red circle moving left") == 0.0


def test_style_features_separate_ink_on_paper_from_plain():
    rng = np.random.default_rng(2)
    plain = style_features(render("green", "square", "up", rng, style="plain"))
    ink = style_features(render("green", "square", "up", rng, style="ink"))
    assert plain[3] == 0.0 and ink[3] == 1.0  # outline: fill colour vs ink
    np.testing.assert_allclose(ink[:3], np.array(PAPER) / 255, atol=1e-6)
    assert any(np.allclose(plain[:3], np.array(b) / 255, atol=1e-6) for b in BACKGROUNDS)
    ink_set = [render("red", "circle", m, rng, style="ink") for m in ("left", "up")]
    reference = np.mean([style_features(v) for v in ink_set], axis=0)
    assert style_distance(ink_set, reference) < 0.01
    assert style_distance([render("red", "circle", "left", rng)], reference) > 0.8


def test_largest_blob_keeps_only_the_biggest_component():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True  # 4 pixels
    mask[5:9, 5:9] = True  # 16 pixels
    blob = largest_blob(mask)
    assert blob.sum() == 16 and blob[6, 6] and not blob[1, 1]
    assert not largest_blob(np.zeros((4, 4), bool)).any()


def test_parse_caption_ignores_the_trigger_word():
    assert parse_caption("inkstyle a yellow square moving up") == {
        "color": "yellow",
        "shape": "square",
        "direction": "up",
    }


def _blur(video: np.ndarray) -> np.ndarray:
    """3x3 binomial blur per frame: edges soft by about a pixel, like the demo VAE's reconstructions."""
    padded = np.pad(video.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = video.shape[1:3]
    weights = np.outer([1, 2, 1], [1, 2, 1]) / 16
    total = sum(weights[y, x] * padded[:, y : y + height, x : x + width] for y in range(3) for x in range(3))
    return total.round().astype(np.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_ink_survives_blur_and_dark_backgrounds_do_not_read_as_ink(size):
    rng = np.random.default_rng(3)
    for color in ("red", "blue"):
        # A blurred blob on the darkest plain background has dark edge pixels, but no outline.
        plain = render(color, "circle", "left", rng, 5, size, style="plain")
        plain[:] = np.where((plain == plain[0, 0, 0]).all(-1, keepdims=True), np.array(BACKGROUNDS[0]), plain)
        assert style_features(_blur(plain))[3] == 0.0
        assert style_features(_blur(render(color, "square", "up", rng, 5, size, style="ink")))[3] > 0.6
