"""Find the training media under a folder and pair each file with its caption.

Discovery only looks at names and caption files; whether a file decodes is `decode.load_clip`'s job,
so `check-data` can report both kinds of problem through the same `Problem` record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Item:
    path: Path  # the media file: the resolved root joined with its relative path
    caption: str  # whitespace-collapsed text of the same-stem .txt, "" if none
    has_caption: bool
    is_image: bool


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str  # short and human, read after the path: "has 9 frames; needs 17"


def discover(root: Path | str, strict: bool = False) -> tuple[list[Item], list[Problem]]:
    """Every video and image under `root` (recursive, sorted by relative path) and the problems seen.

    A file without a caption is kept with an empty caption (captionless clips still teach the style)
    and reported as a Problem; `strict=True` turns that warning into a UserError instead.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(
            f"data.path: {root} does not exist (set data.path in the recipe to your clips folder)"
        )
    if not root.is_dir():
        raise UserError(
            f"data.path: {root} is a file, not a folder (set data.path in the recipe to your clips folder)"
        )
    root = root.resolve()

    items: list[Item] = []
    problems: list[Problem] = []
    for path, caption_file in _media_files(root):
        is_image = path.suffix.lower() in IMAGE_EXTS
        if caption_file is None:
            items.append(Item(path, "", has_caption=False, is_image=is_image))
            problems.append(
                Problem(
                    path, f"has no caption file (expected {path.stem}.txt); trained with an empty caption"
                )
            )
        else:
            items.append(Item(path, _read_caption(caption_file), has_caption=True, is_image=is_image))

    if not items:
        raise UserError(
            f"data.path: no videos or images found in {root} "
            f"(accepted: {' '.join(VIDEO_EXTS + IMAGE_EXTS)}; hidden files and folders are skipped)"
        )
    if strict and problems:
        first = problems[0].path
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"{first} has no caption file (expected {first.stem}.txt){more}: "
            "add the caption, or set data.strict=false to train with empty captions"
        )
    return items, problems


def _media_files(root: Path) -> list[tuple[Path, Path | None]]:
    """(media file, its caption file or None), sorted by path relative to `root`."""
    found = []
    for folder, dirs, files in os.walk(root):
        # Pruning in place keeps os.walk out of .git, .cache and the like entirely.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        visible = [f for f in files if not f.startswith(".")]
        captions = {Path(f).stem: f for f in visible if f.lower().endswith(".txt")}
        for name in visible:
            if name.lower().endswith(VIDEO_EXTS + IMAGE_EXTS):
                caption = captions.get(Path(name).stem)
                found.append((Path(folder, name), Path(folder, caption) if caption else None))
    # Sorting on path parts (not the joined string) keeps each folder's files together.
    return sorted(found, key=lambda pair: pair[0].relative_to(root).parts)


def _read_caption(path: Path) -> str:
    raw = path.read_bytes()
    try:
        # utf-8-sig reads plain UTF-8 too and drops the BOM that Windows editors prepend.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # latin-1 never fails, so an odd legacy encoding costs a few characters, not the run.
        text = raw.decode("latin-1")
    return " ".join(text.split())
