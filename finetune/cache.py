"""The latent + text-embedding cache: every sample is encoded once, to disk.

Layout of `cache.dir`:
    manifest.json              index: entries by key, per-file records (size, mtime, sha256, probe), owners
    items/<key>.safetensors    {"latents": (C, F', H', W'), "text": (tokens, dim), "text.1": ...} for one sample
    empty_text-<hash>.safetensors   the empty prompt's embedding (caption dropout), encoded once
    .lock                      held while a `finetune cache` runs, so two runs never interleave their writes

A key hashes everything that changes a sample's tensors: the file's content, its caption variants, its bucket
(width, height, frames), the exact source frames, and the encoders' settings. So recipes with different settings
write different keys and never overwrite each other's shards.

Crash safety: a shard is written to a temp file and renamed, so `items/<key>.safetensors` existing means it is
complete. A killed run loses at most the shard in flight; the rerun adopts every finished shard even if the
manifest never heard of it (the manifest is saved every few seconds, not after every clip: with 10,000 clips
rewriting it each time would cost gigabytes of writes), and deletes the dead run's temp files.

Ownership: each entry records which recipes use it (by output.dir). A rerun releases the entries its dataset no
longer has; a shard is deleted when no recipe uses it. `--clean` also drops entries whose source file is gone or
changed, shards the manifest does not list, and records of vanished files.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.config import Recipe
from finetune.data import MediaError, Problem
from finetune.data.batches import TextChoice, text_tensors, video_tensors
from finetune.data.decode import MediaInfo, decode_windows, load_image, probe
from finetune.data.discover import raise_if_strict
from finetune.data.plan import Sample, make_plan
from finetune.data.sources import collect
from finetune.errors import UserError
from finetune.io import atomic_save_safetensors, atomic_write_text
from finetune.models import Family, Source
from finetune.ui import progress, say, warn

CACHE_VERSION = 2
MANIFEST_EVERY_S = (
    10.0  # the longest stretch of work whose index a crash can lose (the shards survive anyway)
)


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    frames: int


@dataclass
class CacheResult:
    files: list[Path]  # one shard per sample, repeated `repeats` times, in dataset order
    shape: Shape  # the target size and the longest frame bucket (after the family's rounding)
    cached: int = 0
    new: int = 0
    removed: int = 0
    problems: list[Problem] = field(default_factory=list)
    text_choice: TextChoice = field(default_factory=TextChoice)

    def summary(self) -> str:
        return f"{self.cached} cached, {self.new} new" + (f", {self.removed} removed" if self.removed else "")


def resolve_shape(recipe: Recipe, family: Family) -> Shape:
    """The run's largest bucket: the target size rounded to the family's step and the longest frame bucket."""
    from finetune.data.buckets import frame_buckets
    from finetune.data.plan import target_size
    from finetune.data.sources import dataset_specs

    width, height = target_size(recipe, family)
    frames = max(max(frame_buckets(s.frame_buckets, family.valid_frames)) for s in dataset_specs(recipe.data))
    return Shape(width, height, frames)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record(path: Path, known: dict | None) -> dict:
    """The file's record: size, mtime, content hash and probe result, reusing the known one while size and mtime
    are unchanged (hashing and probing 2,000 clips is minutes; a rerun should take seconds)."""
    stat = path.stat()
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _settings(recipe: Recipe, family: Family, source: Source, text_dtype: torch.dtype) -> dict:
    # Everything global that changes the encoded tensors. The transformer is not in it: latents depend only on
    # the VAE and text encoder, so retraining from another transformer of the same base reuses the cache.
    return {
        "version": CACHE_VERSION,
        "family": family.name,
        # Wan I2V / FLF2V / TI2V cache other tensors than Wan T2V (absent for a family's plain variant).
        **({"variant": family.variant} if family.variant else {}),
        "encoders": source.base,
        "max_sequence_length": recipe.cache.max_sequence_length,
        "text_dtype": str(text_dtype).removeprefix("torch."),
        # int8 text encoding and tiled VAE encoding change the tensors slightly: a switch re-encodes.
        "text_encoder": recipe.memory.text_encoder,
        "vae_tiling": recipe.memory.vae_tiling,
    }


def sample_key(settings: dict, content_hash: str, sample: Sample) -> str:
    blob = {
        **settings,
        "content": content_hash,
        "captions": list(sample.captions),
        "bucket": [sample.width, sample.height, sample.frames],
        "indices": list(sample.indices),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def encode_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def _empty_manifest() -> dict:
    return {"version": CACHE_VERSION, "entries": {}, "files": {}, "failed": {}}


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        return _empty_manifest()
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        warn(f"{path} is unreadable; rebuilding the cache index (finished shards are adopted again)")
        return _empty_manifest()
    if manifest.get("version") != CACHE_VERSION:  # older layout: its entries belong to nobody and are removed
        return {
            **_empty_manifest(),
            "entries": {k: {**v, "owners": []} for k, v in manifest["entries"].items()},
        }
    return manifest


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run at a time is then the user's job
        yield
        return
    with open(cache_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"cache.dir: {cache_dir} is in use by another `finetune cache`/`train`; wait for it to finish"
            ) from None
        yield


def _shard_ok(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header against the file's size
            keys = set(f.keys())
        return {"latents", "text"} <= keys
    except Exception:  # a file that does not parse is not a shard we can use, whatever the error
        return False


def _owner(recipe: Recipe) -> str:
    return hashlib.sha256(str(Path(recipe.output.dir).expanduser().resolve()).encode()).hexdigest()[:12]


def build_cache(recipe: Recipe, family: Family, source: Source, clean: bool = False) -> CacheResult:
    specs, items, problems = collect(recipe.data, Path(recipe.cache.dir).expanduser() / "media")
    device, text_dtype = encode_device()
    settings = _settings(recipe, family, source, text_dtype)
    cache_dir = Path(recipe.cache.dir).expanduser()
    with _locked(cache_dir):
        for stray in list(cache_dir.glob(".*.tmp")) + list((cache_dir / "items").glob(".*.tmp")):
            stray.unlink(missing_ok=True)  # a killed run's half-written file: we hold the lock, so it is dead
        return _build(recipe, family, source, specs, items, problems, settings, device, text_dtype, clean)


def _build(
    recipe, family, source, specs, items, problems, settings, device, text_dtype, clean
) -> CacheResult:
    cache_dir = Path(recipe.cache.dir).expanduser()
    manifest_path = cache_dir / "manifest.json"
    manifest = _read_manifest(manifest_path)
    before = json.dumps(manifest, sort_keys=True)
    owner = _owner(recipe)
    records: dict[str, dict] = {}

    def probe_cached(item) -> MediaInfo:
        record = records.setdefault(str(item.path), _record(item.path, manifest["files"].get(str(item.path))))
        # A record from before rotation was probed has the stored (maybe sideways) size: probe again.
        if "probe" not in record or not {"error", "rotation"} & record["probe"].keys():
            try:
                record["probe"] = probe(item.path).__dict__
            except MediaError as exc:
                record["probe"] = {"error": str(exc)}
        if "error" in record["probe"]:
            raise MediaError(record["probe"]["error"])
        return MediaInfo(**record["probe"])

    plan = make_plan(recipe, family, specs, items, problems, probe_cached)
    for note in plan.notes:
        say(f"note: {note}")
    raise_if_strict([p for p in plan.problems if p.kind != "warning"], recipe.data.strict)

    # 1. Each sample's key; a shard on disk under that key is complete (atomic rename), manifest or not.
    result = CacheResult([], Shape(plan.width, plan.height, plan.frames), problems=list(plan.problems))
    keyed: list[tuple[str, Sample]] = []
    todo: list[tuple[str, Sample]] = []
    queued: set[str] = set()
    for sample in plan.samples:
        record = records[str(sample.item.path)]
        if "sha256" not in record:
            record["sha256"] = _sha256(sample.item.path)
        key = sample_key(settings, record["sha256"], sample)
        keyed.append((key, sample))
        shard = cache_dir / "items" / f"{key}.safetensors"
        entry = manifest["entries"].get(key)
        if entry is None and shard.is_file() and _shard_ok(shard):
            entry = manifest["entries"][key] = _entry(shard, sample, record["sha256"], cache_dir)
        if entry and (cache_dir / entry["file"]).is_file():
            entry["owners"] = sorted(set(entry.get("owners", [])) | {owner})
            result.cached += 1
        elif key in manifest["failed"]:  # failed before with the same bytes: don't decode it again
            _skip(result, sample.item.path, manifest["failed"][key], recipe.data.strict)
        elif key not in queued:  # two datasets listing the same file with the same settings share a shard
            queued.add(key)
            todo.append((key, sample))
    manifest["files"].update(records)

    # 2. Encode what is missing; the encoders load only if there is something to encode.
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    empty_path = cache_dir / f"empty_text-{settings_hash}.safetensors"
    need_empty = recipe.data.caption_dropout > 0 and not empty_path.is_file()
    if todo or need_empty:
        encoders = None
        saved_at = time.monotonic()
        bar = progress(total=len(todo), desc="caching", unit="clip")
        try:
            for key, sample, video in _prefetch(_decoded(todo)):
                if isinstance(video, MediaError):
                    manifest["failed"][key] = str(video)
                    _skip(result, sample.item.path, str(video), recipe.data.strict)
                    bar.update(1)
                    continue
                if encoders is None:
                    encoders = _load_encoders(family, source, device, text_dtype, recipe.memory)
                _encode_sample(recipe, family, encoders, key, sample, video, cache_dir, manifest, owner)
                result.new += 1
                bar.update(1)
                if time.monotonic() - saved_at > MANIFEST_EVERY_S:
                    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
                    saved_at = time.monotonic()
            if need_empty:
                encoders = encoders or _load_encoders(family, source, device, text_dtype, recipe.memory)
                empty = family.encode_prompts(encoders, [""], recipe.cache.max_sequence_length)
                atomic_save_safetensors(text_tensors(empty), empty_path, {"prompt": ""})
        finally:
            bar.close()
            del encoders
            free_memory()

    # 3. Release what this recipe no longer uses; delete shards nobody uses.
    wanted = {key for key, _ in keyed}
    for key, entry in list(manifest["entries"].items()):
        owners = set(entry.get("owners", []))
        if key not in wanted:
            owners.discard(owner)
        if clean and key not in wanted and _source_changed(entry, manifest["files"]):
            owners = set()
        entry["owners"] = sorted(owners)
        if not owners:
            (cache_dir / manifest["entries"].pop(key)["file"]).unlink(missing_ok=True)
            result.removed += 1
    manifest["failed"] = {k: v for k, v in manifest["failed"].items() if k in wanted or not clean}
    if clean:
        result.removed += _clean_strays(cache_dir, manifest)
    if json.dumps(manifest, sort_keys=True) != before:
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))

    for key, sample in keyed:
        if key in manifest["entries"]:
            result.files += [cache_dir / manifest["entries"][key]["file"]] * sample.repeats
    if recipe.data.caption_dropout > 0:
        result.text_choice = TextChoice(recipe.data.caption_dropout, empty_path, recipe.train.seed)
    _report(result)
    if not result.files:
        raise UserError("data.path: no usable clips (see the problems above)")
    return result


def _entry(shard: Path, sample: Sample, content: str, cache_dir: Path) -> dict:
    with safe_open(str(shard), framework="pt") as f:
        latent_shape = list(f.get_slice("latents").get_shape())
    return {
        "file": shard.relative_to(cache_dir).as_posix(),
        "source": str(sample.item.path),
        "sha256": content,
        "caption": sample.captions[0],
        "captions": list(sample.captions),
        "bucket": sample.bucket,
        "window": sample.window,
        "latent_shape": latent_shape,
        "owners": [],
    }


def _decoded(todo: list[tuple[str, Sample]]) -> Iterator[tuple[str, Sample, torch.Tensor | MediaError]]:
    """(key, sample, video or the MediaError that stopped it), decoding each file once for all its windows."""
    by_item: dict[Path, list[tuple[str, Sample]]] = {}
    for key, sample in todo:
        by_item.setdefault(sample.item.path, []).append((key, sample))
    for path, group in by_item.items():
        first = group[0][1]
        if first.item.is_image:
            for key, sample in group:
                try:
                    yield key, sample, load_image(path, sample.width, sample.height)
                except MediaError as exc:
                    yield key, sample, exc
            continue
        done = set()
        try:
            for number, video in decode_windows(
                path, [s.indices for _, s in group], first.width, first.height
            ):
                done.add(number)
                yield group[number][0], group[number][1], video
        except MediaError as exc:
            for number, (key, sample) in enumerate(group):
                if number not in done:
                    yield key, sample, exc


def _prefetch(iterable, depth: int = 1):
    """Runs `iterable` in a thread, `depth` items ahead: FFmpeg and torch release the GIL, so the next clip
    decodes while this one encodes. Memory: `depth` extra decoded windows. If the consumer stops early (an
    error, strict mode), the thread notices within 0.1 s and ends instead of blocking forever."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def hand_over(value) -> bool:
        while not stop.is_set():
            try:
                slots.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for value in iterable:
                if not hand_over(value):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            hand_over(exc)
            return
        hand_over(done)

    threading.Thread(target=work, daemon=True, name="finetune-decode").start()
    try:
        while (value := slots.get()) is not done:
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()


