"""Discovery (names, captions, errors) and decoding (shape, range, crop, failures) on tiny files."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.data import Item, MediaError, decode_windows, discover, load_clip, probe
from finetune.errors import UserError
from tests.clips import (
    write_audio_only,
    write_corrupt,
    write_image,
    write_truncated,
    write_unknown_codec,
    write_video,
)


def _touch(path: Path, text: str | None = None) -> None:
    """A media file by name only (discovery never decodes), plus its caption when `text` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded")  # not empty: discovery reports 0-byte files
    if text is not None:
        path.with_suffix(".txt").write_text(text, encoding="utf-8")


# --- discovery ---------------------------------------------------------------------------------


def test_discover_nested_sorted_with_captions(tmp_path):
    _touch(tmp_path / "b" / "z.mp4", "  a dog  runs\tfast  ")
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


def test_caption_with_bom_and_non_utf8_bytes_replaced_and_warned(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "a.txt").write_bytes("\ufeffcafé at night".encode())
    (tmp_path / "b.mp4").write_bytes(b"x")
    (tmp_path / "b.txt").write_bytes("café".encode("latin-1"))

    items, problems = discover(tmp_path)

    assert [i.caption for i in items] == ["café at night", "caf\ufffd"]
    assert [(p.path.name, p.kind) for p in problems] == [("b.mp4", "warning")]
    assert "b.txt is not valid UTF-8 (byte 3)" in problems[0].reason


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


# --- issue 8: probing, windows, bad inputs ------------------------------------------------------


def test_probe_reads_size_length_and_rate_without_decoding_the_clip(tmp_path):
    info = probe(write_video(tmp_path / "clip.mp4", frames=20, width=64, height=48, fps=12))
    assert (info.width, info.height, info.frames, info.fps, info.is_image) == (64, 48, 20, 12.0, False)
    assert info.seconds == pytest.approx(20 / 12)
    webm = probe(write_video(tmp_path / "clip.webm", frames=7, width=32, height=32))
    assert (webm.frames, webm.header_frames) == (7, 0)  # webm does not say; the packets are counted
    image = probe(write_image(tmp_path / "still.png", 40, 30))
    assert (image.width, image.height, image.frames, image.is_image) == (40, 30, 1, True)


