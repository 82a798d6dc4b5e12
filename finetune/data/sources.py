"""Where items come from: folders, Hugging Face folder layouts, Hub datasets, and several datasets per recipe.

A recipe names either `data.path` (one folder) or `data.datasets: [{path, repeats, ...overrides}]`, or both (then
`data.path` is the first dataset). Each dataset resolves to a `DatasetSpec` holding every setting that applies to
its items, so nothing downstream needs to know which keys were overridden.

How a dataset folder is read (the Hugging Face imagefolder / videofolder conventions):
- `path` may be a Hub dataset id (`owner/name`): its snapshot in the local Hugging Face cache is the folder.
- Split folders (`train/`, `test/`, `validation/`..., also under `data/`): only `data.split` (default train) is
  read, when the folder holds no media outside its split folders.
- `metadata.jsonl` / `.csv` / `.parquet` anywhere in it: rows name files relative to their metadata file's folder
  (column `file_name`, `*_file_name`, `video` or `image`; caption in `text`, `caption` or `prompt`). A row whose
  file is absolute or climbs out of that folder (`../x.mp4`) is reported and never opened.
- `videos.txt` (or `images.txt`) with `prompts.txt` / `prompt.txt` beside it: line i of one is captioned by line
  i of the other (the layout of finetrainers and many Hub video datasets).
- Otherwise every video and image below it, captioned by its same-stem `.txt`.
- A folder with no media files but Parquet / Arrow files whose rows embed them (`embedded.py`): each row's file
  is written once under `<cache.dir>/media/`. Shards named after a split (`train-00000-of-00002.parquet`) are
  filtered by `data.split` like split folders.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

from finetune.config import DataConfig
from finetune.data import hub_cache
from finetune.data.discover import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    Item,
    Problem,
    check_root,
    folder_items,
    make_item,
    raise_if_strict,
    unsafe_reason,
)
from finetune.data.embedded import TABLE_EXTS, embedded_items
from finetune.errors import UserError

METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # parquet: needs pyarrow
CAPTION_COLUMNS = ("text", "caption", "prompt")
LIST_CAPTIONS = ("prompts.txt", "prompt.txt")
LIST_MEDIA = ("videos.txt", "images.txt")
# Folder names that mark a split, as the `datasets` library recognises them, by the split they name.
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS


@dataclass(frozen=True)
class DatasetSpec:
    index: int
    key: str  # the recipe key that names it, for messages: data.path or data.datasets[1].path
    root: Path  # as written until `collect` resolves it: then the folder actually read (Hub snapshot, split)
    repeats: int
    trigger: str
    frame_buckets: tuple[int, ...]  # as written; empty means (data.frames,). Snapped to the family later.
    frame_extraction: str
    frame_stride: int
    target_fps: float | None
    shuffle_tags: int
    split: str = "train"
    path: str = ""  # the recipe's text: a folder or a Hub dataset id
    fence: Path | None = None  # symlinks must stay inside it (a Hub repo's cache folder); None: root
    source: str = ""  # how `path` became `root`, for reports: "Hub dataset owner/name @abc123, split train/"


def dataset_specs(data: DataConfig) -> list[DatasetSpec]:
    base = {
        "trigger": data.trigger,
        "frame_buckets": tuple(data.frame_buckets) or (data.frames,),
        "frame_extraction": data.frame_extraction,
        "frame_stride": data.frame_stride,
        "target_fps": data.target_fps,
        "shuffle_tags": data.shuffle_tags,
    }
    specs = []
    if data.path:
        where = {"split": data.split, "path": data.path}
        specs.append(DatasetSpec(0, "data.path", Path(data.path).expanduser(), data.repeats, **base, **where))
    for n, entry in enumerate(data.datasets):
        overrides = {k: entry_value for k in base if (entry_value := getattr(entry, k)) is not None}
        if "frame_buckets" in overrides:
            overrides["frame_buckets"] = tuple(overrides["frame_buckets"]) or base["frame_buckets"]
        key = f"data.datasets[{n}].path"
        where = {"split": entry.split or data.split, "path": entry.path}
        specs.append(
            DatasetSpec(
                len(specs),
                key,
                Path(entry.path).expanduser(),
                entry.repeats,
                **{**base, **overrides},
                **where,
            )
        )
    return specs


def collect(
    data: DataConfig, media_dir: Path | None = None
) -> tuple[list[DatasetSpec], list[Item], list[Problem]]:
    """Every item of every dataset, in recipe order, and every problem seen (strict: the first one raises).
    The specs come back resolved: `root` is the folder read, `source` says how it was found. `media_dir`
    (`<cache.dir>/media`) receives the files embedded in Parquet/Arrow datasets."""
    specs = [resolve_spec(spec) for spec in dataset_specs(data)]
    items: list[Item] = []
    problems: list[Problem] = []
    for spec in specs:
        spec_items, spec_problems = read_dataset(spec.root, spec.index, spec.fence, spec.split, media_dir)
        if not spec_items and not spec_problems:
            raise UserError(
                f"{spec.key}: no videos or images found in {spec.root} "
                f"(accepted: {' '.join(MEDIA_EXTS)}; hidden files and folders are skipped)"
            )
        items += spec_items
        problems += spec_problems
    raise_if_strict(problems, data.strict)
    return specs, items, problems


def resolve_spec(spec: DatasetSpec) -> DatasetSpec:
    """The folder a dataset entry reads: a local folder, or a Hub dataset's cached snapshot; then its split."""
    text = spec.path or str(spec.root)
    notes = []
    if hub_cache.looks_like_dataset_id(text):
        hub = hub_cache.resolve(text, spec.key)
        base, fence = hub.root, hub.fence
        notes.append(f"Hub dataset {hub.repo_id} @{hub.revision[:12]}")
    else:
        base = fence = check_root(spec.root, spec.key)
    folder, split_note = pick_split(base, spec.split, spec.key.removesuffix(".path") + ".split")
    notes += [split_note] if split_note else []
    return replace(spec, root=folder, fence=fence, source=", ".join(notes))


