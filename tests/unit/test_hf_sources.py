"""Hugging Face dataset layouts: split folders, metadata files in subfolders, the file columns the `datasets`
library accepts, finetrainers' videos.txt + prompts.txt, and Hub dataset ids read from a real (fake-content)
Hugging Face cache laid out on disk exactly as huggingface_hub writes it."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from finetune.config import build_recipe
from finetune.data.sources import collect
from finetune.errors import UserError


def _media(path: Path, body: bytes = b"not decoded here") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(**data):
    return build_recipe({"model": {"path": "a/b"}, "data": data}).data


def _names(items):
    return [(i.path.parent.name + "/" + i.path.name, i.captions) for i in items]


def test_split_folders_read_the_chosen_split(tmp_path):
    _media(tmp_path / "train" / "a.mp4")
    _jsonl(tmp_path / "train" / "metadata.jsonl", [{"file_name": "a.mp4", "text": "train clip"}])
    _media(tmp_path / "test" / "b.mp4")
    (tmp_path / "test" / "metadata.csv").write_text("file_name,text\nb.mp4,test clip\n")
    (tmp_path / "README.md").write_text("card")  # other files at the root do not stop split detection

    specs, items, problems = collect(_data(path=str(tmp_path)))
    assert _names(items) == [("train/a.mp4", ("train clip",))] and problems == []
    assert specs[0].root == (tmp_path / "train").resolve()
    assert specs[0].source == "split train/ (not read: test/)"

    specs, items, _ = collect(_data(path=str(tmp_path), split="test"))
    assert _names(items) == [("test/b.mp4", ("test clip",))]
    # a datasets[] entry overrides data.split; "eval" is one of the names of the test split
    (tmp_path / "test").rename(tmp_path / "eval")
    specs, items, _ = collect(_data(datasets=[{"path": str(tmp_path), "split": "test"}]))
    assert _names(items) == [("eval/b.mp4", ("test clip",))] and specs[0].source.startswith("split eval/")

    with pytest.raises(UserError, match=r"data\.split: .* split folders \(eval/, train/\) with no folder for "
                       r"the split 'validation'; set data\.split to one of: eval, train"):  # fmt: skip
        collect(_data(path=str(tmp_path), split="validation"))


def test_split_folders_under_data_and_plain_folders_with_a_test_subfolder(tmp_path):
    hub_style = tmp_path / "hub_style"
    _media(hub_style / "data" / "train" / "clip.mp4").with_suffix(".txt").write_text("hello")
    _media(hub_style / "data" / "validation" / "other.mp4")
    specs, items, _ = collect(_data(path=str(hub_style)))
    assert _names(items) == [("train/clip.mp4", ("hello",))]
    assert specs[0].source == "split data/train/ (not read: validation/)"

    # Clips at the root beside a test/ folder: a plain folder, read whole (as before splits existed).
    plain = tmp_path / "plain"
    _media(plain / "a.mp4")
    _media(plain / "test" / "b.mp4")
    specs, items, _ = collect(_data(path=str(plain)))
    assert sorted(i.path.name for i in items) == ["a.mp4", "b.mp4"] and specs[0].source == ""


def test_metadata_in_subfolders_and_the_file_columns_of_the_docs(tmp_path):
    _media(tmp_path / "part1" / "clips" / "a.mp4")
    _media(tmp_path / "part1" / "b.png")
    _jsonl(
        tmp_path / "part1" / "metadata.jsonl",
        [
            {"video_file_name": "clips/a.mp4", "prompt": "from video_file_name"},  # relative to part1/
            {"image": "b.png", "caption": "from image"},
            {
                "input_file_name": "x.png",
                "output_file_name": "y.png",
            },  # two files per row: not a training item
        ],
    )
    _media(tmp_path / "part2" / "c.mp4")
    _media(tmp_path / "part2" / "d.mp4")
    (tmp_path / "part2" / "metadata.csv").write_text("video,text\nc.mp4,from video\n")
    _media(tmp_path / "part3" / "forgotten.mp4")  # no metadata file lists it

    _, items, problems = collect(_data(path=str(tmp_path)))

    assert _names(items) == [
        ("clips/a.mp4", ("from video_file_name",)),
        ("part1/b.png", ("from image",)),
        ("part2/c.mp4", ("from video",)),
    ]
    reasons = {(p.path.name, p.reason, p.kind) for p in problems}
    assert (
        "metadata.jsonl",
        "line 3: several file columns (input_file_name, output_file_name) and no file_name; row skipped",
        "error",
    ) in reasons
    assert ("d.mp4", "is not listed in any metadata file; not used", "dropped") in reasons
    assert ("forgotten.mp4", "is not listed in any metadata file; not used", "dropped") in reasons
    assert len(problems) == 3


def test_metadata_row_climbing_out_of_a_subfolder_is_not_read(tmp_path):
    _media(tmp_path / "sub" / "ok.mp4")
    _jsonl(tmp_path / "sub" / "metadata.jsonl", [{"file_name": "ok.mp4"}, {"file_name": "../ok.mp4"}])
    _, items, problems = collect(_data(path=str(tmp_path)))
    assert [i.path.name for i in items] == ["ok.mp4"]
    root = tmp_path.resolve()
    assert any(
        p.reason == f"(sub/metadata.jsonl line 2) points outside its metadata file's folder {root / 'sub'}; "
        "not read"
        for p in problems
    )


def test_videos_txt_and_prompts_txt_are_paired_line_by_line(tmp_path):
    for name in ("v1.mp4", "v2.mp4", "v3.mp4"):
        _media(tmp_path / "videos" / name)
    (tmp_path / "videos.txt").write_text("videos/v1.mp4\n\nvideos/v2.mp4\n../secret.mp4\nvideos/v3.mp4\n")
    (tmp_path / "prompt.txt").write_text("first prompt\nsecond prompt\nthird\n")

    _, items, problems = collect(_data(path=str(tmp_path)))

    # empty lines are skipped on both sides (as finetrainers does), so v2 gets the second prompt
    assert _names(items) == [
        ("videos/v1.mp4", ("first prompt",)),
        ("videos/v2.mp4", ("second prompt",)),
        ("videos/v3.mp4", ()),
    ]
    reasons = [(p.path.name, p.reason, p.kind) for p in problems]
    assert (
        "secret.mp4",
        f"(videos.txt line 4) points outside the dataset root {tmp_path.resolve()}; not read",
        "error",
    ) in reasons
    assert any(
        n == "prompt.txt" and "has 3 prompts for the 4 files of videos.txt" in r for n, r, _ in reasons
    )
    assert ("v3.mp4", "has an empty caption; trained with an empty caption", "warning") in reasons

    (tmp_path / "prompts.txt").write_text("x\n")
    with pytest.raises(UserError, match="keep one list of files and one of prompts"):
        collect(_data(path=str(tmp_path)))


def fake_hub_dataset(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "a" * 40) -> Path:
    """A dataset in a Hugging Face cache as huggingface_hub lays it out: content in blobs/<sha256>, the snapshot
    holding relative symlinks to them, refs/main naming the snapshot's commit. Returns the snapshot folder."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for name, body in files.items():
        blob = repo / "blobs" / hashlib.sha256(body).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(body)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_dataset_id_reads_the_cached_snapshot(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_dataset(
        cache,
        "someone/disney-like",
        {
            "videos/1.mp4": b"clip one",
            "videos/2.mp4": b"clip two",
            "videos.txt": b"videos/1.mp4\nvideos/2.mp4\n",
            "prompt.txt": b"a princess sings\na castle at night\n",
            "README.md": b"card",
        },
    )
    monkeypatch.chdir(tmp_path)  # no local folder named someone/disney-like

    specs, items, problems = collect(_data(path="someone/disney-like"))

    assert specs[0].root == snapshot.resolve()
    assert specs[0].source == f"Hub dataset someone/disney-like @{'a' * 12}"
    assert _names(items) == [
        ("videos/1.mp4", ("a princess sings",)),
        ("videos/2.mp4", ("a castle at night",)),
    ]
    assert items[0].path.is_symlink() and items[0].path.read_bytes() == b"clip one"  # blob links are fine
    assert problems == []


def test_hub_snapshot_link_leaving_the_repository_is_not_read(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = fake_hub_dataset(cache, "someone/split-set", {"train/a.mp4": b"a", "test/b.mp4": b"b"})
    _media(tmp_path / "private.mp4")
    (snapshot / "train" / "evil.mp4").symlink_to(tmp_path / "private.mp4")
    monkeypatch.chdir(tmp_path)

    specs, items, problems = collect(_data(datasets=[{"path": "someone/split-set", "repeats": 2}]))

    assert [i.path.name for i in items] == ["a.mp4"] and specs[0].repeats == 2
    assert specs[0].source.endswith("split train/ (not read: test/)")
    (evil,) = [p for p in problems if p.kind == "error"]
    assert evil.path.name == "evil.mp4" and "symlink pointing outside the dataset root" in evil.reason


def test_hub_dataset_not_in_the_cache_names_the_download_command(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_hub_dataset(cache, "someone/present", {"a.mp4": b"a"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as missing:
        collect(_data(path="someone/absent"))
    assert str(missing.value) == (
        f"data.path: someone/absent is not a local folder, and the Hugging Face dataset someone/absent is not "
        f"in the local cache ({cache}); download it first: hf download --repo-type dataset someone/absent"
    )
    with pytest.raises(UserError, match=r"--repo-type dataset someone/present --revision v2$"):
        collect(_data(path="someone/present@v2"))
    # A local folder of the same name wins over the Hub.
    _media(tmp_path / "someone" / "present" / "local.mp4")
    _, items, _ = collect(_data(path="someone/present"))
    assert [i.path.name for i in items] == ["local.mp4"]
