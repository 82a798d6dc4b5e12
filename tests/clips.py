"""Synthetic media for tests: small files written in milliseconds, with content tests can assert on.

Videos show a colored square moving left to right across a mid-gray background, so frames differ
and the corners stay background (gray decodes to about 0.0 in [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

GRAY = (128, 128, 128)


def frame_pattern(index: int, frames: int, width: int, height: int, color, moving: bool = True) -> np.ndarray:
    """Frame `index` as (H, W, 3) uint8: a square of side height/3 centred vertically."""
    side = max(2, height // 3)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GRAY
    # The square travels within the middle half of the width, so the outer quarters (and every
    # corner) stay background.
    span = max(0, width // 2 - side)
    x = width // 4 + (span * index // max(1, frames - 1) if moving else 0)
    y = (height - side) // 2
    image[y : y + side, x : x + side] = color
    return image


def write_video(path, frames: int, width: int, height: int, color=(255, 0, 0), fps=8, moving=True) -> Path:
    """An .mp4/.mkv/.mov (libx264, yuv420p: width and height must be even) or a .gif (PIL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = [frame_pattern(i, frames, width, height, color, moving) for i in range(frames)]
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(p) for p in pictures]
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12"}  # near-lossless so color assertions can be tight
        for picture in pictures:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def write_image(path, width, height, color=(0, 0, 255)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def write_corrupt(path) -> Path:
    """Garbage bytes under a media extension: what a truncated download or a renamed file looks like."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def write_audio_only(path) -> Path:
    """A valid .mkv holding one short silent audio track and no video stream."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
