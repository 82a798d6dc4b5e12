"""Media files to VAE-ready tensors: (3, F, H, W) float32 in [-1, 1].

`probe` reads what planning needs (displayed size, readable frame count, fps) without decoding more than the
first frame. `decode_windows` decodes a video once, front to back, and yields each requested window as soon as
its last frame is in; over a stretch of frames no window needs, it seeks to the last keyframe before the next
needed frame instead of decoding through (`seek.py`), with the same frames as a decode from the start.

Phone clips are often stored sideways with a display rotation (the display matrix; older FFmpeg builds exposed
it as a `rotate` tag): probe reports the size as displayed, and frames are turned upright after scaling. Every frame is scaled down by FFmpeg's swscale straight from the decoder's YUV picture to
the bucket's size and cropped, so a 1920x1080 source never exists as a full-size RGB array: memory is one decoded
YUV frame plus the window's small frames, whatever the source resolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.data.discover import IMAGE_EXTS
from finetune.data.seek import indexed_frames

# Everything PyAV and PIL raise for a bad file; anything else is a bug in our code and should surface.
_DECODE_ERRORS = (
    av.error.FFmpegError,
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    Image.DecompressionBombError,
)
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class MediaError(Exception):
    """A file that can't be used; the message is the short reason, read after the file's path."""


@dataclass(frozen=True)
class MediaInfo:
    width: int  # as displayed (EXIF rotation applied for images)
    height: int
    frames: int  # frames that can actually be read (1 for an image)
    fps: float | None  # None for images and streams that do not say
    is_image: bool
    header_frames: int = 0  # frames the container claims; more than `frames` means a truncated file
    rotation: int = (
        0  # degrees counterclockwise turned to display it (0, 90, 180, 270); width/height as shown
    )

    @property
    def seconds(self) -> float | None:
        return self.frames / self.fps if self.fps else None


def probe(path: Path) -> MediaInfo:
    """Size, length and rate of a media file. Raises MediaError with the reason for anything unusable."""
    path = Path(path)
    try:
        if path.suffix.lower() in IMAGE_EXTS:
            return _probe_image(path)
        return _probe_video(path)
    except PermissionError:
        raise MediaError("cannot be read (permission denied)") from None
    except _DECODE_ERRORS as e:
        raise MediaError(f"cannot be decoded: {_short(e, path)}") from e


def _probe_image(path: Path) -> MediaInfo:
    with Image.open(path) as image:
        image.verify()  # walks the file's structure (PNG: every chunk's CRC) without decoding pixels
    with Image.open(path) as image:  # verify() leaves the image unusable: open it again for the facts
        width, height = image.size
        orientation = image.getexif().get(0x0112)
        if orientation in _ROTATED:
            width, height = height, width
    # EXIF orientation -> counterclockwise degrees turned to show it (5 and 7 also mirror it)
    rotation = {3: 180, 6: 270, 8: 90, 5: 270, 7: 90}.get(orientation, 0)
    return MediaInfo(width, height, 1, None, True, 1, rotation=rotation)


def _probe_video(path: Path) -> MediaInfo:
    with av.open(str(path)) as container:
        stream = _video_stream(container)
        header = stream.frames or 0  # 0 when the container does not say (mkv, webm, gif)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        # Counting packets reads the file but decodes nothing; a truncated file yields fewer than its header.
        packets = 0
        try:
            for packet in container.demux(stream):
                packets += packet.size > 0
        except av.error.FFmpegError:
            pass  # a damaged tail: the packets before it still count
    with av.open(str(path)) as container:
        stream = _video_stream(container)
        first = next(iter(container.decode(stream)), None)  # proves the codec really decodes this file
        if first is None:
            raise MediaError("cannot be decoded: no video frames")
        turns = quarter_turns(first, stream)
        width, height = (first.height, first.width) if turns % 2 else (first.width, first.height)
    return MediaInfo(width, height, packets, fps, False, header, rotation=90 * turns)


def quarter_turns(frame: av.VideoFrame, stream) -> int:
    """Counterclockwise quarter turns (0-3) that show the frame as the camera meant it."""
    return turns_from(getattr(frame, "rotation", None), stream.metadata.get("rotate"))


def turns_from(matrix_degrees: float | None, rotate_tag: str | None) -> int:
    """`VideoFrame.rotation` (PyAV 18 has it) is the display matrix's angle, counterclockwise as FFmpeg counts it.
    Without it (older PyAV), fall back to the `rotate` stream tag, clockwise degrees, which older FFmpeg builds
    exported instead of the matrix. Flips in the matrix are ignored (rare in camera files)."""
    if matrix_degrees is not None:
        degrees = float(matrix_degrees)
    else:
        try:
            degrees = -float(rotate_tag) if rotate_tag else 0.0
        except ValueError:  # a tag we cannot read: show the frames as stored
            degrees = 0.0
    return round(degrees / 90) % 4


def _video_stream(container) -> av.VideoStream:
    if not any(s.type in ("video", "audio") for s in container.streams):  # an .mp4 cut before its index
        raise MediaError("has no audio or video streams (a truncated or damaged file?)")
    if not container.streams.video:
        raise MediaError("has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise MediaError("uses a video codec this FFmpeg build cannot decode")
    stream.thread_type = "AUTO"  # frame + slice threads inside FFmpeg; the GIL is released while it works
    return stream


def load_image(path: Path, width: int, height: int) -> torch.Tensor:
    """(3, 1, H, W): the image scaled to cover width x height, center-cropped."""
    try:
        with Image.open(path) as image:
            # Phone photos store "rotate me" in EXIF; without this they train sideways.
            upright = ImageOps.exif_transpose(image).convert("RGB")
        # ImageOps.fit crops the source box first and resizes only that, which equals scale-to-cover then
        # center-crop without resizing pixels that are thrown away.
        array = np.asarray(
            ImageOps.fit(upright, (width, height), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        )
    except PermissionError:
        raise MediaError("cannot be read (permission denied)") from None
    except _DECODE_ERRORS as e:
        raise MediaError(f"cannot be decoded: {_short(e, path)}") from e
    return _to_tensor([array])


def decode_windows(
    path: Path, windows: list[tuple[int, ...]], width: int, height: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (window number, (3, F, H, W) tensor) for each window of source frame indices, in the order the
    windows complete. Decoding stops after the last needed frame and seeks over long unneeded stretches; frames
    are dropped once no pending window needs them (a `chain` over a long clip holds one window's frames)."""
    path = Path(path)
    pending = sorted(range(len(windows)), key=lambda w: max(windows[w]))
    needed = {i for window in windows for i in window}
    last = max(needed)
    kept: dict[int, np.ndarray] = {}
    seen = 0  # frames up to the latest one decoded (its index + 1)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container)
            for index, frame in indexed_frames(path, container, stream, sorted(needed)):
                if index in needed:
                    kept[index] = _fit(frame, width, height, quarter_turns(frame, stream))
                seen = index + 1
                while pending and max(windows[pending[0]]) < seen:
                    number = pending.pop(0)
                    yield number, _to_tensor([kept[i] for i in windows[number]])
                    oldest = min((min(windows[w]) for w in pending), default=seen)
                    kept = {i: a for i, a in kept.items() if i >= oldest}
                if seen > last:
                    return  # long clips: stop decoding once we have what training uses
    except PermissionError:
        raise MediaError("cannot be read (permission denied)") from None
    except _DECODE_ERRORS as e:
        raise MediaError(f"cannot be decoded after {seen} frames: {_short(e, path)}") from e
    if seen == 0:
        raise MediaError("cannot be decoded: no video frames")
    raise MediaError(f"has {seen} frames; needs {last + 1}")


