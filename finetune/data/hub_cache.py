"""A Hugging Face Hub dataset id in `data.path` (`owner/name`, `owner/name@revision`, `hf://datasets/owner/name`),
read from the local Hugging Face cache only.

Training never downloads data by itself: a dataset of many gigabytes should be fetched once, on purpose, with
`hf download --repo-type dataset owner/name`. The cached snapshot is then read exactly like a local folder.

Files in a cached snapshot are symlinks into the repository's `blobs/` folder, so the boundary that a symlink
must not leave (the "fence") is the repository's cache folder `datasets--owner--name`, not the snapshot folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

_ID = re.compile(r"(?:hf://datasets/)?([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w.-]+))?")


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    revision: str  # the commit the snapshot holds
    root: Path  # the snapshot folder
    fence: Path  # the repository's cache folder: symlinks may point anywhere inside it


def looks_like_dataset_id(text: str) -> bool:
    """`owner/name` that is not an existing local path (a local folder always wins)."""
    if text.startswith((".", "/", "~")) or "\\" in text or Path(text).expanduser().exists():
        return False
    return _ID.fullmatch(text) is not None


def resolve(text: str, key: str) -> HubDataset:
    match = _ID.fullmatch(text)
    if match is None:
        raise UserError(f"{key}: {text!r} is neither a local folder nor a Hub dataset id (owner/name)")
    repo_id, revision = match.group(1), match.group(2)
    from huggingface_hub import snapshot_download

    # Read at call time (not huggingface_hub's import-time constant), so HF_HUB_CACHE set later still counts.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", revision=revision, local_files_only=True, cache_dir=cache_dir
        )
    except Exception:  # LocalEntryNotFoundError and friends: no cached snapshot of that repo/revision
        where = cache_dir or _default_cache()
        at = f" --revision {revision}" if revision else ""
        raise UserError(
            f"{key}: {text} is not a local folder, and the Hugging Face dataset {repo_id} is not in the local "
            f"cache ({where}); download it first: hf download --repo-type dataset {repo_id}{at}"
        ) from None
    root = Path(folder).resolve()
    return HubDataset(repo_id, root.name, root, root.parent.parent)


def _default_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # the message is still useful without it
        return "~/.cache/huggingface/hub"
