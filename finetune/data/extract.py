"""Which source frames each training sample is cut from (`data.frame_extraction`).

All modes first express the clip at `data.target_fps` when it is set: a 30 fps source at target 15 takes every
second frame, so motion keeps its real speed whatever the source rate. `step` below is source frames per output
frame (1.0 without a target rate).

    head     one window: the first F frames
    uniform  one window: F frames spread evenly over the whole clip (fast motion: it ignores fps by design)
    slide    windows starting every data.frame_stride output frames (overlapping when stride < F)
    chain    back-to-back windows, no overlap, no gap
    full     one window: the whole clip, its length rounded down to the family's rule, capped at the
             largest frame bucket (lengths then vary per clip, so batch_size > 1 mostly finds singletons)

F is the largest frame bucket the clip fills (at the target rate).
"""

from __future__ import annotations

from collections.abc import Callable

from finetune.data.buckets import pick_frames

MODES = ("head", "uniform", "slide", "chain", "full")


class TooShort(ValueError):
    """The clip fills no frame bucket; the message is the reason."""


def source_step(fps: float | None, target_fps: float | None) -> float:
    return fps / target_fps if fps and target_fps else 1.0


def plan_windows(
    frames: int,
    fps: float | None,
    buckets: tuple[int, ...],
    mode: str,
    stride: int = 16,
    target_fps: float | None = None,
    valid_frames: Callable[[int], int] = lambda n: n,
) -> tuple[int, list[tuple[int, ...]]]:
    """(F, [source frame indices per window]) for a clip of `frames` readable frames. Raises TooShort."""
    if mode not in MODES:
        raise ValueError(f"unknown frame extraction mode {mode!r} (known: {', '.join(MODES)})")
    step = source_step(fps, target_fps)
    available = (frames - 1) // step + 1 if frames else 0  # output frames at the target rate
    available = int(available)
    if mode == "uniform":
        length = pick_frames(frames, buckets)  # spreads over the source frames, so the source count limits it
    elif mode == "full":
        length = min(valid_frames(available), max(buckets)) if available else None
        length = length if length and length >= min(buckets) else None
    else:
        length = pick_frames(available, buckets)
    if length is None:
        at = f" at {target_fps:g} fps" if step != 1.0 else ""
        unit = "frame" if available == 1 else "frames"
        raise TooShort(f"has {available} {unit}{at}; the shortest frame bucket is {min(buckets)}")

    if mode == "uniform":
        if length == 1:
            return 1, [(0,)]
        return length, [tuple(round(i * (frames - 1) / (length - 1)) for i in range(length))]
    if mode in ("head", "full"):
        starts = [0]
    else:
        every = length if mode == "chain" else stride
        starts = list(range(0, available - length + 1, every))
    windows = [tuple(min(frames - 1, round((start + i) * step)) for i in range(length)) for start in starts]
    return length, windows