def _fit(frame: av.VideoFrame, width: int, height: int, turns: int = 0) -> np.ndarray:
    """Scale to cover width x height as displayed (swscale, from YUV), turn upright, center-crop:
    (height, width, 3) uint8. Turning after scaling moves only the small frame's bytes."""
    shown_w, shown_h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    scale = max(width / shown_w, height / shown_h)
    cover_w = max(width, round(shown_w * scale))
    cover_h = max(height, round(shown_h * scale))
    stored_w, stored_h = (cover_h, cover_w) if turns % 2 else (cover_w, cover_h)
    small = frame.reformat(
        width=stored_w, height=stored_h, format="rgb24", interpolation="BICUBIC"
    ).to_ndarray()
    if turns:
        small = np.rot90(small, turns)  # counterclockwise, like the display matrix (checked against ffmpeg)
    top, left = (cover_h - height) // 2, (cover_w - width) // 2
    return small[top : top + height, left : left + width]


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    video = torch.from_numpy(np.stack(arrays))  # (F, H, W, 3) uint8
    return video.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def load_clip(path: Path, width: int, height: int, frames: int) -> torch.Tensor:
    """The first `frames` frames of a video (or an image as F=1), covering width x height, center-cropped.

    An image always gives F=1 whatever `frames` says: the caller decides whether a single frame is wanted.
    Raises MediaError for anything that can't be decoded or is too short.
    """
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTS:
        return load_image(path, width, height)
    for _, video in decode_windows(path, [tuple(range(frames))], width, height):
        return video
    raise AssertionError("decode_windows yields the window or raises")  # pragma: no cover


def _short(error: Exception, path: Path) -> str:
    # FFmpeg errors carry "[Errno N] reason: 'path'" and PIL's end in the quoted path; the caller
    # prints the path already, so the reason alone is what the user needs.
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text.replace(f" {str(path)!r}", "").replace(f": {str(path)!r}", "").strip().splitlines()[0]
