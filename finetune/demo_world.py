"""The demo's synthetic world and the measurements made on it (numpy only, no model code).

The world: one coloured shape (circle or square) moving left, right, up or down across a plain background,
captioned "a red circle moving left". The base model (tools/build_demo_base.py) learns the plain rendering;
the demo teaches it a style it never saw: ink outlines on paper.

The measurements read only pixels, so they judge any video the same way (training clips, base samples, adapter
samples):
- content: is the prompt's colour, shape and direction in the video? (largest non-background blob: its fill
  colour, how much of its bounding box it fills, where its centroid goes)
- style: background colour and the darkness of the blob's outline, as a distance to the style set's average.
"""

from __future__ import annotations

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square")
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# The plain rendering the base model learns: one of these backgrounds, chosen at random (not in the caption).
BACKGROUNDS = ((34, 34, 40), (70, 80, 100), (120, 120, 120))
# The demo's style: ink outlines on paper. The base never saw either.
PAPER, INK = (236, 226, 200), (30, 28, 26)
CAPTIONS = [f"a {c} {s} moving {m}" for c in COLORS for s in SHAPES for m in MOVES]
TRIGGER = "inkstyle"  # the word that calls up the style in the demo's captions; in the base's vocabulary
WORDS = [TRIGGER, "a", "moving", *COLORS, *SHAPES, *MOVES]  # the tokenizer's whole vocabulary


def render(
    color: str,
    shape: str,
    move: str,
    rng: np.random.Generator,
    frames: int = 17,
    size: int = 64,
    style: str = "plain",
) -> np.ndarray:
    """(frames, size, size, 3) uint8. `rng` varies size and path (and the background of the plain style), so
    one caption stands for many videos."""
    # Big shapes and thick outlines: the demo renders 32x32 frames, and the tiny VAE (8x downsampling) must
    # still tell a circle from a square and keep the outline.
    radius = size * 0.22 * rng.uniform(0.9, 1.1)
    travel = size * 0.4  # the centre crosses 40% of the frame: a direction the eye (and the metric) can read
    along = rng.uniform(-0.05, 0.05) * size
    across = rng.uniform(-0.1, 0.1) * size
    if style == "plain":
        background, outline = BACKGROUNDS[rng.integers(len(BACKGROUNDS))], None
    elif style == "ink":
        background, outline = PAPER, INK
    else:
        raise ValueError(f"unknown style '{style}'")
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = MOVES[move]
    video = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        t = (i / max(1, frames - 1) - 0.5) * travel + along
        cx, cy = size / 2 + dx * t + dy * across, size / 2 + dy * t + dx * across
        if shape == "circle":
            dist = np.hypot(xx - cx, yy - cy) / radius
        else:
            dist = np.maximum(abs(xx - cx), abs(yy - cy)) / radius
        frame = video[i]
        frame[:] = background
        frame[dist <= 1.0] = COLORS[color]
        if outline is not None:
            frame[(dist > 0.6) & (dist <= 1.0)] = outline
    return video


# ---- measurement -------------------------------------------------------------------------------------------

_FOREGROUND = 60  # max per-channel difference from the background (0-255) that makes a pixel "not background"
_MIN_AREA = 12  # pixels; a blob smaller than this in a frame is noise, not the shape
_DARK = 90  # luminance below this is ink


def background_color(video: np.ndarray) -> np.ndarray:
    """Median colour of the 2-pixel border over all frames (the shape rarely covers the border)."""
    border = np.concatenate(
        [video[:, :2].reshape(-1, 3), video[:, -2:].reshape(-1, 3), video[:, :, :2].reshape(-1, 3),
         video[:, :, -2:].reshape(-1, 3)]
    )  # fmt: skip
    return np.median(border, axis=0)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D boolean mask (a flood fill; no scipy needed)."""
    height, width = mask.shape
    todo = set(zip(*np.nonzero(mask), strict=True))
    best: list = []
    while todo:
        stack = [todo.pop()]
        blob = []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for n in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if n in todo:
                    todo.remove(n)
                    stack.append(n)
        if len(blob) > len(best):
            best = blob
    out = np.zeros((height, width), bool)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask whose four neighbours are all in the mask."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _band(blob: np.ndarray) -> np.ndarray:
    """The blob's outer 2-pixel band: where an outline is, even when a VAE has blurred it by a pixel."""
    return blob & ~_erode(_erode(blob))