def split_of(name: str) -> str | None:
    return next((split for split, names in SPLIT_FOLDERS.items() if name.lower() in names), None)


def pick_split(base: Path, split: str, key: str) -> tuple[Path, str | None]:
    """(folder to read, a note) for a dataset laid out in split folders (`train/`, `data/train/`...), or
    (base, None). A folder that also holds media outside its split folders is read whole, as before: a `test/`
    subfolder in a folder of clips is not taken to be a split."""
    for holder in (base, base / "data"):
        if not holder.is_dir() or holder.is_symlink():
            continue
        splits = sorted(
            child.name
            for child in holder.iterdir()
            if child.is_dir() and not child.name.startswith(".") and split_of(child.name)
        )
        if not splits:
            continue
        if _has_media(base, skip={holder.name} if holder != base else set(splits)) or (
            holder != base and _has_media(holder, skip=set(splits))
        ):
            return base, None
        wanted = split_of(split) or split.lower()
        chosen = [s for s in splits if s == split] or [s for s in splits if split_of(s) == wanted]
        if len(chosen) != 1:
            listed = ", ".join(f"{s}/" for s in splits)
            problem = "several folders for" if chosen else "no folder for"
            raise UserError(
                f"{key}: {holder} is laid out in split folders ({listed}) with {problem} the split {split!r}; "
                f"set {key} to one of: {', '.join(splits)}"
            )
        others = [s for s in splits if s != chosen[0]]
        where = chosen[0] if holder == base else f"data/{chosen[0]}"
        also = f" (not read: {', '.join(f'{s}/' for s in others)})" if others else ""
        return holder / chosen[0], f"split {where}/{also}"
    return base, None


def _has_media(folder: Path, skip: set[str]) -> bool:
    """Any media, metadata or list file in `folder` outside the named subfolders (hidden ones ignored)."""
    wanted = MEDIA_EXTS
    for current, dirs, files in os.walk(folder):
        top = current == str(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (top and d in skip)]
        for name in files:
            if not name.startswith(".") and (
                name.lower().endswith(wanted) or name in METADATA_NAMES + LIST_MEDIA
            ):
                return True
    return False


def read_dataset(
    root: Path, index: int, fence: Path | None = None, split: str = "train", media_dir: Path | None = None
) -> tuple[list[Item], list[Problem]]:
    """Items of one dataset folder: through its metadata files, else its videos.txt + prompts.txt, else every
    media file with its same-stem caption, else the rows of its Parquet/Arrow files."""
    fence = fence or root
    metadata = find_metadata_files(root)
    if metadata:
        return metadata_items(root, metadata, index, fence)
    lists = find_list_files(root)
    if lists:
        return list_items(root, *lists, index, fence)
    items, problems = folder_items(root, index, fence)
    tables = [] if items or problems else table_files(root, split)
    if tables:
        return embedded_items(tables, root, media_dir, index)
    return items, problems


def table_files(root: Path, split: str) -> list[Path]:
    """Parquet/Arrow files under root; those named after a split (train-00000-of-00001.parquet, test.arrow)
    only for the chosen split. metadata.parquet is a metadata file, not rows of media."""
    found = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in TABLE_EXTS
        and p.name != "metadata.parquet"
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    named = {p: split_of(p.name.split("-")[0].split(".")[0]) for p in found}
    if not any(named.values()):
        return found
    wanted = split_of(split) or split.lower()
    return [p for p in found if named[p] == wanted]


