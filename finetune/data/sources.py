"""Where items come from: folders, metadata.jsonl / metadata.csv, and several datasets per recipe.

A recipe names either `data.path` (one folder) or `data.datasets: [{path, repeats, ...overrides}]`, or both (then
`data.path` is the first dataset). Each dataset resolves to a `DatasetSpec` holding every setting that applies to
its items, so nothing downstream needs to know which keys were overridden.

A folder with `metadata.jsonl` or `metadata.csv` at its root (the Hugging Face imagefolder / videofolder layout:
column `file_name`, caption in `text` or `caption`) is read through that file. A row whose file_name is absolute or
climbs out of the root (`../x.mp4`) is reported and never opened.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from finetune.config import DataConfig
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
from finetune.errors import UserError

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class DatasetSpec:
    index: int
    key: str  # the recipe key that names it, for messages: data.path or data.datasets[1].path
    root: Path
    repeats: int
    trigger: str
    frame_buckets: tuple[int, ...]  # as written; empty means (data.frames,). Snapped to the family later.
    frame_extraction: str
    frame_stride: int
    target_fps: float | None
    shuffle_tags: int


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
        specs.append(DatasetSpec(0, "data.path", Path(data.path).expanduser(), data.repeats, **base))
    for n, entry in enumerate(data.datasets):
        overrides = {k: entry_value for k in base if (entry_value := getattr(entry, k)) is not None}
        if "frame_buckets" in overrides:
            overrides["frame_buckets"] = tuple(overrides["frame_buckets"]) or base["frame_buckets"]
        key = f"data.datasets[{n}].path"
        specs.append(
            DatasetSpec(
                len(specs), key, Path(entry.path).expanduser(), entry.repeats, **{**base, **overrides}
            )
        )
    return specs


def collect(data: DataConfig) -> tuple[list[DatasetSpec], list[Item], list[Problem]]:
    """Every item of every dataset, in recipe order, and every problem seen (strict: the first one raises)."""
    specs = dataset_specs(data)
    items: list[Item] = []
    problems: list[Problem] = []
    for spec in specs:
        root = check_root(spec.root, spec.key)
        spec_items, spec_problems = read_dataset(root, spec.index)
        if not spec_items and not spec_problems:
            raise UserError(
                f"{spec.key}: no videos or images found in {root} "
                f"(accepted: {' '.join(VIDEO_EXTS + IMAGE_EXTS)}; hidden files and folders are skipped)"
            )
        items += spec_items
        problems += spec_problems
    raise_if_strict(problems, data.strict)
    return specs, items, problems


def read_dataset(root: Path, index: int) -> tuple[list[Item], list[Problem]]:
    metadata = find_metadata(root)
    return metadata_items(root, metadata, index) if metadata else folder_items(root, index)


def find_metadata(root: Path) -> Path | None:
    found = [root / name for name in METADATA_NAMES if (root / name).is_file()]
    if len(found) > 1:
        raise UserError(f"{root}: has both metadata.jsonl and metadata.csv; keep one")
    return found[0] if found else None


def metadata_items(root: Path, metadata: Path, dataset: int = 0) -> tuple[list[Item], list[Problem]]:
    rows, problems = _read_rows(metadata)
    items: list[Item] = []
    listed: set[Path] = set()
    for line, row in rows:
        where = f"({metadata.name} line {line})"
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            problems.append(Problem(metadata, f"line {line}: no file_name; row skipped"))
            continue
        if _climbs_out(name):
            problems.append(Problem(Path(name), f"{where} points outside the dataset root {root}; not read"))
            continue
        path = root / name
        if path.suffix.lower() not in VIDEO_EXTS + IMAGE_EXTS:
            problems.append(Problem(path, f"{where} is not a supported video or image; skipped"))
            continue
        if not path.exists() and not path.is_symlink():
            problems.append(Problem(path, f"{where} does not exist; skipped"))
            continue
        reason = unsafe_reason(path, root)
        if reason:
            problems.append(Problem(path, reason))
            continue
        text = next((row[c] for c in CAPTION_COLUMNS if row.get(c) is not None), None)
        item, caption_problems = make_item(
            path, None, root, dataset, text=None if text is None else str(text)
        )
        items.append(item)
        listed.add(path)
        problems += caption_problems
    # Media beside the metadata file that it does not list: not used, but never silently.
    for media in sorted(root.rglob("*")):
        hidden = any(part.startswith(".") for part in media.relative_to(root).parts)
        if media.suffix.lower() in VIDEO_EXTS + IMAGE_EXTS and media not in listed and not hidden:
            problems.append(Problem(media, f"is not listed in {metadata.name}; not used", "dropped"))
    return items, problems


def _climbs_out(name: str) -> bool:
    # Judged on the text itself, before any filesystem call, so a hostile row is never even stat'ed.
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.drive or ".." in flavour.parts:
            return True
    return False


def _read_rows(metadata: Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
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
        if "file_name" not in (reader.fieldnames or []):
            raise UserError(f"{metadata}: the first row must name the columns, including file_name")
        rows = [(n + 2, row) for n, row in enumerate(reader)]  # +2: 1-based, after the header row
    return rows, problems


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