def _load_encoders(family: Family, source: Source, device: torch.device, dtype: torch.dtype, memory=None):
    say(f"loading the {family.name} VAE and text encoder from {source.base} on {device}")
    from finetune.memory import load_encoders_for_plan  # memory.text_encoder (gpu|int8|cpu), vae_tiling

    return load_encoders_for_plan(family, source, device, dtype, memory)


def _encode_sample(recipe, family, encoders, key, sample, video, cache_dir, manifest, owner) -> None:
    limit = recipe.cache.max_sequence_length
    tokenizer = getattr(encoders, "tokenizer", None)
    for caption in sample.captions if tokenizer is not None else ():
        count = len(tokenizer(caption, add_special_tokens=True).input_ids)
        if count > limit:
            warn(
                f"{sample.item.path}: caption is {count} tokens; the text encoder keeps {limit} (the rest is cut)"
            )
    tensors = video_tensors(family.encode_video(encoders, video.unsqueeze(0)))
    tensors |= text_tensors(family.encode_prompts(encoders, list(sample.captions), limit))
    shard = cache_dir / "items" / f"{key}.safetensors"
    atomic_save_safetensors(tensors, shard, {"source": sample.item.path.name, "bucket": sample.bucket})
    entry = _entry(shard, sample, manifest["files"][str(sample.item.path)]["sha256"], cache_dir)
    manifest["entries"][key] = {**entry, "owners": [owner]}


