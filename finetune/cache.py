"""The latent + text-embedding cache: every clip is encoded once, to disk.

Layout of `cache.dir`:
    manifest.json          entries keyed by a hash of (file content, caption, model, size, frames, encoder settings)
    items/<key>.safetensors    {"latents": (C, F', H', W'), "text": (tokens, dim)} for one clip

A rerun hashes the files (size + mtime shortcut), encodes only the keys it lacks, removes the ones no longer in
the dataset, and writes nothing when nothing changed. Every write is atomic. The VAE and text encoder are loaded
only when something needs encoding, and freed before `train` loads the transformer.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune.config import Recipe
from finetune.data import Item, MediaError, Problem, discover, load_clip
from finetune.errors import UserError
from finetune.io import atomic_save_safetensors, atomic_write_text
from finetune.models import Family, Source
from finetune.ui import progress, say, warn

CACHE_VERSION = 1


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    frames: int


@dataclass
class CacheResult:
    files: list[Path]  # one shard per usable item, in dataset order
    shape: Shape  # the size and length the clips were encoded at (after the family's rounding)
    cached: int = 0
    new: int = 0
    removed: int = 0
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.cached} cached, {self.new} new" + (f", {self.removed} removed" if self.removed else "")


def resolve_shape(recipe: Recipe, family: Family) -> Shape:
    """Round the recipe's size and length down to what the family accepts, and say so once."""
    d, m = recipe.data, family.size_multiple
    width, height, frames = d.width // m * m, d.height // m * m, family.valid_frames(d.frames)
    if min(width, height) == 0:
        raise UserError(
            f"data.width/data.height: {d.width}x{d.height} is below the {m}-pixel minimum of {family.name}"
        )
    if (width, height) != (d.width, d.height):
        say(
            f"note: {family.name} needs sizes divisible by {m}; using {width}x{height} (data: {d.width}x{d.height})"
        )
    if frames != d.frames:
        say(
            f"note: {family.name} needs {family.frame_step}k+1 frames; using {frames} (data.frames={d.frames})"
        )
    return Shape(width, height, frames)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hash(path: Path, known: dict) -> str:
    """Content hash; reuses the recorded one when size and mtime are unchanged (hashing 2,000 clips is minutes)."""
    stat = path.stat()
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    return _sha256(path)


def _caption(recipe: Recipe, item: Item) -> str:
    trigger = recipe.data.trigger.strip()
    return f"{trigger} {item.caption}".strip() if trigger else item.caption


def _settings(recipe: Recipe, family: Family, source: Source, shape: Shape, text_dtype: torch.dtype) -> dict:
    # Everything that changes the encoded tensors. The transformer is not in it: latents depend only on the VAE
    # and text encoder, so retraining from another transformer of the same base reuses the cache.
    return {
        "version": CACHE_VERSION,
        "family": family.name,
        "encoders": source.base,
        "width": shape.width,
        "height": shape.height,
        "frames": shape.frames,
        "max_sequence_length": recipe.cache.max_sequence_length,
        "text_dtype": str(text_dtype).removeprefix("torch."),
    }


