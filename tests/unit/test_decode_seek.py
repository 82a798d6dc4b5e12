"""Display rotation (portrait phone clips) and seeking: frames come out as displayed, and a window decoded after
a keyframe seek is pixel-equal to the same window decoded from the start."""

import subprocess
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest

from finetune.data import seek
from finetune.data.decode import decode_windows, probe, turns_from
from tests.clips import frame_pattern


def write_rotated(
    path: Path, degrees: float, width: int = 64, height: int = 32, frames: int = 3
) -> np.ndarray:
    """A clip stored width x height with a display matrix turning it `degrees` counterclockwise (what a phone
    writes for a portrait clip: -90). The stored picture has a white block in its top-left corner and a red one
    in its bottom-right. Returns the stored picture."""
    picture = np.full((height, width, 3), 128, np.uint8)
    picture[: height // 2, : width // 4] = 255
    picture[height // 2 :, 3 * width // 4 :] = (255, 0, 0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0"}
        stream.set_display_rotation(degrees)
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return picture


def ffmpeg_displayed(path: Path, width: int, height: int) -> np.ndarray:
    """The first frame as the ffmpeg program shows it (it applies the display matrix by default): an
    independent reference for which way a rotation goes."""
    raw = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
         "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return np.frombuffer(raw, np.uint8).reshape(height, width, 3)


def _as_uint8(video) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return ((video.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("degrees", "turned"), [(-90, 270), (90, 90), (180, 180)])
def test_rotated_clip_is_probed_and_decoded_as_displayed(tmp_path, degrees, turned):
    path = tmp_path / "portrait.mp4"
    write_rotated(path, degrees)  # stored 64 wide, 32 high
    shown_w, shown_h = (32, 64) if turned in (90, 270) else (64, 32)

    info = probe(path)
    assert (info.width, info.height, info.rotation) == (shown_w, shown_h, turned)

    _, video = next(decode_windows(path, [(0, 1, 2)], shown_w, shown_h))
    reference = ffmpeg_displayed(path, shown_w, shown_h)
    white = reference.min(axis=2) > 230
    assert white.mean() > 0.1
    for ours in _as_uint8(video):  # every frame, not only the first, carries the rotation
        assert ours.shape == reference.shape
        # Lossless source, same size: only the YUV->RGB rounding of two converters differs.
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 6
        # and not merely "close to gray everywhere": the white block is where ffmpeg puts it
        assert (ours[white].min(axis=1) > 220).all()


def test_rotated_clip_is_scaled_to_its_displayed_shape(tmp_path):
    path = tmp_path / "portrait.mp4"
    write_rotated(path, -90, width=128, height=64)  # displayed 64 wide, 128 high
    _, video = next(decode_windows(path, [(0,)], 32, 64))  # half the displayed size: a plain downscale
    ours = _as_uint8(video)[0]
    reference = ffmpeg_displayed(path, 64, 128)[::2, ::2]
    # The blocks' edges are blurred differently by the two scalers; their bodies must agree.
    assert np.mean(np.abs(ours.astype(int) - reference.astype(int)) > 40) < 0.05


def test_rotation_sources_and_signs():
    assert turns_from(90.0, None) == 1  # display matrix: counterclockwise degrees
    assert turns_from(-90.0, None) == 3
    assert turns_from(None, "90") == 3  # legacy `rotate` tag: clockwise degrees
    assert turns_from(None, "180") == 2
    assert turns_from(0.0, "90") == 0  # a matrix that says upright wins over a stray tag
    assert turns_from(None, None) == 0 and turns_from(None, "sideways") == 0


def write_gop_clip(path: Path, frames: int, gop: int, bframes: int = 3, width: int = 64, height: int = 48):
    """Every frame different (a moving square plus a per-frame gray level), a keyframe every `gop` frames,
    B-frames on, so decode order differs from presentation order."""
    codec = "libvpx" if path.suffix == ".webm" else "libx264"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "g": str(gop), "keyint_min": str(gop), "bf": str(bframes)}
        else:
            stream.options = {"crf": "4", "b": "2M", "g": str(gop), "keyint_min": str(gop)}
        for i in range(frames):
            picture = frame_pattern(i, frames, width, height, (255, 0, 0))
            picture[:8, :8] = (i * 9) % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return path


def _decoded_indices(path: Path, needed: list[int]) -> list[int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return [index for index, _ in seek.indexed_frames(path, container, stream, needed)]


def _windows(path, windows, monkeypatch, seeking: bool):
    monkeypatch.setattr(seek, "SEEK_MIN_SKIP", 16 if seeking else 10**9)
    return dict(decode_windows(path, windows, 64, 48))


@pytest.mark.parametrize("name", ["gop.mp4", "gop.mkv", "gop.webm"])
def test_seek_gives_the_frames_of_a_decode_from_the_start(tmp_path, monkeypatch, name):
    path = write_gop_clip(tmp_path / name, frames=120, gop=12)
    windows = [tuple(range(50, 59)), tuple(range(90, 99)), (111, 113, 115, 117, 119)]

    seeking = _windows(path, windows, monkeypatch, seeking=True)
    from_start = _windows(path, windows, monkeypatch, seeking=False)

    assert sorted(seeking) == [0, 1, 2]
    for number in from_start:
        assert seeking[number].shape == (3, len(windows[number]), 48, 64)
        assert bool((seeking[number] == from_start[number]).all()), f"window {number} differs"
    # The right frames, not just the same ones: the corner's gray level encodes the frame index.
    corner = _as_uint8(seeking[1])[:, 2, 2, 0].astype(int)
    assert np.abs(corner - [(i * 9) % 256 for i in windows[1]]).max() <= 3

    # ...and the seek really skipped: decoding starts at the keyframe before 50 (48, or 50 on a keyframe-exact
    # demuxer), jumps to the one before 90, and never decodes most of the clip.
    monkeypatch.setattr(seek, "SEEK_MIN_SKIP", 16)
    decoded = _decoded_indices(path, sorted({i for w in windows for i in w}))
    assert decoded[0] in (48, 50) and 60 not in decoded and decoded[-1] == 119
    assert len(decoded) < 60


def test_a_seek_that_lands_too_late_falls_back_to_counting(tmp_path, monkeypatch):
    path = write_gop_clip(tmp_path / "gop.mp4", frames=72, gop=12)
    real = seek.frame_table(path)
    # Every keyframe's seek target moved to the next keyframe's: the demuxer then lands after the frame we want.
    shifted = seek.FrameTable(real.rank, real.key_indices, real.key_seek[1:] + real.key_seek[-1:])
    monkeypatch.setattr(seek, "frame_table", lambda p: shifted)
    window = [tuple(range(40, 49))]

    fallback = _windows(path, window, monkeypatch, seeking=True)
    from_start = _windows(path, window, monkeypatch, seeking=False)

    assert bool((fallback[0] == from_start[0]).all())


def test_no_seek_for_short_gaps():
    skip = seek.SEEK_MIN_SKIP
    assert not seek.worth_seeking(list(range(0, 17)))
    assert not seek.worth_seeking([0, 10, 20, 30])  # uniform over a short clip: gaps of 9
    assert not seek.worth_seeking([skip - 1, skip]) and not seek.worth_seeking([0, skip])
    assert seek.worth_seeking([skip, skip + 1]) and seek.worth_seeking([0, 1, skip + 2])


def test_exif_rotated_image_is_probed_as_displayed(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (32, 16), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise, i.e. 270 counterclockwise
    image.save(tmp_path / "phone.jpg", exif=exif)
    info = probe(tmp_path / "phone.jpg")
    assert (info.width, info.height, info.rotation) == (16, 32, 270)