def find_metadata(root: Path) -> Path | None:
    """The metadata file at `root` itself (not in a subfolder), or None."""
    found = [root / name for name in METADATA_NAMES if (root / name).is_file()]
    if len(found) > 1:
        raise UserError(f"{root}: has {' and '.join(p.name for p in found)}; keep one")
    return found[0] if found else None


def find_metadata_files(root: Path) -> list[Path]:
    """Every metadata file in `root` and its subfolders (hidden ones skipped); one per folder at most."""
    found = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # in place: os.walk then skips them entirely
        metadata = find_metadata(Path(folder))
        if metadata:
            found.append(metadata)
    return sorted(found, key=lambda m: m.relative_to(root).parts)


def find_list_files(root: Path) -> tuple[Path, Path] | None:
    """(captions file, media list) of the finetrainers layout, or None."""
    media = [root / n for n in LIST_MEDIA if (root / n).is_file()]
    captions = [root / n for n in LIST_CAPTIONS if (root / n).is_file()]
    if not media or not captions:
        return None
    if len(media) > 1 or len(captions) > 1:
        names = ", ".join(p.name for p in media + captions)
        raise UserError(f"{root}: has {names}; keep one list of files and one of prompts")
    return captions[0], media[0]


@dataclass(frozen=True)
class _Row:
    where: str  # "(metadata.jsonl line 3)", for messages
    folder: Path  # names are relative to it
    name: object  # the file name as written (checked to be a string)
    text: str | None  # the caption(s); None: no caption column


def metadata_items(
    root: Path, metadata: Path | list[Path], dataset: int = 0, fence: Path | None = None
) -> tuple[list[Item], list[Problem]]:
    files = [metadata] if isinstance(metadata, Path) else metadata
    rows: list[_Row] = []
    problems: list[Problem] = []
    for file in files:
        inside = file.is_relative_to(root)
        label = file.relative_to(root).as_posix() if inside else file.name
        folder = root / file.parent.relative_to(root) if inside else root  # rows are relative to their file
        parsed, file_problems = _read_rows(file)
        problems += file_problems
        unit = "row" if file.suffix == ".parquet" else "line"
        for line, row in parsed:
            name, trouble = _file_column(row)
            if trouble:
                problems.append(Problem(file, f"{unit} {line}: {trouble}; row skipped"))
                continue
            text = next((row[c] for c in CAPTION_COLUMNS if row.get(c) is not None), None)
            rows.append(_Row(f"({label} {unit} {line})", folder, name, None if text is None else str(text)))
    listing = files[0].relative_to(root).as_posix() if len(files) == 1 else "any metadata file"
    return _listed_items(root, fence or root, rows, dataset, problems, listing)


def list_items(
    root: Path, captions: Path, media: Path, dataset: int = 0, fence: Path | None = None
) -> tuple[list[Item], list[Problem]]:
    """videos.txt + prompts.txt: non-empty lines are paired in order (as finetrainers reads them)."""
    problems: list[Problem] = []
    names = _lines(media, problems)
    prompts = _lines(captions, problems)
    if len(prompts) != len(names):
        problems.append(
            Problem(
                captions,
                f"has {len(prompts)} prompts for the {len(names)} files of {media.name}; lines are paired in "
                "order, so files past the last prompt train with an empty caption and extra prompts are unused",
                "warning",
            )
        )
    rows = [
        _Row(f"({media.name} line {line})", root, name, prompts[n][1] if n < len(prompts) else "")
        for n, (line, name) in enumerate(names)
    ]
    return _listed_items(root, fence or root, rows, dataset, problems, media.name)


