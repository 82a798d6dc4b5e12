"""Sources: metadata.jsonl / metadata.csv, several datasets with their own settings, caption variants, and the
files that must never be read (rows and links that leave the root)."""

import json
from pathlib import Path

import pytest

from finetune.config import build_recipe
from finetune.data.discover import Item
from finetune.data.sources import caption_variants, collect, dataset_specs, metadata_items
from finetune.errors import UserError


def _media(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded here")
    return path


def _data(**data):
    return build_recipe({"model": {"path": "a/b"}, "data": data}).data


def test_metadata_jsonl_rows_with_text_or_caption(tmp_path):
    _media(tmp_path / "clips" / "a.mp4")
    _media(tmp_path / "b.png")
    rows = [
        {"file_name": "clips/a.mp4", "text": "first\nsecond line", "extra": 1},
        {"file_name": "b.png", "caption": 7},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")

    items, problems = metadata_items(tmp_path, tmp_path / "metadata.jsonl")

    assert [(i.path.name, i.captions, i.is_image) for i in items] == [
        ("a.mp4", ("first", "second line"), False),
        ("b.png", ("7",), True),
    ]
    assert problems == []


def test_metadata_csv_and_unlisted_media_reported(tmp_path):
    _media(tmp_path / "a.mp4")
    _media(tmp_path / "forgotten.mp4")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.mp4,"a dog, running"\n', encoding="utf-8")

    items, problems = metadata_items(tmp_path, tmp_path / "metadata.csv")

    assert [(i.path.name, i.caption) for i in items] == [("a.mp4", "a dog, running")]
    assert [(p.path.name, p.reason, p.kind) for p in problems] == [
        ("forgotten.mp4", "is not listed in metadata.csv; not used", "dropped")
    ]


def test_metadata_rows_leaving_the_root_are_never_touched(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _media(root / "ok.mp4")
    _media(tmp_path / "x.mp4")
    rows = [
        {"file_name": "../x.mp4"},
        {"file_name": str(tmp_path / "x.mp4")},
        {"file_name": "sub/../../x.mp4"},
        {"file_name": "C:\\x.mp4"},
        {"file_name": "ok.mp4", "text": "fine"},
        {"text": "no file name"},
        {"file_name": "gone.mp4"},
        {"file_name": "notes.pdf"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\nnot json\n")
    stat_calls = []
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, **k: stat_calls.append(self) or real_exists(self, **k))

    items, problems = metadata_items(root.resolve(), root / "metadata.jsonl")

    assert [i.path.name for i in items] == ["ok.mp4"]
    reasons = [(p.path.as_posix(), p.reason) for p in problems]
    for line, name in enumerate(["../x.mp4", str(tmp_path / "x.mp4"), "sub/../../x.mp4", "C:\\x.mp4"], 1):
        assert (Path(name).as_posix(), f"(metadata.jsonl line {line}) points outside the dataset root "
                f"{root.resolve()}; not read") in reasons  # fmt: skip
    assert stat_calls and not [p for p in stat_calls if p.name == "x.mp4"]  # never even stat'ed
    assert any(r.endswith("line 6: no file_name; row skipped") for _, r in reasons)
    assert any(p.endswith("gone.mp4") and "(metadata.jsonl line 7) does not exist" in r for p, r in reasons)
    assert any(p.endswith("notes.pdf") and "not a supported video or image" in r for p, r in reasons)
    assert any("line 9: not valid JSON" in r for _, r in reasons)


def test_symlink_escaping_the_root_is_reported_not_read(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    _media(root / "ok.mp4")
    _media(outside / "secret.mp4")
    (root / "link.mp4").symlink_to(outside / "secret.mp4")
    (root / "inner.mp4").symlink_to(root / "ok.mp4")  # a link that stays inside is fine

    _, items, problems = collect(_data(path=str(root)))

    assert sorted(i.path.name for i in items) == ["inner.mp4", "ok.mp4"]
    (escape,) = [p for p in problems if p.path.name == "link.mp4"]
    assert "symlink pointing outside the dataset root" in escape.reason and escape.kind == "error"


def test_several_datasets_with_their_own_overrides(tmp_path):
    _media(tmp_path / "one" / "a.mp4").with_suffix(".txt").write_text("alpha")
    _media(tmp_path / "two" / "b.mp4").with_suffix(".txt").write_text("beta")
    data = _data(
        path=str(tmp_path / "one"),
        trigger="ohwx",
        frame_buckets=[17],
        datasets=[{"path": str(tmp_path / "two"), "repeats": 3, "trigger": "", "frame_extraction": "chain"}],
    )

    specs, items, problems = collect(data)

    assert [(s.key, s.repeats, s.trigger, s.frame_extraction, s.frame_buckets) for s in specs] == [
        ("data.path", 1, "ohwx", "head", (17,)),
        ("data.datasets[0].path", 3, "", "chain", (17,)),
    ]
    assert [(i.path.name, i.dataset) for i in items] == [("a.mp4", 0), ("b.mp4", 1)]
    assert [caption_variants(i, specs[i.dataset]) for i in items] == [("ohwx alpha",), ("beta",)]
    assert problems == []


def test_datasets_without_data_path_and_missing_folders(tmp_path):
    _media(tmp_path / "one" / "a.mp4")
    specs = dataset_specs(_data(datasets=[{"path": str(tmp_path / "one")}]))
    assert [s.key for s in specs] == ["data.datasets[0].path"] and specs[0].frame_buckets == (81,)
    with pytest.raises(UserError, match=r"data\.datasets\[1\]\.path: .*nope does not exist"):
        collect(_data(datasets=[{"path": str(tmp_path / "one")}, {"path": str(tmp_path / "nope")}]))
    with pytest.raises(UserError, match="'data.path' is required"):
        build_recipe({"model": {"path": "a/b"}, "data": {"width": 64}})


def test_caption_variants_lines_trigger_and_shuffled_tags():
    item = Item(Path("a.mp4"), "red, ball, fast", True, False, ("red, ball, fast", "a red ball"))
    spec = dataset_specs(_data(path=".", trigger="ohwx", shuffle_tags=2))[0]

    variants = caption_variants(item, spec)

    assert variants[0] == "ohwx red, ball, fast" and "ohwx a red ball" in variants
    shuffled = [v for v in variants if v not in ("ohwx red, ball, fast", "ohwx a red ball")]
    assert 1 <= len(shuffled) <= 2  # two shuffles, fewer if one repeats the original order
    for text in shuffled:
        assert text.startswith("ohwx ") and sorted(text[5:].split(", ")) == ["ball", "fast", "red"]
    assert caption_variants(item, spec) == variants  # seeded by the caption: the same every run
    no_caption = Item(Path("b.mp4"), "", False, False)
    assert caption_variants(no_caption, spec) == ("ohwx",)