def _key(settings: dict, content_hash: str, caption: str, frames: int) -> str:
    blob = json.dumps(
        {**settings, "frames": frames, "content": content_hash, "caption": caption}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def encode_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        return {"entries": {}, "files": {}, "failed": {}}
    try:
        manifest = json.loads(path.read_text())
        for section in ("entries", "files", "failed"):
            manifest.setdefault(section, {})
        return manifest
    except (json.JSONDecodeError, OSError):
        warn(f"{path} is unreadable; rebuilding the cache index (shards that still match are kept)")
        return {"entries": {}, "files": {}, "failed": {}}


def build_cache(recipe: Recipe, family: Family, source: Source) -> CacheResult:
    root = Path(recipe.data.path)
    items, problems = discover(root, strict=recipe.data.strict)
    shape = resolve_shape(recipe, family)
    device, text_dtype = encode_device()
    settings = _settings(recipe, family, source, shape, text_dtype)

    cache_dir = Path(recipe.cache.dir)
    manifest_path = cache_dir / "manifest.json"
    manifest = _read_manifest(manifest_path)
    before = json.dumps(manifest, sort_keys=True)

    # 1. Decide what each item's key is and whether its shard already exists.
    wanted: list[tuple[str, Item, str, int]] = []  # key, item, caption, frames
    files: dict[str, dict] = {}
    for item in items:
        rel = item.path.relative_to(root.resolve()).as_posix()
        content = _file_hash(item.path, manifest["files"].get(rel, {}))
        stat = item.path.stat()
        files[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": content}
        frames = 1 if item.is_image else shape.frames
        caption = _caption(recipe, item)
        wanted.append((_key(settings, content, caption, frames), item, caption, frames))

    result = CacheResult(files=[], shape=shape, problems=list(problems))
    todo, fail_keys = [], set()
    for key, item, caption, frames in wanted:
        entry = manifest["entries"].get(key)
        fail_key = f"{files[item.path.relative_to(root.resolve()).as_posix()]['sha256']}:{shape}:{frames}"
        fail_keys.add(fail_key)
        if entry and (cache_dir / entry["file"]).is_file():
            result.cached += 1
        elif fail_key in manifest["failed"]:  # failed before with the same bytes: don't decode it again
            _skip(result, item, manifest["failed"][fail_key], recipe.data.strict)
        else:
            todo.append((key, item, caption, frames, fail_key))

    # 2. Encode what is missing. The encoders load only if there is something to encode.
    if todo:
        encoders = None
        try:
            for key, item, caption, frames, fail_key in progress(todo, desc="caching", unit="clip"):
                try:
                    video = load_clip(item.path, shape.width, shape.height, frames)
                except MediaError as exc:
                    manifest["failed"][fail_key] = str(exc)
                    _skip(result, item, str(exc), recipe.data.strict)
                    continue
                if encoders is None:
                    say(f"loading the {family.name} VAE and text encoder from {source.base} on {device}")
                    encoders = family.load_encoders(source, device, text_dtype)
                latents = family.encode_video(encoders, video.unsqueeze(0))[0]
                text = family.encode_prompts(encoders, [caption], recipe.cache.max_sequence_length)[0]
                shard = Path("items") / f"{key}.safetensors"
                atomic_save_safetensors(
                    {"latents": latents, "text": text},
                    cache_dir / shard,
                    {"source": item.path.name, "caption": caption},
                )
                manifest["entries"][key] = {
                    "source": item.path.relative_to(root.resolve()).as_posix(),
                    "caption": caption,
                    "file": shard.as_posix(),
                    "latent_shape": list(latents.shape),
                }
                result.new += 1
                # Save the index as we go: a crash after hours of encoding keeps every finished clip.
                manifest["files"] = {**manifest["files"], **files}
                atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
        finally:
            del encoders
            free_memory()

    # 3. Forget entries the dataset no longer has (changed captions, removed or edited clips).
    keep = {key for key, *_ in wanted}
    for key in [k for k in manifest["entries"] if k not in keep]:
        (cache_dir / manifest["entries"].pop(key)["file"]).unlink(missing_ok=True)
        result.removed += 1
    manifest["failed"] = {k: v for k, v in manifest["failed"].items() if k in fail_keys}
    manifest["files"] = files
    if json.dumps(manifest, sort_keys=True) != before:
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))

    result.files = [
        cache_dir / manifest["entries"][k]["file"] for k, *_ in wanted if k in manifest["entries"]
    ]
    _report(result, root)
    if not result.files:
        raise UserError(f"data.path: no usable clips in {root} (see the problems above)")
    return result


def _skip(result: CacheResult, item: Item, reason: str, strict: bool) -> None:
    if strict:
        raise UserError(
            f"{item.path}: {reason} (data.strict=true; fix or remove the file, or set data.strict=false)"
        )
    result.problems.append(Problem(item.path, reason))


def _report(result: CacheResult, root: Path) -> None:
    say(f"cache: {result.summary()}")
    skipped = [p for p in result.problems if "caption" not in p.reason]
    no_caption = [p for p in result.problems if "caption" in p.reason]
    if no_caption:
        warn(f"{len(no_caption)} clip(s) have no caption file and train with an empty caption:")
        for p in no_caption:
            say(f"  {p.path}")
    if skipped:
        warn(f"{len(skipped)} file(s) skipped:")
        for p in skipped:
            say(f"  {p.path}: {p.reason}")


def load_item(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