def _lines(path: Path, problems: list[Problem]) -> list[tuple[int, str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8-sig", errors="replace")
        problems.append(
            Problem(
                path,
                f"is not valid UTF-8 (byte {exc.start}); undecodable bytes replaced with \ufffd",
                "warning",
            )
        )
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _file_column(row: dict) -> tuple[object, str | None]:
    """The row's media file name, by the `datasets` library's rules (`file_name`, `*_file_name`) plus the plain
    `video` / `image` columns some datasets use; or the reason there is none."""
    if "file_name" in row:
        return row["file_name"], None
    suffixed = [k for k in row if k.endswith("_file_name")]
    for preferred in ("video_file_name", "image_file_name"):
        if preferred in suffixed:
            return row[preferred], None
    if len(suffixed) > 1:
        return None, f"several file columns ({', '.join(suffixed)}) and no file_name"
    if suffixed:
        return row[suffixed[0]], None
    for column in ("video", "image"):
        if isinstance(row.get(column), str):
            return row[column], None
    return None, "no file_name"


def _listed_items(
    root: Path, fence: Path, rows: list[_Row], dataset: int, problems: list[Problem], listing: str
) -> tuple[list[Item], list[Problem]]:
    items: list[Item] = []
    listed: set[Path] = set()
    for row in rows:
        name = row.name
        if not isinstance(name, str) or not name.strip():
            problems.append(Problem(row.folder, f"{row.where}: no file name; row skipped"))
            continue
        if _climbs_out(name):
            scope = "the dataset root" if row.folder == root else "its metadata file's folder"
            problems.append(Problem(Path(name), f"{row.where} points outside {scope} {row.folder}; not read"))
            continue
        path = row.folder / name
        if path.suffix.lower() not in MEDIA_EXTS:
            problems.append(Problem(path, f"{row.where} is not a supported video or image; skipped"))
            continue
        if not path.exists() and not path.is_symlink():
            problems.append(Problem(path, f"{row.where} does not exist; skipped"))
            continue
        reason = unsafe_reason(path, fence)
        if reason:
            problems.append(Problem(path, reason))
            continue
        item, caption_problems = make_item(path, None, fence, dataset, text=row.text)
        items.append(item)
        listed.add(path)
        problems += caption_problems
    # Media in the dataset that no row lists: not used, but never silently.
    for media in sorted(root.rglob("*")):
        hidden = any(part.startswith(".") for part in media.relative_to(root).parts)
        if media.suffix.lower() in MEDIA_EXTS and media not in listed and not hidden:
            problems.append(Problem(media, f"is not listed in {listing}; not used", "dropped"))
    return items, problems


def _climbs_out(name: str) -> bool:
    # Judged on the text itself, before any filesystem call, so a hostile row is never even stat'ed.
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.drive or ".." in flavour.parts:
            return True
    return False


def _read_rows(metadata: Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
    if metadata.suffix == ".parquet":
        return _parquet_rows(metadata), []
    raw = metadata.read_bytes()
    problems: list[Problem] = []
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        problems.append(
            Problem(metadata, "is not valid UTF-8; undecodable bytes replaced with \ufffd", "warning")
        )
    rows: list[tuple[int, dict]] = []
    if metadata.suffix == ".jsonl":
        for line, body in enumerate(text.splitlines(), start=1):
            if not body.strip():
                continue
            try:
                row = json.loads(body)
            except json.JSONDecodeError as exc:
                problems.append(Problem(metadata, f"line {line}: not valid JSON ({exc.msg}); row skipped"))
                continue
            if not isinstance(row, dict):
                problems.append(Problem(metadata, f"line {line}: expected a JSON object; row skipped"))
                continue
            rows.append((line, row))
    else:
        reader = csv.DictReader(io.StringIO(text))
        columns = reader.fieldnames or []
        if not any(c == "file_name" or c.endswith("_file_name") or c in ("video", "image") for c in columns):
            raise UserError(
                f"{metadata}: the first row must name the columns, including file_name (or *_file_name, "
                "video, image)"
            )
        rows = [(n + 2, row) for n, row in enumerate(reader)]  # +2: 1-based, after the header row
    return rows, problems


def _parquet_rows(metadata: Path) -> list[tuple[int, dict]]:
    """metadata.parquet: the same columns as the jsonl/csv files, one row per file (row numbers from 1)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{metadata}: reading metadata.parquet needs pyarrow: pip install 'finetune[parquet]' (or pip "
            "install pyarrow), or convert it to metadata.jsonl"
        ) from None
    try:
        table = pq.read_table(metadata)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{metadata}: cannot be read as Parquet ({str(exc).splitlines()[0]})") from None
    return list(enumerate(table.to_pylist(), start=1))


def caption_variants(item: Item, spec: DatasetSpec) -> tuple[str, ...]:
    """Every text the item can train with: each caption (trigger first), plus `shuffle_tags` shuffled orders of
    its comma-separated tags. Each variant's embedding is cached; one is picked each time the item is loaded.
    Shuffles are seeded by the caption, so the same recipe always caches the same variants."""
    trigger = spec.trigger.strip()
    variants: list[str] = []
    for caption in item.captions or ("",):
        full = f"{trigger} {caption}".strip() if trigger else caption
        if full not in variants:
            variants.append(full)
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        if spec.shuffle_tags and len(tags) > 1:
            rng = random.Random(caption)
            for _ in range(spec.shuffle_tags):
                rng.shuffle(tags)
                text = ", ".join(tags)
                text = f"{trigger} {text}" if trigger else text  # the trigger stays first
                if text not in variants:
                    variants.append(text)
    return tuple(variants)
