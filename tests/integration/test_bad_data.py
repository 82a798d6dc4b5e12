"""Issue 8's bad inputs in one folder, plus a metadata.jsonl dataset whose rows try to leave its root:
`check-data --json` names every one with its reason, `cache` skips them and caches every good item (exit 0);
a `cache` killed with SIGKILL leaves only complete shards and the rerun encodes only the rest; two recipes
sharing a cache dir never clobber each other; `cache --clean` removes what no recipe can use again."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import yaml
from safetensors.torch import load_file

from finetune.cli import main
from tests.clips import write_bad_dataset, write_video
from tests.tiny import build_tiny_wan


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("base") / "wan")


@pytest.fixture
def deny_locked(monkeypatch):
    """Tests run as root, which ignores chmod 000: deny `locked.mp4` where the kit asks whether it may read."""
    # importlib: `finetune.data.discover` as an attribute is the function the package re-exports
    discover = importlib.import_module("finetune.data.discover")

    real = discover.can_read
    monkeypatch.setattr(discover, "can_read", lambda path: real(path) and path.name != "locked.mp4")


def write_recipe(path: Path, base: Path, work: Path, data: dict, output: str = "adapter") -> Path:
    recipe = {
        "model": {"path": str(base)},
        "data": {"width": 32, "height": 32, "frames": 9, **data},
        "cache": {"dir": str(work / "cache"), "max_sequence_length": 16},
        "output": {"dir": str(work / output)},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def messy(tmp_path, base):
    expect = write_bad_dataset(tmp_path / "bad", tmp_path / "outside")
    (tmp_path / "bad" / "big.txt").write_text("a red square moving right " * 6)  # 31 tokens; the limit is 16
    meta = tmp_path / "meta"
    write_video(meta / "clips" / "good.mp4", frames=10, width=48, height=40, color=(200, 0, 200))
    write_video(tmp_path / "x.mp4", frames=10, width=48, height=40)  # beside the root, not inside it
    rows = [
        {"file_name": "clips/good.mp4", "text": "a purple square"},
        {"file_name": "../x.mp4", "text": "climbs out"},
        {"file_name": str(tmp_path / "x.mp4"), "text": "absolute"},
        {"file_name": "clips/missing.mp4", "text": "not there"},
    ]
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    datasets = [{"path": str(tmp_path / "bad")}, {"path": str(meta), "repeats": 2, "trigger": "zz"}]
    recipe = write_recipe(tmp_path / "recipe.yaml", base, tmp_path, {"datasets": datasets})
    return {"recipe": recipe, "expect": expect, "root": tmp_path}


def test_check_data_json_names_every_bad_input_with_its_reason(messy, deny_locked, monkeypatch, capsys):
    opened = []
    real_open = av.open
    monkeypatch.setattr(
        av, "open", lambda file, *a, **k: opened.append(Path(file).resolve()) or real_open(file, *a, **k)
    )

    assert main(["check-data", str(messy["recipe"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    named = {}
    for key in ("errors", "dropped", "warnings"):
        for row in report[key]:
            named.setdefault(Path(row["file"]).name, []).append((key, row["reason"]))
    for name, words in messy["expect"].items():
        if not words:  # a good file: never in errors or dropped
            assert all(key == "warnings" for key, _ in named.get(name, [])), (name, named.get(name))
        else:
            assert any(words in reason for _, reason in named.get(name, [])), (name, words, named.get(name))
    meta_rows = {
        row["file"]: row["reason"] for row in report["errors"] if "metadata.jsonl line" in row["reason"]
    }
    assert "points outside the dataset root" in meta_rows["../x.mp4"]
    assert "points outside the dataset root" in meta_rows[str(messy["root"] / "x.mp4")]
    assert "does not exist" in next(r for f, r in meta_rows.items() if f.endswith("missing.mp4"))
    # Counted: files that could be opened (not zero.mp4, escape.mp4, locked.mp4). Good: big, nocaption,
    # emptycaption, latin, twin.mp4, twin.webm, still.png, and good.mp4 (repeats 2).
    assert (report["videos"], report["images"], report["usable_files"], report["samples"]) == (13, 1, 8, 8)
    assert report["items"] == 9 and sum(report["buckets"].values()) == 8
    assert report["buckets"]["32x32x1"] == 1  # the still
    assert report["captions"]["missing"] == 1 and report["captions"]["empty"] == 1
    assert report["captions"]["over_token_limit"] == [str(messy["root"] / "bad" / "big.mp4")]
    # Nothing outside a root was ever opened, and neither was the unreadable file.
    secret = (messy["root"] / "outside" / "secret.mp4").resolve()
    assert secret not in opened and (messy["root"] / "x.mp4").resolve() not in opened
    assert not any(p.name == "locked.mp4" for p in opened)


def test_cache_skips_every_bad_input_caches_the_rest_and_exits_0(messy, deny_locked, capsys):
    assert main(["cache", str(messy["recipe"])]) == 0
    err = capsys.readouterr().err
    assert "cache: 0 cached, 8 new" in err
    assert "big.mp4: caption is 31 tokens; the text encoder keeps 16" in err
    for name, words in messy["expect"].items():
        if words:
            assert f"{name}: " in err and words in err, name
    cache = messy["root"] / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    sources = sorted(Path(e["source"]).name for e in manifest["entries"].values())
    assert sources == sorted(["big.mp4", "emptycaption.mp4", "good.mp4", "latin.mp4", "nocaption.mp4",
                              "still.png", "twin.mp4", "twin.webm"])  # fmt: skip
    good = next(e for e in manifest["entries"].values() if e["source"].endswith("good.mp4"))
    assert good["caption"] == "zz a purple square"  # the second dataset's own trigger
    big = next(e for e in manifest["entries"].values() if e["source"].endswith("big.mp4"))
    # 1920x1080 (16:9) went to the widest bucket near 32x32 at Wan's 16-pixel step: 48x16, 9 frames.
    assert big["bucket"] == "48x16x9" and big["latent_shape"] == [16, 3, 2, 6]
    for entry in manifest["entries"].values():
        assert load_file(str(cache / entry["file"]))["latents"].shape[0] == 16

    assert main(["cache", str(messy["recipe"]), "data.strict=true"]) == 2
    assert "data.strict=true" in capsys.readouterr().err


def _six_clips(folder: Path) -> Path:
    for i in range(6):
        write_video(folder / f"clip{i}.mp4", frames=10, width=32, height=32, color=(40 * i, 255 - 40 * i, 0))
        (folder / f"clip{i}.txt").write_text(f"clip number {i}")
    return folder


HANG_ON_FOURTH_SHARD = """
import sys, time
from pathlib import Path
import finetune.io as io
real, count = io._publish, [0]
def publish(tmp, path):
    if path.parent.name == "items":
        count[0] += 1
        if count[0] == 4:  # the 4th shard is fully written to its temp file, not yet renamed
            Path(sys.argv[2]).write_text("now")
            time.sleep(600)
    real(tmp, path)
