"""Turn one media file into the tensor the VAE encodes: (3, F, H, W) float32 in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.data.discover import IMAGE_EXTS

# Everything PyAV and PIL raise for a bad file; anything else is a bug in our code and should surface.
_DECODE_ERRORS = (
    av.error.FFmpegError,
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    Image.DecompressionBombError,
)


class MediaError(Exception):
    """A file that can't be used; the message is the short reason, read after the file's path."""


def load_clip(path: Path, width: int, height: int, frames: int) -> torch.Tensor:
    """The first `frames` frames of a video, resized to cover width×height and center-cropped.

    An image always gives F=1 whatever `frames` says: the caller decides whether a single frame is
    wanted (image training, i2v conditioning) or should be rejected.
    Raises MediaError for anything that can't be decoded or is too short.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in IMAGE_EXTS:
            with Image.open(path) as image:
                # Phone photos store "rotate me" in EXIF; without this they train sideways.
                pictures = [ImageOps.exif_transpose(image).convert("RGB")]
        else:
            pictures = _decode_video(path, frames)
        # ImageOps.fit crops the source box first and resizes only that, which equals
        # scale-to-cover then center-crop without resizing pixels that are thrown away.
        arrays = [
            np.asarray(ImageOps.fit(p, (width, height), Image.Resampling.BICUBIC, centering=(0.5, 0.5)))
            for p in pictures
        ]
    except _DECODE_ERRORS as e:
        raise MediaError(f"cannot be decoded: {_short(e, path)}") from e

    video = torch.from_numpy(np.stack(arrays))  # (F, H, W, 3) uint8
    return video.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def _decode_video(path: Path, frames: int) -> list[Image.Image]:
    # GIF goes through here too: FFmpeg's gif decoder composites the frames to full RGB images.
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError("has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        pictures = []
        for frame in container.decode(stream):
            pictures.append(frame.to_image())
            if len(pictures) == frames:
                break  # long clips: stop decoding once we have what training uses
    if not pictures:
        raise MediaError("cannot be decoded: no video frames")
    if len(pictures) < frames:
        raise MediaError(f"has {len(pictures)} frames; needs {frames}")
    return pictures


def _short(error: Exception, path: Path) -> str:
    # FFmpeg errors carry "[Errno N] reason: 'path'" and PIL's end in the quoted path; the caller
    # prints the path already, so the reason alone is what the user needs.
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text.replace(f" {str(path)!r}", "").strip().splitlines()[0]
