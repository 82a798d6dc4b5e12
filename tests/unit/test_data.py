"""Discovery (names, captions, errors) and decoding (shape, range, crop, failures) on tiny files."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.data import Item, MediaError, discover, load_clip
from finetune.errors import UserError
from tests.clips import write_audio_only, write_corrupt, write_image, write_video


def _touch(path: Path, text: str | None = None) -> None:
    """A media file by name only (discovery never decodes), plus its caption when `text` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    if text is not None:
        path.with_suffix(".txt").write_text(text, encoding="utf-8")


# --- discovery ---------------------------------------------------------------------------------


def test_discover_nested_sorted_with_captions(tmp_path):
    _touch(tmp_path / "b" / "z.mp4", "  a dog\n runs\tfast  ")
    _touch(tmp_path / "a.png", "a still")
    _touch(tmp_path / "b" / "a.webm", "first in b")
    _touch(tmp_path / "b-c.mov", "sorts after folder b")

    items, problems = discover(tmp_path)

    assert [i.path.relative_to(tmp_path.resolve()).as_posix() for i in items] == [
        "a.png",
        "b/a.webm",
        "b/z.mp4",
        "b-c.mov",
    ]
    assert problems == []
    assert all(i.path.is_absolute() and i.has_caption for i in items)
    assert items[2].caption == "a dog runs fast"  # whitespace collapsed
    assert [i.is_image for i in items] == [True, False, False, False]


def test_missing_caption_is_a_warning_with_empty_caption(tmp_path):
    _touch(tmp_path / "clip.mp4")
    _touch(tmp_path / "other.mp4", "captioned")

    items, problems = discover(tmp_path)

    assert items[0] == Item(tmp_path.resolve() / "clip.mp4", "", has_caption=False, is_image=False)
    assert len(problems) == 1
    assert problems[0].path.name == "clip.mp4"
    assert "expected clip.txt" in problems[0].reason


def test_missing_caption_under_strict_raises(tmp_path):
    _touch(tmp_path / "clip.mp4")
    with pytest.raises(UserError, match=r"clip\.mp4.*data\.strict=false"):
        discover(tmp_path, strict=True)


def test_hidden_and_unknown_files_ignored_upper_case_accepted(tmp_path):
    _touch(tmp_path / "CLIP.MP4", "upper")
    _touch(tmp_path / ".hidden.mp4", "hidden file")
    _touch(tmp_path / ".cache" / "inside.mp4", "hidden folder")
    _touch(tmp_path / "notes.pdf")
    _touch(tmp_path / "model.safetensors")

    items, problems = discover(tmp_path)

    assert [i.path.name for i in items] == ["CLIP.MP4"]
    assert items[0].caption == "upper"
    assert problems == []


def test_caption_with_bom_and_latin1(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_bytes("\ufeffcafé at night".encode())
    (tmp_path / "b.mp4").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes("café".encode("latin-1"))

    items, _ = discover(tmp_path)

    assert [i.caption for i in items] == ["café at night", "café"]


def test_bad_root_and_empty_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"data\.path: .*does not exist"):
        discover(tmp_path / "nope")
    _touch(tmp_path / "file.mp4")
    with pytest.raises(UserError, match=r"data\.path: .*not a folder"):
        discover(tmp_path / "file.mp4")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no media here")
    with pytest.raises(UserError, match=r"no videos or images.*\.mp4"):
        discover(tmp_path / "empty")


# --- decoding ----------------------------------------------------------------------------------