def _source_changed(entry: dict, files: dict) -> bool:
    path = Path(entry.get("source", ""))
    if not path.is_file():
        return True
    record = files.get(str(path), {})
    stat = path.stat()
    if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return record.get("sha256", entry.get("sha256")) != entry.get("sha256")
    return _sha256(path) != entry.get("sha256")


def _clean_strays(cache_dir: Path, manifest: dict) -> int:
    """Shards the manifest does not list, and records of files that no longer exist."""
    listed = {cache_dir / e["file"] for e in manifest["entries"].values()}
    strays = [p for p in (cache_dir / "items").glob("*.safetensors") if p not in listed]
    for path in strays:
        path.unlink()
    manifest["files"] = {k: v for k, v in manifest["files"].items() if Path(k).exists()}
    return len(strays)


def _skip(result: CacheResult, path: Path, reason: str, strict: bool) -> None:
    if strict:
        raise UserError(
            f"{path}: {reason} (data.strict=true; fix or remove the file, or set data.strict=false)"
        )
    result.problems.append(Problem(path, reason))


def _report(result: CacheResult) -> None:
    say(f"cache: {result.summary()}")
    warnings = [p for p in result.problems if p.kind == "warning"]
    skipped = [p for p in result.problems if p.kind != "warning"]
    if warnings:
        warn(f"{len(warnings)} item(s) used with a warning:")
        for p in warnings:
            say(f"  {p.path}: {p.reason}")
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
