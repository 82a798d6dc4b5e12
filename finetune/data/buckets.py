"""Buckets: the sizes and lengths items are encoded at, so a batch stacks without distorting anything.

Aspect-ratio buckets keep about the target area (data.width x data.height) with sides that are multiples of the
family's size step (Wan: 16 = VAE 8 x patch 2); each item goes to the bucket nearest its aspect ratio and is
scaled to cover it, then center-cropped (at most a sliver of the picture is lost, never squashed).
Frame buckets are the lengths a clip may be cut to (snapped down to the family's rule, Wan: 4k+1); a clip goes to
the largest bucket it fills.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MAX_RATIO = 4.0  # wider or taller than 4:1 is a banner, not a video frame; such sources get the 4:1 bucket


def aspect_buckets(width: int, height: int, multiple: int, enabled: bool = True) -> list[tuple[int, int]]:
    """Every (w, h) with sides a multiple of `multiple`, area at most width x height (and within one step of it),
    aspect between 1:4 and 4:1. Always includes the target itself (rounded down to the multiple)."""
    target = (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
    if not enabled:
        return [target]
    area = target[0] * target[1]
    sizes = {target}
    for w in range(multiple, int(math.sqrt(area * MAX_RATIO)) + multiple, multiple):
        h = area // w // multiple * multiple  # the tallest side that keeps the area within the target
        if h >= multiple and 1 / MAX_RATIO <= w / h <= MAX_RATIO:
            sizes.add((w, h))
    return sorted(sizes)


def pick_size(
    source: tuple[int, int], buckets: list[tuple[int, int]], multiple: int, no_upscale: bool
) -> tuple[int, int]:
    """The bucket nearest the source's aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1);
    ties go to the larger area. With `no_upscale`, a bucket bigger than the source on either side is scaled
    down (aspect kept) until it fits; raises ValueError when the source is below one size step."""
    src_w, src_h = source
    if no_upscale and min(src_w, src_h) < multiple:
        raise ValueError(
            f"is {src_w}x{src_h}; smaller than the {multiple}-pixel minimum (data.no_upscale=true)"
        )
    ratio = math.log(src_w / src_h)
    w, h = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if no_upscale and (w > src_w or h > src_h):
        shrink = min(src_w / w, src_h / h)
        # +1e-6: 720 * (320 / 720) is 319.99999 in floating point, and must floor to 320, not 304.
        w = max(multiple, int(w * shrink + 1e-6) // multiple * multiple)
        h = max(multiple, int(h * shrink + 1e-6) // multiple * multiple)
    return w, h


def frame_buckets(requested: tuple[int, ...], valid_frames: Callable[[int], int]) -> tuple[int, ...]:
    """Requested lengths snapped down to the family's rule, deduplicated, ascending."""
    return tuple(sorted({valid_frames(f) for f in requested}))


def pick_frames(available: int, buckets: tuple[int, ...]) -> int | None:
    """The largest bucket not longer than `available`, or None when the clip is shorter than every bucket."""
    fitting = [b for b in buckets if b <= available]
    return max(fitting) if fitting else None