def test_video_shape_range_and_colors(tmp_path):
    path = write_video(tmp_path / "clip.mp4", frames=20, width=64, height=48)

    video = load_clip(path, width=32, height=32, frames=17)

    assert video.shape == (3, 17, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    # A corner is always gray background (128 → ~0.0); the middle of frame 0 is inside the red square.
    assert torch.allclose(video[:, :, 0, 0], torch.zeros(3, 17), atol=0.06)
    red = video[:, 0, 16, 12]
    assert red[0] > 0.8 and red[1] < -0.7 and red[2] < -0.7


def test_video_frames_are_the_first_ones_in_order(tmp_path):
    path = write_video(tmp_path / "clip.mp4", frames=20, width=64, height=48)

    video = load_clip(path, width=64, height=48, frames=17)

    # The square moves right over time, so its centroid column must grow frame by frame.
    is_red = (video[0] > 0.5) & (video[1] < -0.5)  # (F, H, W)
    columns = torch.arange(64, dtype=torch.float32)
    centroid = [(is_red[f].float().sum(0) * columns).sum() / is_red[f].sum() for f in range(17)]
    assert (torch.stack(centroid[::4]).diff() > 0).all()
    assert centroid[0] == pytest.approx(16 + 7.5, abs=1.0)  # frame 0: square at x=16..31


def test_too_short_video_names_frame_counts(tmp_path):
    path = write_video(tmp_path / "short.mp4", frames=9, width=32, height=32)
    with pytest.raises(MediaError, match="has 9 frames; needs 17"):
        load_clip(path, width=32, height=32, frames=17)


@pytest.mark.parametrize("name", ["broken.mp4", "broken.gif", "broken.png"])
def test_corrupt_file_raises_media_error(tmp_path, name):
    path = write_corrupt(tmp_path / name)
    with pytest.raises(MediaError, match="cannot be decoded") as caught:
        load_clip(path, width=32, height=32, frames=1)
    assert "\n" not in str(caught.value)


def test_missing_file_raises_media_error(tmp_path):
    with pytest.raises(MediaError, match="cannot be decoded"):
        load_clip(tmp_path / "gone.mp4", width=32, height=32, frames=1)


def test_file_without_video_stream_raises_media_error(tmp_path):
    with pytest.raises(MediaError, match="no video stream"):
        load_clip(write_audio_only(tmp_path / "sound.mkv"), width=32, height=32, frames=1)


def test_image_is_one_frame(tmp_path):
    path = write_image(tmp_path / "still.jpg", 40, 30, color=(0, 0, 255))

    image = load_clip(path, width=24, height=16, frames=17)

    assert image.shape == (3, 1, 16, 24)
    assert torch.allclose(image[:, 0, 8, 12], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)


def test_cover_resize_then_center_crop(tmp_path):
    # 64×32: green | red | blue | green, split at columns 12, 32, 52. The kept middle (columns 16-48)
    # sits 4 columns inside the green so the resize filter's reach never blends green in.
    path = write_image(tmp_path / "split.png", 64, 32, color=(0, 255, 0))
    with Image.open(path) as im:
        im.load()
    im.paste((255, 0, 0), (12, 0, 32, 32))
    im.paste((0, 0, 255), (32, 0, 52, 32))
    im.save(path)

    square = load_clip(path, width=16, height=16, frames=1)[:, 0]

    # Covering 16×16 scales 64×32 to 32×16 and keeps the middle 16 columns: red then blue, split at
    # column 8. A squashing resize would show the green stripes at the edges instead.
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    assert torch.allclose(square[:, :, 0], red[:, None].expand(3, 16), atol=0.05)
    assert torch.allclose(square[:, :, 15], blue[:, None].expand(3, 16), atol=0.05)
    assert (square[0, :, :8] > square[2, :, :8]).all() and (square[2, :, 8:] > square[0, :, 8:]).all()


def test_image_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90° clockwise → red top, blue bottom
    image.save(tmp_path / "phone.png", exif=exif)

    upright = load_clip(tmp_path / "phone.png", width=16, height=32, frames=1)[:, 0]

    assert upright[0, 2, 8] > 0.9 and upright[2, 2, 8] < -0.9
    assert upright[2, 29, 8] > 0.9 and upright[0, 29, 8] < -0.9


def test_gif_decodes(tmp_path):
    path = write_video(tmp_path / "anim.gif", frames=6, width=32, height=24)

    video = load_clip(path, width=32, height=24, frames=5)

    assert video.shape == (3, 5, 24, 32)
    assert not torch.equal(video[:, 0], video[:, 4])  # the square moved
