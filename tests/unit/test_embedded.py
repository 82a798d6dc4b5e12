"""Parquet / Arrow datasets whose rows embed the media bytes (the Hub's storage format, `save_to_disk`)."""

import json
import sys

import pytest

from finetune.config import build_recipe
from finetune.data.decode import probe
from finetune.data.sources import collect
from finetune.errors import UserError
from tests.clips import write_image, write_video

pa = pytest.importorskip("pyarrow")
import pyarrow.ipc as ipc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

HF_FEATURES = {
    "info": {"features": {"video": {"_type": "Video"}, "text": {"dtype": "string", "_type": "Value"}}}
}


def _table(rows: list[tuple[bytes | None, str | None, str]]):
    media = pa.array(
        [{"bytes": blob, "path": name} for blob, name, _ in rows],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"video": media, "text": [text for *_, text in rows], "id": list(range(len(rows)))})
    return table.replace_schema_metadata({"huggingface": json.dumps(HF_FEATURES)})


def _data(path, **data):
    return build_recipe({"model": {"path": "a/b"}, "data": {"path": str(path), **data}}).data


def test_parquet_rows_are_written_out_once_and_read_as_items(tmp_path):
    clip = write_video(tmp_path / "src" / "clip.mp4", frames=9, width=32, height=32).read_bytes()
    png = write_image(tmp_path / "src" / "still.png", 16, 16).read_bytes()
    rows = [
        (clip, "clip.mp4", "a red square"),
        (png, None, "a blue still"),  # no name: the format is sniffed from the bytes
        (None, "gone.mp4", "no bytes"),
        (b"plain text, not media", None, "junk"),
    ]
    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    pq.write_table(_table(rows), data / "train-00000-of-00001.parquet")
    pq.write_table(_table([(clip, "other.mp4", "held out")]), data / "test-00000-of-00001.parquet")
    media_dir = tmp_path / "cache" / "media"

    _, items, problems = collect(_data(tmp_path / "ds"), media_dir)

    assert [(i.path.suffix, i.captions, i.is_image) for i in items] == [
        (".mp4", ("a red square",), False),
        (".png", ("a blue still",), True),
    ]
    assert items[0].path.parent == media_dir and items[0].path.name.startswith("train-00000-of-00001-row1-")
    assert items[0].path.read_bytes() == clip and items[1].path.read_bytes() == png
    assert probe(items[0].path).frames == 9
    assert sorted((p.path.name, p.reason) for p in problems) == [
        ("train-00000-of-00001.parquet", "row 3: no embedded bytes; skipped"),
        ("train-00000-of-00001.parquet", "row 4: not a supported video or image; skipped"),
    ]
    # A rerun finds the files already written and leaves them alone; the test split is its own.
    written = {p: p.stat().st_mtime_ns for p in media_dir.iterdir()}
    _, again, _ = collect(_data(tmp_path / "ds"), media_dir)
    assert [i.path for i in again] == [i.path for i in items]
    assert {p: p.stat().st_mtime_ns for p in media_dir.iterdir()} == written
    _, test_items, _ = collect(_data(tmp_path / "ds", split="test"), media_dir)
    assert [i.captions for i in test_items] == [("held out",)]


def test_arrow_stream_file_from_save_to_disk(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", frames=9, width=32, height=32).read_bytes()
    folder = tmp_path / "saved" / "train"
    folder.mkdir(parents=True)
    table = _table([(clip, "a.mp4", "streamed")])
    with ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text("{}")

    specs, items, problems = collect(_data(tmp_path / "saved"), tmp_path / "media")

    assert specs[0].source == "split train/"
    assert [i.captions for i in items] == [("streamed",)] and problems == []


def test_parquet_needs_pyarrow_and_a_media_folder(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(_table([(b"\x89PNG....", None, "x")]), folder / "rows.parquet")
    with pytest.raises(UserError, match="needs a cache folder"):
        collect(_data(folder))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"needs pyarrow: pip install 'finetune\[parquet\]'"):
        collect(_data(folder), tmp_path / "media")


def test_table_without_a_media_column_is_reported(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["only text"]}), folder / "rows.parquet")
    _, items, problems = collect(_data(folder), tmp_path / "media")
    assert items == [] and [(p.path.name, p.reason) for p in problems] == [
        ("rows.parquet", "has no image or video column (a struct with bytes, or a binary column)")
    ]


def test_metadata_parquet_is_a_metadata_file(tmp_path):
    write_video(tmp_path / "train" / "clips" / "a.mp4", frames=9, width=32, height=32)
    write_video(tmp_path / "train" / "b.mp4", frames=9, width=32, height=32)
    rows = pa.table({"file_name": ["clips/a.mp4", "../escape.mp4"], "caption": ["from parquet", "x"]})
    pq.write_table(rows, tmp_path / "train" / "metadata.parquet")

    specs, items, problems = collect(_data(tmp_path))

    assert specs[0].source == "split train/"
    assert [(i.path.name, i.captions) for i in items] == [("a.mp4", ("from parquet",))]
    assert sorted((p.path.name, p.reason) for p in problems) == [
        ("b.mp4", "is not listed in metadata.parquet; not used"),
        ("escape.mp4", f"(metadata.parquet row 2) points outside the dataset root {(tmp_path / 'train').resolve()}; "
         "not read"),
    ]  # fmt: skip
