"""`finetune check-data owner/name` on a Hub dataset in a Hugging Face cache laid out on disk as huggingface_hub
writes it (blobs + snapshot symlinks + refs/main), holding real clips: one a portrait phone-style clip with a
display rotation. The report names the resolved snapshot and split, and the rotated clip at its displayed size."""

import json
from pathlib import Path

import pytest

from finetune.cli import main
from tests.clips import write_video
from tests.unit.test_decode_seek import write_rotated
from tests.unit.test_hf_sources import fake_hub_dataset


def test_check_data_on_a_cached_hub_dataset(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    landscape = write_video(work / "landscape.mp4", frames=17, width=64, height=48)
    write_rotated(work / "portrait.mp4", -90, width=64, height=32, frames=17)  # shown 32 wide, 64 high
    files = {
        "train/videos/landscape.mp4": landscape.read_bytes(),
        "train/videos/portrait.mp4": (work / "portrait.mp4").read_bytes(),
        "train/videos.txt": b"videos/landscape.mp4\nvideos/portrait.mp4\n",
        "train/prompts.txt": b"a red square moving right\na phone clip held upright\n",
        "test/videos/held_out.mp4": landscape.read_bytes(),
        "README.md": b"---\nlicense: mit\n---\n",
    }
    cache = tmp_path / "hub"
    snapshot = fake_hub_dataset(cache, "someone/phone-clips", files, revision="c0ffee" + "0" * 34)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    overrides = ["data.width=32", "data.height=32", "data.frames=17"]

    assert main(["check-data", "someone/phone-clips", *overrides, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    root = str((snapshot / "train").resolve())
    assert report["roots"] == [root]
    assert report["sources"] == [
        {
            "key": "data.path",
            "path": "someone/phone-clips",
            "root": root,
            "source": "Hub dataset someone/phone-clips @c0ffee000000, split train/ (not read: test/)",
        }
    ]
    assert (report["videos"], report["usable_files"], report["errors"], report["dropped"]) == (2, 2, [], [])
    assert report["resolutions"] == {"64x48": 1, "32x64": 1}
    assert report["rotated"] == [
        {"file": str(snapshot.resolve() / "train/videos/portrait.mp4"), "degrees": 270, "displayed": "32x64"}
    ]
    # The portrait clip gets a portrait bucket (width x height x frames; stored sideways it would be 64x16).
    assert report["buckets"] == {"16x64x17": 1, "32x32x17": 1}

    assert main(["check-data", "someone/phone-clips", *overrides]) == 0
    text = capsys.readouterr()
    shown = text.out + text.err
    assert f"data.path: someone/phone-clips -> {root} (Hub dataset someone/phone-clips @c0ffee000000" in shown
    assert "portrait.mp4: turned 270 degrees, 32x64 as displayed" in shown


def test_check_data_on_an_uncached_hub_dataset_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    code = main(["check-data", "someone/not-downloaded"])
    err = capsys.readouterr().err
    assert code != 0
    assert "hf download --repo-type dataset someone/not-downloaded" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "empty-cache" / "datasets--someone--not-downloaded").exists()


def test_check_data_on_a_parquet_dataset_writes_its_media_under_the_cache(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyarrow")
    from tests.unit.test_embedded import _table, pq

    clip = write_video(tmp_path / "clip.mp4", frames=17, width=64, height=48).read_bytes()
    folder = tmp_path / "rows"
    folder.mkdir()
    pq.write_table(_table([(clip, "clip.mp4", "a red square")]), folder / "train.parquet")
    monkeypatch.chdir(tmp_path)

    overrides = ["data.width=32", "data.height=32", "data.frames=17", "cache.dir=./my-cache"]
    assert main(["check-data", str(folder), *overrides, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    (written,) = (tmp_path / "my-cache" / "media").iterdir()
    assert written.read_bytes() == clip and written.name.startswith("train-row1-")
    assert (report["usable_files"], report["errors"], report["resolutions"]) == (1, [], {"64x48": 1})