io._publish = publish
from finetune.cli import main
sys.exit(main(["cache", sys.argv[1]]))
"""


def test_sigkill_mid_cache_leaves_only_complete_shards_and_rerun_encodes_the_rest(tmp_path, base, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", base, tmp_path, {"path": str(_six_clips(tmp_path / "clips"))})
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", HANG_ON_FOURTH_SHARD, str(recipe), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the cache run never reached shard 4"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    items = tmp_path / "cache" / "items"
    shards = sorted(items.glob("*.safetensors"))
    assert len(shards) == 3 and len(list(items.glob(".*.tmp"))) == 1  # three done, one caught mid-write
    for shard in shards:  # every file that claims to be a shard is complete
        assert load_file(str(shard))["latents"].shape == (16, 3, 4, 4)
    before = {p: p.stat().st_mtime_ns for p in shards}

    assert main(["cache", str(recipe)]) == 0
    assert "cache: 3 cached, 3 new" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in shards} == before  # the finished ones were not re-encoded
    assert len(list(items.glob("*.safetensors"))) == 6 and not list(items.glob(".*.tmp"))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 6


def test_two_recipes_share_a_cache_without_clobbering_and_clean_removes_stale(tmp_path, base, capsys):
    clips = _six_clips(tmp_path / "clips")
    small = write_recipe(tmp_path / "a.yaml", base, tmp_path, {"path": str(clips)}, output="a")
    wide = write_recipe(tmp_path / "b.yaml", base, tmp_path, {"path": str(clips), "width": 48}, output="b")
    assert main(["cache", str(small)]) == 0
    assert main(["cache", str(wide)]) == 0
    assert "0 cached, 6 new" in capsys.readouterr().err.split("cache: ")[-1]
    items = tmp_path / "cache" / "items"
    assert len(list(items.glob("*.safetensors"))) == 12
    assert main(["cache", str(small)]) == 0  # recipe b's run removed nothing of recipe a's
    assert "cache: 6 cached, 0 new" in capsys.readouterr().err

    (clips / "clip5.mp4").unlink()
    assert main(["cache", str(small)]) == 0  # a lets go of clip5's entry; b still uses it, so it stays
    assert "5 cached, 0 new" in capsys.readouterr().err
    assert len(list(items.glob("*.safetensors"))) == 11
    (items / "stray.safetensors").write_bytes((sorted(items.glob("*.safetensors"))[0]).read_bytes())
    assert main(["cache", str(small), "--clean"]) == 0  # b's clip5 entry: source gone; the stray: unlisted
    assert "5 cached, 0 new, 2 removed" in capsys.readouterr().err
    assert len(list(items.glob("*.safetensors"))) == 10
    assert main(["cache", str(wide)]) == 0
    assert "cache: 5 cached, 0 new" in capsys.readouterr().err


def test_windows_caption_variants_and_dropout_reach_the_cache(tmp_path, base, capsys):
    from finetune.config import load_recipe
    from finetune.data.batches import CachedItems
    from finetune.models import family_for, resolve_source

    clips = tmp_path / "clips"
    write_video(clips / "long.mp4", frames=20, width=32, height=32)
    (clips / "long.txt").write_text("red, square, moving\na red square\n")
    data = {"path": str(clips), "frame_extraction": "chain", "caption_dropout": 0.5, "shuffle_tags": 1,
            "repeats": 2}  # fmt: skip
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tmp_path, data))
    source = resolve_source(recipe.model)
    from finetune.cache import build_cache

    result = build_cache(recipe, family_for(recipe.model, source), source)

    assert result.new == 2 and len(result.files) == 4  # 20 frames -> windows 0-8 and 9-17; repeats 2
    first = load_file(str(result.files[0]))
    assert sorted(first) == ["latents", "text", "text.1", "text.2"]  # 2 lines + 1 shuffled order of 3 tags
    assert not any(torch_equal(first["text"], first[k]) for k in ("text.1", "text.2"))
    assert result.text_choice.dropout == 0.5 and result.text_choice.empty_text.is_file()
    items = CachedItems(result.files, result.text_choice)
    empty = load_file(str(result.text_choice.empty_text))["text"]
    picks = [items[i % 4]["text"] for i in range(80)]
    assert 20 < sum(torch_equal(p, empty) for p in picks) < 60
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sorted(e["window"] for e in manifest["entries"].values()) == [0, 1]
    assert {e["captions"][0] for e in manifest["entries"].values()} == {"red, square, moving"}


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
