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
    """An .mp4/.mkv/.mov (libx264, yuv420p: width and height must be even), a .webm (VP8) or a .gif (PIL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = [frame_pattern(i, frames, width, height, color, moving) for i in range(frames)]
    if path.suffix.lower() == ".gif":
        images = [Image.fromarray(p) for p in pictures]
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
        return path
    codec = "libvpx" if path.suffix.lower() == ".webm" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # near-lossless so color assertions can be tight
        stream.options = {"crf": "12"} if codec == "libx264" else {"crf": "4", "b": "2M"}
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


def write_unknown_codec(path) -> Path:
    """A well-formed .mkv whose video track names a codec FFmpeg has never heard of (what an exotic camera or
    a newer codec looks like to an older FFmpeg): the container opens, the stream has no decoder."""
    path = Path(path)
    good = write_video(path.with_name(path.stem + ".h264.mkv"), frames=3, width=32, height=32)
    data = good.read_bytes()
    good.unlink()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/AVC"))  # same length: offsets stay valid
    return path


def write_truncated(path, frames: int = 20, width: int = 32, height: int = 32, keep: float = 0.5) -> Path:
    """An .mp4 cut off part-way, as an interrupted download or copy leaves it. The index (moov) is written first
    (faststart), so the header still claims every frame while the data for most of them is missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = frame_pattern(i, frames, width, height, (255, 0, 0))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_bad_dataset(folder, outside) -> dict[str, str]:
    """Every bad input of issue 8 beside good clips, all 10 frames at 48x40 unless the case needs otherwise.

    Returns {file name: the words its reason must contain}; good files map to "" (must be cached), files used
    with a warning map to the warning's words. `outside` is a folder outside `folder` (for the escaping link).
    """
    folder, outside = Path(folder), Path(outside)
    folder.mkdir(parents=True, exist_ok=True)

    def caption(name: str, text: str = "a red square moving right") -> None:
        (folder / name).with_suffix(".txt").write_text(text, encoding="utf-8")

    expect: dict[str, str] = {}
    (folder / "zero.mp4").write_bytes(b"")
    caption("zero.mp4")
    expect["zero.mp4"] = "is empty (0 bytes)"
    write_video(folder / "whole.mp4", frames=10, width=48, height=40)
    (folder / "truncated.mp4").write_bytes(
        (folder / "whole.mp4").read_bytes()[:1500]
    )  # moov at the end: lost
    (folder / "whole.mp4").unlink()
    caption("truncated.mp4")
    expect["truncated.mp4"] = "has no audio or video streams (a truncated or damaged file?)"
    write_truncated(folder / "cut.mp4", frames=20, keep=0.3)  # header says 20 frames, few are there
    caption("cut.mp4")
    expect["cut.mp4"] = "cannot be decoded"
    write_corrupt(folder / "random.mp4")
    caption("random.mp4")
    expect["random.mp4"] = "cannot be decoded"
    write_unknown_codec(folder / "codec.mkv")
    caption("codec.mkv")
    expect["codec.mkv"] = "codec this FFmpeg build cannot decode"
    write_video(folder / "one_frame.mp4", frames=1, width=48, height=40)
    caption("one_frame.mp4")
    expect["one_frame.mp4"] = "has 1 frame; the shortest frame bucket is 9"
    write_video(folder / "short.mp4", frames=5, width=48, height=40)
    caption("short.mp4")
    expect["short.mp4"] = "has 5 frames; the shortest frame bucket is 9"
    write_video(folder / "big.mp4", frames=10, width=1920, height=1080)
    caption("big.mp4")
    expect["big.mp4"] = ""
    write_video(folder / "nocaption.mp4", frames=10, width=48, height=40, color=(0, 200, 0))
    expect["nocaption.mp4"] = "has no caption file (expected nocaption.txt)"
    write_video(folder / "emptycaption.mp4", frames=10, width=48, height=40, color=(0, 0, 255))
    caption("emptycaption.mp4", "  \n ")
    expect["emptycaption.mp4"] = "has an empty caption"
    write_video(folder / "latin.mp4", frames=10, width=48, height=40, color=(255, 255, 0))
    (folder / "latin.txt").write_bytes("a caf\xe9 sign".encode("latin-1"))
    expect["latin.mp4"] = "latin.txt is not valid UTF-8"
    write_video(outside / "secret.mp4", frames=10, width=48, height=40)
    (folder / "escape.mp4").symlink_to(outside / "secret.mp4")
    caption("escape.mp4")
    expect["escape.mp4"] = "symlink pointing outside the dataset root"
    write_video(folder / "locked.mp4", frames=10, width=48, height=40, color=(0, 255, 255))
    caption("locked.mp4")
    expect["locked.mp4"] = "permission denied"  # chmod 000 does not stop root: tests deny it via os.access
    write_video(folder / "twin.mp4", frames=10, width=48, height=40)
    write_video(folder / "twin.webm", frames=10, width=48, height=40, color=(0, 0, 255))
    caption("twin.mp4", "two files share this caption")
    expect["twin.mp4"] = "shares the caption twin.txt with twin.webm"
    expect["twin.webm"] = "shares the caption twin.txt with twin.mp4"
    write_image(folder / "still.png", 40, 40)
    caption("still.png", "a blue square")
    expect["still.png"] = ""
    return expect