def analyse(video: np.ndarray) -> dict:
    """What a video shows: colour, shape and direction of its main blob, its background and outline darkness.
    Fields are None when the video shows no blob at all."""
    video = np.asarray(video)
    background = background_color(video)
    pixels = video.astype(np.float32)
    luminance = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    saturation = pixels.max(-1) - pixels.min(-1)
    centroids, fills, ink, fill_pixels = [], [], [], []
    for i in range(len(video)):
        blob = largest_blob(np.abs(pixels[i] - background).max(-1) > _FOREGROUND)
        area = int(blob.sum())
        if area < _MIN_AREA:
            continue
        ys, xs = np.nonzero(blob)
        centroids.append((xs.mean(), ys.mean()))
        fills.append(area / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1)))
        # Ink: dark, and clearly darker than the background. Without the second condition a blurred blob on
        # a dark background reads as outlined (its edge pixels blend into the dark background).
        dark = min(_DARK, float(background @ np.array([0.299, 0.587, 0.114])) - 40)
        ink.append(float((luminance[i][_band(blob)] < dark).mean()))
        # The fill colour: saturated blob pixels (ink, paper and grey backgrounds are unsaturated).
        fill_pixels.append(pixels[i][blob & (saturation[i] > 60)])
    result = {"background": background / 255, "ink": float(np.mean(ink)) if ink else 0.0}
    result.update(color=None, shape=None, direction=None)
    if len(centroids) < 2:
        return result
    colored = np.concatenate(fill_pixels)
    if len(colored):
        fill = np.median(colored, axis=0)
        names = list(COLORS)
        result["color"] = names[int(np.argmin([np.linalg.norm(fill - COLORS[n]) for n in names]))]
    # A disc fills pi/4 = 0.79 of its bounding box, a square 1.0; halfway between decides.
    result["shape"] = "circle" if np.median(fills) < 0.89 else "square"
    dx, dy = np.subtract(centroids[-1], centroids[0])
    if max(abs(dx), abs(dy)) >= 0.1 * video.shape[2]:  # moved at least a tenth of the frame
        result["direction"] = (
            ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
        )
    return result


def parse_caption(caption: str) -> dict:
    """'inkstyle a red circle moving left' -> {'color': 'red', 'shape': 'circle', 'direction': 'left'}."""
    words = caption.split()
    pick = lambda options: next((w for w in words if w in options), None)  # noqa: E731
    return {"color": pick(COLORS), "shape": pick(SHAPES), "direction": pick(MOVES)}


def content_score(video: np.ndarray, caption: str) -> float:
    """Fraction of the caption's colour, shape and direction that the video shows (0, 1/3, 2/3 or 1)."""
    seen, wanted = analyse(video), parse_caption(caption)
    return sum(seen[k] == v for k, v in wanted.items()) / len(wanted)


def style_features(video: np.ndarray) -> np.ndarray:
    """Background colour (0-1 RGB) and the fraction of the blob's outline that is ink."""
    seen = analyse(video)
    return np.array([*seen["background"], seen["ink"]])


def style_distance(videos: list[np.ndarray], reference: np.ndarray) -> float:
    """Mean Euclidean distance of the videos' style features to the reference (the style set's mean features).
    0 is the style set's average; the style set's own spread gives its value (style_target)."""
    return float(np.mean([np.linalg.norm(style_features(v) - reference) for v in videos]))
