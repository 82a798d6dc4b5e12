"""Datasets whose rows embed the media: Parquet (how the Hub stores and converts datasets) and Arrow files (what
`datasets.Dataset.save_to_disk` writes), with an image or video column holding the file's bytes.

Each embedded file is written out once under `<cache.dir>/media/` (named after its source file and row, plus a
content hash, so a rerun finds it and an edited row gets a new file); from there it is an ordinary item. Reading
needs pyarrow (`pip install 'finetune[parquet]'`), an optional extra: folders of files, metadata files and the
videos.txt layout never need it. pyarrow reads plain columns and never unpickles anything (pickle-based extension
types are not loaded since pyarrow 14.0.1, the floor we ask for). Batches of 16 rows keep memory to 16 files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from finetune.data.discover import IMAGE_EXTS, VIDEO_EXTS, Item, Problem, make_item
from finetune.errors import UserError

TABLE_EXTS = (".parquet", ".arrow")
CAPTION_COLUMNS = ("text", "caption", "prompt")
ROWS_PER_BATCH = 16
# Leading bytes of each format we accept, for rows that do not give a file name.
_MAGIC = (
    (4, b"ftyp", ".mp4"),
    (0, b"\x1a\x45\xdf\xa3", ".mkv"),  # matroska and webm: FFmpeg reads both whatever the name
    (0, b"GIF8", ".gif"),
    (0, b"\x89PNG", ".png"),
    (0, b"\xff\xd8\xff", ".jpg"),
)


def embedded_items(
    files: list[Path], root: Path, media_dir: Path | None, dataset: int = 0
) -> tuple[list[Item], list[Problem]]:
    if media_dir is None:  # only library callers without a recipe get here
        raise UserError(f"{files[0]}: a Parquet/Arrow dataset needs a cache folder to write its media to")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError(
            f"{files[0].parent}: reading a Parquet/Arrow dataset needs pyarrow: pip install 'finetune[parquet]' "
            "(or pip install pyarrow)"
        ) from None
    items: list[Item] = []
    problems: list[Problem] = []
    for file in files:
        label = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
        try:
            for number, (blob, name, text) in enumerate(_rows(file), start=1):
                where = f"({label} row {number})"
                if not blob:
                    problems.append(Problem(file, f"row {number}: no embedded bytes; skipped"))
                    continue
                ext = _extension(name, bytes(blob[:12]))
                if ext is None:
                    problems.append(Problem(file, f"row {number}: not a supported video or image; skipped"))
                    continue
                digest = hashlib.sha256(blob).hexdigest()[:16]
                out = media_dir / f"{file.stem}-row{number}-{digest}{ext}"
                if not out.is_file():
                    _write_once(out, blob)
                item, caption_problems = make_item(out, None, media_dir.resolve(), dataset, text=text)
                items.append(item)
                problems += [Problem(p.path, f"{where} {p.reason}", p.kind) for p in caption_problems]
        except _TableError as exc:
            problems.append(Problem(file, str(exc)))
    return items, problems


class _TableError(Exception):
    pass


def _rows(file: Path) -> Iterator[tuple[bytes | None, str | None, str | None]]:
    """(media bytes, its original file name, caption) per row."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    try:
        if file.suffix == ".parquet":
            parquet = pq.ParquetFile(file)
            schema = parquet.schema_arrow
            media, caption = _columns(schema)
            columns = [c for c in (media, caption) if c]
            batches = parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns)
        else:
            source = pa.memory_map(str(file))
            try:
                reader = ipc.open_stream(source)  # save_to_disk writes the streaming format
            except pa.ArrowInvalid:
                reader = ipc.open_file(source)
            schema = reader.schema
            media, caption = _columns(schema)
            batches = (
                reader
                if hasattr(reader, "__iter__")
                else map(reader.get_batch, range(reader.num_record_batches))
            )
        for batch in batches:
            for row in batch.to_pylist():
                value = row[media]
                blob, name = (
                    (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
                )
                text = row.get(caption) if caption else None
                yield blob, name, None if text is None else str(text)
    except (pa.ArrowException, OSError) as exc:
        raise _TableError(f"cannot be read as {file.suffix[1:]}: {str(exc).splitlines()[0]}") from None


def _columns(schema) -> tuple[str, str | None]:
    """The media column (the `datasets` Video or Image feature, else a bytes column named video/image) and the
    caption column."""
    import pyarrow as pa

    features = {}
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        try:
            features = json.loads(meta).get("info", {}).get("features", {}) or {}
        except ValueError:
            features = {}

    def holds_bytes(field) -> bool:
        if pa.types.is_struct(field.type):
            return any(f.name == "bytes" and pa.types.is_binary(f.type) for f in field.type)
        return pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)

    candidates = [f.name for f in schema if holds_bytes(f)]
    by_feature = [
        n for kind in ("Video", "Image") for n in candidates if (features.get(n) or {}).get("_type") == kind
    ]
    by_name = [n for n in ("video", "image") if n in candidates]
    chosen = (by_feature or by_name or candidates or [None])[0]
    if chosen is None:
        raise _TableError("has no image or video column (a struct with bytes, or a binary column)")
    caption = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
    return chosen, caption


def _extension(name: str | None, head: bytes) -> str | None:
    suffix = Path(name).suffix.lower() if name else ""
    if suffix in VIDEO_EXTS + IMAGE_EXTS:
        return suffix
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return next((ext for at, magic, ext in _MAGIC if head[at : at + len(magic)] == magic), None)


def _write_once(path: Path, blob: bytes) -> None:
    """Atomic: a killed run leaves no half-written media file that a rerun would take as complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
