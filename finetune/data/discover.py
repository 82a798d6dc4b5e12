"""Find the training media under a folder and pair each file with its caption(s).

Discovery only looks at names, sizes, permissions and caption files; whether a file decodes is `decode.probe`'s
job, so `check-data` can report both kinds of problem through the same `Problem` record. Folders laid out for the
Hugging Face `datasets` library (metadata files, split folders, videos.txt + prompts.txt) are read by
`sources.py`, which uses this module for the plain case.

Nothing outside the dataset root is ever opened: a symlink whose target lies outside it is reported, not read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Item:
    path: Path  # the media file: the resolved root joined with its relative path
    caption: str  # the first caption ("" if none); whitespace collapsed
    has_caption: bool
    is_image: bool
    captions: tuple[str, ...] = ()  # every caption: one per non-empty line of the .txt (picked per epoch)
    dataset: int = 0  # index of the dataset (data.datasets) it came from


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str  # short and human, read after the path: "has 9 frames; needs 17"
    # error: the file is unusable and skipped; dropped: it decodes but fits no bucket (skipped);
    # warning: it is used, but something about it deserves a look (missing caption, bad encoding...)
    kind: str = field(default="error", compare=False)


def check_root(root: Path | str, key: str = "data.path") -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"{key}: {root} does not exist (set {key} in the recipe to your clips folder)")
    if not root.is_dir():
        raise UserError(
            f"{key}: {root} is a file, not a folder (set {key} in the recipe to your clips folder)"
        )
    return root.resolve()


def discover(root: Path | str, strict: bool = False, dataset: int = 0) -> tuple[list[Item], list[Problem]]:
    """Every usable-looking video and image under `root` (recursive, sorted by relative path) and the problems.

    A file without a caption is kept with an empty caption (captionless clips still teach the style) and
    reported as a warning; `strict=True` turns any problem into a UserError instead.
    """
    root = check_root(root)
    from finetune.data.sources import read_dataset  # sources builds on this module

    items, problems = read_dataset(root, dataset)
    if not items and not problems:
        raise UserError(
            f"data.path: no videos or images found in {root} "
            f"(accepted: {' '.join(VIDEO_EXTS + IMAGE_EXTS)}; hidden files and folders are skipped)"
        )
    raise_if_strict(problems, strict)
    return items, problems


def raise_if_strict(problems: list[Problem], strict: bool) -> None:
    if strict and problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"{first.path}: {first.reason}{more} (data.strict=true: fix the file, or set data.strict=false "
            "to skip it and train on the rest)"
        )


def folder_items(root: Path, dataset: int = 0, fence: Path | None = None) -> tuple[list[Item], list[Problem]]:
    """Every media file under root with its same-stem caption. Symlinks may point anywhere inside `fence`
    (default root; a Hub snapshot's files link into the repository's blob folder)."""
    fence = fence or root
    items: list[Item] = []
    problems: list[Problem] = []
    for folder, names in _walk(root):
        captions = {Path(n).stem: n for n in names if n.lower().endswith(".txt")}
        media = [n for n in names if n.lower().endswith(VIDEO_EXTS + IMAGE_EXTS)]
        by_stem: dict[str, list[str]] = {}
        for name in media:
            by_stem.setdefault(Path(name).stem, []).append(name)
        for name in media:
            path = Path(folder, name)
            problem = unsafe_reason(path, fence)
            if problem:
                problems.append(Problem(path, problem))
                continue
            caption_name = captions.get(path.stem)
            twins = by_stem[path.stem]
            if len(twins) > 1 and caption_name:
                others = ", ".join(n for n in twins if n != name)
                problems.append(
                    Problem(path, f"shares the caption {caption_name} with {others} (same stem)", "warning")
                )
            caption_file = Path(folder, caption_name) if caption_name else None
            item, caption_problems = make_item(path, caption_file, fence, dataset)
            items.append(item)
            problems += caption_problems
    # Sorting on path parts (not the joined string) keeps each folder's files together.
    items.sort(key=lambda item: item.path.relative_to(root).parts)
    return items, problems


def make_item(
    path: Path, caption_file: Path | None, root: Path, dataset: int, text: str | None = None
) -> tuple[Item, list[Problem]]:
    """An Item from a media file and either a caption file or caption text (metadata); plus caption warnings."""
    is_image = path.suffix.lower() in IMAGE_EXTS
    problems: list[Problem] = []
    if text is None and caption_file is not None:
        reason = unsafe_reason(caption_file, root, empty_ok=True)
        if reason:
            problems.append(Problem(path, f"caption {caption_file.name} {reason}", "warning"))
        else:
            text, warning = read_caption(caption_file)
            if warning:
                problems.append(Problem(path, warning, "warning"))
    if text is None:
        expected = f"expected {path.stem}.txt" if caption_file is None else "its caption was not read"
        problems.append(
            Problem(path, f"has no caption file ({expected}); trained with an empty caption", "warning")
        )
        return Item(path, "", has_caption=False, is_image=is_image, dataset=dataset), problems
    captions = split_captions(text)
    if not captions:
        problems.append(Problem(path, "has an empty caption; trained with an empty caption", "warning"))
    first = captions[0] if captions else ""
    return Item(path, first, True, is_image, captions, dataset), problems


def split_captions(text: str) -> tuple[str, ...]:
    """One caption per non-empty line, each whitespace-collapsed."""
    return tuple(" ".join(line.split()) for line in text.splitlines() if line.strip())


def unsafe_reason(path: Path, root: Path, empty_ok: bool = False) -> str | None:
    """Why `path` must not be read, or None. Checks symlinks (never followed out of the root), empty files and
    read permission (os.access: root ignores mode bits, so under root this only trips on real ACL denials)."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return (
            "is a broken symlink" if path.is_symlink() else "cannot be read (it vanished or is unreachable)"
        )
    if not real.is_relative_to(root):
        what = "is a symlink pointing outside" if path.is_symlink() else "is outside"
        return f"{what} the dataset root {root}; not read"
    if not can_read(real):
        return "cannot be read (permission denied)"
    if not empty_ok and real.is_file() and real.stat().st_size == 0:
        return "is empty (0 bytes)"
    return None


def can_read(path: Path) -> bool:
    return os.access(path, os.R_OK)


def _walk(root: Path) -> list[tuple[str, list[str]]]:
    """(folder, visible file names) for every folder under root, sorted so each folder's files stay together."""
    found = []
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is never entered
        # Pruning in place keeps os.walk out of .git, .cache and the like entirely.
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.append((folder, sorted(f for f in files if not f.startswith("."))))
    return sorted(found, key=lambda pair: Path(pair[0]).relative_to(root).parts)


def read_caption(path: Path) -> tuple[str, str | None]:
    """The caption text and a warning when its bytes are not UTF-8 (decoded with U+FFFD replacements)."""
    raw = path.read_bytes()
    try:
        # utf-8-sig reads plain UTF-8 too and drops the BOM that Windows editors prepend.
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8-sig", errors="replace")
        return text, (
            f"caption {path.name} is not valid UTF-8 (byte {exc.start}); undecodable bytes replaced with "
            "\ufffd: re-save it as UTF-8"
        )
