"""Generation modes on the tiny Wan (2.1 T2V): video-to-video restyle (SDEdit through WanVideoToVideoPipeline)
writes the requested frames; the modes Wan T2V cannot run, and contradictory flags, are one clear line."""

from __future__ import annotations

import av
import pytest

from finetune.cli import main
from finetune.errors import UserError
from finetune.generate import GenerateSettings, generation_mode
from tests.clips import write_image, write_video
from tests.tiny import build_tiny_wan


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-modes")
    return root, build_tiny_wan(root / "base"), write_video(root / "in.mp4", 12, 48, 32, color=(0, 0, 255))


def args(base, out, *extra):
    return ["generate", "--model", str(base), "--prompt", "a red square", "--width", "48", "--height", "32",
            "--frames", "9", "--steps", "2", "--max-sequence-length", "16", "--out", str(out), *map(str, extra)]  # fmt: skip


def test_video_to_video_writes_the_requested_frames(wan):
    root, base, clip = wan
    assert main(args(base, root / "v2v.mp4", "--video", clip, "--strength", "0.5")) == 0
    with av.open(str(root / "v2v.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)


@pytest.mark.parametrize("flag", ["--extend", "--image"])
def test_a_mode_wan_t2v_cannot_run_is_one_line(wan, flag, capsys):
    root, base, clip = wan
    media = clip if flag == "--extend" else write_image(root / "f.png", 48, 32)
    assert main(args(base, root / "x.mp4", flag, media)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "the wan family cannot do this; families that can: " in err[-1]
    assert "ltx" in err[-1] and not any("Loading" in line for line in err)  # refused before any weights load


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"last_image": "b.png"}, "--last-image: give the first frame too with --image"),
        ({"video": "a.mp4", "extend": "b.mp4"}, "--video and --extend: give one of"),
        ({"video": "a.mp4", "strength": 1.5}, "--strength 1.5: expected a number in (0, 1]"),
    ],
)
def test_contradictory_flags_are_named(settings, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("]", r"\]").replace("[", r"\[")):
        generation_mode(GenerateSettings(prompt="a", **settings))


def test_modes_are_chosen_from_the_flags():
    assert generation_mode(GenerateSettings(prompt="a")) == "t2v"
    assert generation_mode(GenerateSettings(prompt="a", image="a.png")) == "image"
    assert generation_mode(GenerateSettings(prompt="a", image="a.png", last_image="b.png")) == "last_image"
    assert generation_mode(GenerateSettings(prompt="a", video="a.mp4")) == "video"
    assert generation_mode(GenerateSettings(prompt="a", extend="a.mp4")) == "extend"
