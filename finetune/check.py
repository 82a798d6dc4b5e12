"""`finetune check-data`: the linter run before caching. It says exactly what will be trained on and why anything
will not: every file that cannot be used with its reason, the bucket histogram, caption problems, duplicates,
durations, frame rates, resolutions, and the disk space the cache will need.

It probes every file (header, packet count, first frame) but decodes no more, so it takes seconds per thousand
clips; a file that breaks further in is caught, named and skipped by `finetune cache`. The target may be a recipe,
a folder, or a Hub dataset id (read from the local Hugging Face cache); the report says which folder each dataset
resolved to (Hub snapshot, split folder) and which clips are turned upright by their display rotation.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from finetune.config import Recipe, build_recipe, load_recipe
from finetune.data.hub_cache import looks_like_dataset_id
from finetune.data.plan import Plan, make_plan
from finetune.data.sources import DatasetSpec, collect
from finetune.errors import UserError
from finetune.models import get_family
from finetune.ui import say


def check_data(target: str, overrides: list[str] = (), as_json: bool = False) -> int:
    """Prints the report; returns the number of usable files. Raises UserError when nothing is usable, or under
    data.strict when anything is wrong (after printing the whole report, so every problem is seen at once)."""
    bare = Path(target).is_dir() or (
        looks_like_dataset_id(target) and not target.endswith((".yaml", ".yml", ".json"))
    )
    if bare:  # a folder or Hub dataset: checked against the default recipe (Wan, 832x480, 81 frames)
        recipe = build_recipe({"model": {"path": "-", "family": "wan"}, "data": {"path": target}}, overrides)
    else:
        recipe = load_recipe(target, overrides)
    family = get_family(recipe.model.family or "wan")
    media_dir = Path(recipe.cache.dir).expanduser() / "media"  # where Parquet/Arrow rows are written out
    specs, items, problems = collect(recipe.data.model_copy(update={"strict": False}), media_dir)
    plan = make_plan(recipe, family, specs, items, problems)
    report = build_report(recipe, plan, items, specs)
    report["captions"].update(_token_stats(recipe, plan))
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _print(report, plan)
    if not report["usable_files"]:
        raise UserError(f"data.path: nothing usable in {', '.join(report['roots'])} (see the reasons above)")
    if recipe.data.strict and plan.problems:
        raise UserError(f"data.strict=true and {len(plan.problems)} problem(s) were found (listed above)")
    return report["usable_files"]


def build_report(recipe: Recipe, plan: Plan, items, specs: list[DatasetSpec]) -> dict:
    used = {s.item.path for s in plan.samples}
    videos = [i for i in items if not i.is_image]
    infos = [plan.infos[i.path] for i in videos if i.path in plan.infos]
    seconds = [info.seconds for info in infos if info.seconds is not None]
    by_kind = {kind: [p for p in plan.problems if p.kind == kind] for kind in ("error", "dropped", "warning")}
    captions = [c for i in items for c in i.captions]
    words = [len(c.split()) for c in captions]
    return {
        "roots": [str(s.root) for s in specs],  # the folders read (a Hub snapshot, a split folder)
        "sources": [{"key": s.key, "path": s.path, "root": str(s.root), "source": s.source} for s in specs],
        "files": len(items),
        "videos": len(videos),
        "images": len(items) - len(videos),
        "usable_files": len(used),
        "items": sum(s.repeats for s in plan.samples),  # samples per epoch, repeats included
        "samples": len(plan.samples),  # distinct cache entries
        "shape": {"width": plan.width, "height": plan.height, "frames": plan.frames},
        "buckets": plan.histogram(),
        "errors": [_row(p) for p in by_kind["error"]],
        "dropped": [_row(p) for p in by_kind["dropped"]],
        "warnings": [_row(p) for p in by_kind["warning"]],
        "duplicates": _duplicates([i.path for i in items if i.path in plan.infos]),
        "durations_s": _spread(seconds) | {"total": round(sum(seconds), 2)},
        "fps": _counts(f"{info.fps:g}" if info.fps else "unknown" for info in infos),
        "resolutions": _counts(f"{info.width}x{info.height}" for info in plan.infos.values()),  # as displayed
        "rotated": [
            {"file": str(path), "degrees": info.rotation, "displayed": f"{info.width}x{info.height}"}
            for path, info in plan.infos.items()
            if info.rotation
        ],
        "captions": {
            "with_caption": sum(i.has_caption and bool(i.captions) for i in items),
            "missing": sum(not i.has_caption for i in items),
            "empty": sum(i.has_caption and not i.captions for i in items),
            "several_per_file": sum(len(i.captions) > 1 for i in items),
            "words": _spread(words),
        },
        "cache_bytes": _cache_bytes(recipe, plan),
    }


def _row(problem) -> dict:
    return {"file": str(problem.path), "reason": problem.reason}


def _spread(values: list[float]) -> dict:
    if not values:
        return {"min": None, "max": None, "mean": None}
    return {
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "mean": round(sum(values) / len(values), 2),
    }


def _counts(values) -> dict[str, int]:
    return dict(Counter(values).most_common())


def _duplicates(paths: list[Path]) -> list[list[str]]:
    """Groups of files with identical bytes. Only files whose sizes collide are hashed."""
    by_size: dict[int, list[Path]] = {}
    for path in paths:
        by_size.setdefault(path.stat().st_size, []).append(path)
    groups: dict[str, list[str]] = {}
    for same_size in (group for group in by_size.values() if len(group) > 1):
        for path in same_size:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            groups.setdefault(digest, []).append(str(path))
    return [group for group in groups.values() if len(group) > 1]


def _local_model(recipe: Recipe) -> Path | None:
    path = Path(recipe.model.base or recipe.model.path).expanduser()
    return path if (path / "model_index.json").is_file() else None


def _cache_bytes(recipe: Recipe, plan: Plan) -> int | None:
    """Upper bound of the cache's size: latents (fp32) + each caption variant at the full token length. Needs the
    model's VAE and text encoder configs (a local folder); None when they are not at hand."""
    folder = _local_model(recipe)
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        text = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return None
    channels, width = (
        vae.get("z_dim") or vae.get("latent_channels"),
        text.get("d_model") or text.get("hidden_size"),
    )
    if not channels or not width:
        return None
    total = 0
    for s in plan.samples:
        latent_frames = 1 + (s.frames - 1) // 4
        total += channels * latent_frames * (s.height // 8) * (s.width // 8) * 4
        total += len(s.captions) * recipe.cache.max_sequence_length * width * 4
    return total


def _token_stats(recipe: Recipe, plan: Plan) -> dict:
    """Captions longer than the text encoder keeps, counted with the model's own tokenizer (local models only)."""
    folder = _local_model(recipe)
    if folder is None:
        return {}
    try:
        import transformers

        name = json.loads((folder / "model_index.json").read_text())["tokenizer"][1]
        tokenizer = getattr(transformers, name).from_pretrained(folder, subfolder="tokenizer")
    except Exception:  # no tokenizer in that folder, or an unknown class: the count is optional
        return {}
    limit = recipe.cache.max_sequence_length
    over = sorted(
        {
            str(s.item.path)
            for s in plan.samples
            for c in s.captions
            if len(tokenizer(c, add_special_tokens=True).input_ids) > limit
        }
    )
    return {"token_limit": limit, "over_token_limit": over}


def _print(report: dict, plan: Plan) -> None:
    shape = report["shape"]
    say(
        f"{', '.join(report['roots'])}: {report['files']} files ({report['videos']} videos, {report['images']} "
        f"images), {report['usable_files']} usable at {shape['width']}x{shape['height']}, {shape['frames']} frames"
    )
    for source in report["sources"]:
        if source["source"]:
            say(f"{source['key']}: {source['path']} -> {source['root']} ({source['source']})")
    for note in plan.notes:
        say(f"note: {note}")
    say(f"{report['items']} training items per epoch in {len(report['buckets'])} bucket(s):")
    for bucket, count in report["buckets"].items():
        say(f"  {bucket:>14}  {count}")
    d = report["durations_s"]
    if d["total"]:
        say(f"durations: {d['min']}-{d['max']} s (total {d['total']} s); fps: {report['fps']}")
    c = report["captions"]
    say(
        f"captions: {c['with_caption']} present, {c['missing']} missing, {c['empty']} empty, "
        f"{c['several_per_file']} with several lines"
    )
    for path in c.get("over_token_limit", []):
        say(f"  {path}: a caption is longer than {c['token_limit']} tokens (the rest is cut)")
    if report["rotated"]:
        say(f"rotated clips, used upright ({len(report['rotated'])}):")
        for row in report["rotated"]:
            say(f"  {row['file']}: turned {row['degrees']} degrees, {row['displayed']} as displayed")
    for group in report["duplicates"]:
        say(f"duplicate files (same bytes): {', '.join(group)}")
    if report["cache_bytes"] is not None:
        say(f"cache size needed: at most {report['cache_bytes'] / 2**20:.1f} MiB")
    for title, key in (("skipped", "errors"), ("dropped", "dropped"), ("warnings", "warnings")):
        if report[key]:
            say(f"{title} ({len(report[key])}):")
            for row in report[key]:
                say(f"  {row['file']}: {row['reason']}")