def test_probe_names_each_bad_file(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    cases = {
        tmp_path / "zero.mp4": "cannot be decoded",
        write_corrupt(tmp_path / "random.mp4"): "cannot be decoded: Invalid data",
        write_unknown_codec(tmp_path / "codec.mkv"): "uses a video codec this FFmpeg build cannot decode",
        write_audio_only(tmp_path / "sound.mkv"): "has no video stream",
        write_corrupt(tmp_path / "broken.png"): "cannot be decoded",
    }
    for path, words in cases.items():
        with pytest.raises(MediaError, match=words):
            probe(path)


def test_truncated_faststart_mp4_reports_fewer_readable_frames_than_its_header(tmp_path):
    path = write_truncated(tmp_path / "cut.mp4", frames=40, width=32, height=32, keep=0.9)
    info = probe(path)
    assert info.header_frames == 40 and 0 < info.frames < 40
    with pytest.raises(MediaError, match="(cannot be decoded after|has) [0-9]+ frames"):
        list(decode_windows(path, [tuple(range(40))], 32, 32))


def test_decode_windows_yields_each_window_once_in_completion_order(tmp_path):
    path = write_video(tmp_path / "clip.mp4", frames=30, width=64, height=48)
    windows = [(10, 11, 12), (0, 1, 2), (2, 3, 4)]

    got = list(decode_windows(path, windows, 32, 32))

    assert [n for n, _ in got] == [1, 2, 0]  # by last frame: 2, 4, 12
    full = load_clip(path, 32, 32, 13)
    for number, video in got:
        assert video.shape == (3, 3, 32, 32)
        assert torch.equal(video, full[:, list(windows[number])])


def test_decode_windows_past_the_end_names_the_count(tmp_path):
    path = write_video(tmp_path / "clip.mp4", frames=6, width=32, height=32)
    with pytest.raises(MediaError, match="has 6 frames; needs 9"):
        list(decode_windows(path, [tuple(range(9))], 32, 32))


def test_1080p_clip_is_downscaled_frame_by_frame_never_held_full_size(tmp_path):
    """Each decoded frame goes YUV -> small RGB in swscale, so memory does not grow with the clip's length at
    source size. In a fresh process: decode 3 frames (the decoder's own buffers, which depend on its thread
    count, reach their peak), then 33 frames; the second may add under 40 MiB of peak RSS. Holding the 30
    extra frames at 1920x1080, as RGB images, would add 30 x 6.2 MB = 187 MB (measured: ~270 MiB)."""
    import subprocess
    import sys

    path = write_video(tmp_path / "big.mp4", frames=33, width=1920, height=1080)
    script = (
        "import resource, sys\n"
        "from finetune.data import load_clip\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "load_clip(sys.argv[1], 64, 32, 3)\n"
        "before = peak()\n"
        "video = load_clip(sys.argv[1], 64, 32, 33)\n"
        "print(list(video.shape), peak() - before, float(video[:, :, 0, 0].abs().max()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    shape, added_mib, corner = out.stdout.rsplit(" ", 2)
    assert shape == "[3, 33, 32, 64]"
    assert int(added_mib) < 40, f"33 frames added {added_mib} MiB over 3 frames: frames held at full size"
    assert float(corner) < 0.06  # the corner is gray background: the picture survived the scaling


def test_unreadable_file_is_reported_not_opened(tmp_path, monkeypatch):
    import importlib

    discover_module = importlib.import_module("finetune.data.discover")
    _touch(tmp_path / "locked.mp4", "a caption")
    _touch(tmp_path / "open.mp4", "a caption")
    monkeypatch.setattr(discover_module, "can_read", lambda path: path.name != "locked.mp4")

    items, problems = discover(tmp_path)

    assert [i.path.name for i in items] == ["open.mp4"]
    assert [(p.path.name, p.reason, p.kind) for p in problems] == [
        ("locked.mp4", "cannot be read (permission denied)", "error")
    ]


def test_permission_error_while_decoding_is_a_media_error(tmp_path, monkeypatch):
    import av

    path = write_video(tmp_path / "clip.mp4", frames=3, width=32, height=32)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(av, "open", denied)
    with pytest.raises(MediaError, match=r"cannot be read \(permission denied\)"):
        probe(path)
    with pytest.raises(MediaError, match=r"cannot be read \(permission denied\)"):
        load_clip(path, 32, 32, 1)


def test_zero_byte_file_duplicate_stems_empty_and_multiline_captions(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    _touch(tmp_path / "a.mp4", "shared")
    _touch(tmp_path / "a.webm")
    _touch(tmp_path / "blank.mp4", " \n\t\n")
    _touch(tmp_path / "multi.mp4", "first caption\n\n  second   caption \n")

    items, problems = discover(tmp_path)

    assert {i.path.name: i.captions for i in items} == {
        "a.mp4": ("shared",),
        "a.webm": ("shared",),
        "blank.mp4": (),
        "multi.mp4": ("first caption", "second caption"),
    }
    reasons = {(p.path.name, p.reason, p.kind) for p in problems}
    assert reasons == {
        ("zero.mp4", "is empty (0 bytes)", "error"),
        ("a.mp4", "shares the caption a.txt with a.webm (same stem)", "warning"),
        ("a.webm", "shares the caption a.txt with a.mp4 (same stem)", "warning"),
        ("blank.mp4", "has an empty caption; trained with an empty caption", "warning"),
    }


def test_strict_turns_any_problem_into_one_clear_error(tmp_path):
    _touch(tmp_path / "ok.mp4", "fine")
    _touch(tmp_path / "blank.mp4", "")
    with pytest.raises(UserError, match=r"blank\.mp4: has an empty caption.*data\.strict=true"):
        discover(tmp_path, strict=True)


# --- plan: probe + buckets + windows ------------------------------------------------------------


def test_plan_buckets_windows_repeats_and_drops_with_reasons(tmp_path):
    from finetune.config import build_recipe
    from finetune.data.plan import make_plan
    from finetune.data.sources import collect
    from finetune.models import get_family

    write_video(tmp_path / "wide.mp4", frames=40, width=64, height=32)
    write_video(tmp_path / "tall.mp4", frames=20, width=32, height=96, fps=16)
    write_video(tmp_path / "short.mp4", frames=6, width=32, height=32)
    write_image(tmp_path / "still.png", 32, 32)
    for name in ("wide", "tall", "short", "still"):
        (tmp_path / f"{name}.txt").write_text(f"a {name} thing")
    data = {"path": str(tmp_path), "width": 32, "height": 32, "frame_buckets": [9, 17, 18],
            "frame_extraction": "chain", "repeats": 2}  # fmt: skip
    recipe = build_recipe({"model": {"path": "a/b"}, "data": data})
    specs, items, problems = collect(recipe.data)

    plan = make_plan(recipe, get_family("wan"), specs, items, problems)

    got = sorted((s.item.path.name, s.bucket, s.indices[:1], s.repeats) for s in plan.samples)
    assert got == [
        ("still.png", "32x32x1", (), 2),
        ("tall.mp4", "16x64x17", (0,), 2),  # 1:3 -> 16x64 (1:4) is nearer than 32x32 (1:1) in log distance
        ("wide.mp4", "48x16x17", (0,), 2),  # 40 frames, chain: windows at 0 and 17
        ("wide.mp4", "48x16x17", (17,), 2),
    ]
    assert [(p.path.name, p.reason, p.kind) for p in plan.problems] == [
        ("short.mp4", "has 6 frames; the shortest frame bucket is 9", "dropped")
    ]
    assert (plan.width, plan.height, plan.frames) == (32, 32, 17)
    assert plan.histogram() == {"32x32x1": 1, "16x64x17": 1, "48x16x17": 2}
    assert any("frame buckets [9, 17, 18] -> [9, 17]" in note for note in plan.notes)


# --- caption choice and dropout at load time ------------------------------------------------------


def test_cached_items_pick_a_caption_per_load_and_drop_to_the_empty_prompt(tmp_path):
    from safetensors.torch import save_file

    from finetune.data.batches import CachedItems, TextChoice

    shard = tmp_path / "item.safetensors"
    texts = {
        "text": torch.full((2, 4), 0.0),
        "text.1": torch.full((3, 4), 1.0),
        "text.2": torch.full((1, 4), 2.0),
    }
    save_file({"latents": torch.zeros(16, 1, 2, 2), **texts}, str(shard))
    save_file({"text": torch.full((1, 4), -1.0)}, str(tmp_path / "empty.safetensors"))

    plain = CachedItems([shard] * 2)
    picks = [float(plain[i % 2]["text"][0, 0]) for i in range(60)]
    assert set(picks) == {0.0, 1.0, 2.0}  # every variant comes up
    again = CachedItems([shard] * 2)
    assert [float(again[i % 2]["text"][0, 0]) for i in range(60)] == picks  # same seed, same picks

    dropping = CachedItems([shard], TextChoice(0.5, tmp_path / "empty.safetensors", seed=1))
    values = [float(dropping[0]["text"][0, 0]) for _ in range(400)]
    assert 150 < values.count(-1.0) < 250  # about half the loads train on the empty prompt
    assert set(values) == {-1.0, 0.0, 1.0, 2.0}
