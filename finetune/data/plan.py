"""From items to samples: probe each file, pick its size and frame buckets, cut its frame windows.

A sample is one cache entry: one window of one clip (or one image) at one bucket, with every caption variant it
may train with. `check-data` prints the plan; `cache` encodes it. Every item that yields no sample is reported
with the reason (nothing is dropped silently).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import Recipe
from finetune.data.buckets import aspect_buckets, frame_buckets, pick_size
from finetune.data.decode import MediaError, MediaInfo, probe
from finetune.data.discover import Item, Problem
from finetune.data.extract import TooShort, plan_windows
from finetune.data.sources import DatasetSpec, caption_variants
from finetune.errors import UserError


@dataclass(frozen=True)
class Sample:
    item: Item
    width: int
    height: int
    frames: int
    indices: tuple[int, ...]  # source frame indices; () for an image
    window: int  # the window's number within its clip (slide / chain give several)
    captions: tuple[str, ...]  # every caption variant, trigger applied; the first is the default
    repeats: int  # times per epoch (the dataset's repeats)

    @property
    def bucket(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass
class Plan:
    samples: list[Sample]
    problems: list[Problem]
    infos: dict[Path, MediaInfo] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    width: int = 0  # the target size after rounding, and the longest frame bucket: the "shape" of the run
    height: int = 0
    frames: int = 0

    def histogram(self) -> dict[str, int]:
        counts = Counter(s.bucket for s in self.samples)
        return dict(sorted(counts.items(), key=lambda kv: [int(x) for x in kv[0].split("x")]))


def target_size(recipe: Recipe, family) -> tuple[int, int]:
    d = recipe.data
    width, height, _ = family.fit(d.width, d.height, 1)  # frames: per dataset, by its frame buckets
    if min(width, height) == 0:
        raise UserError(
            f"data.width/data.height: {d.width}x{d.height} is below the {family.size_multiple}-pixel minimum"
        )
    return width, height


def make_plan(
    recipe: Recipe,
    family,
    specs: list[DatasetSpec],
    items: list[Item],
    problems: list[Problem],
    probe_fn: Callable[[Item], MediaInfo] = lambda item: probe(item.path),
) -> Plan:
    d, m = recipe.data, family.size_multiple
    width, height = target_size(recipe, family)
    plan = Plan([], list(problems), width=width, height=height)
    if (width, height) != (d.width, d.height):
        plan.notes.append(
            f"{family.name} needs sizes divisible by {m}; using {width}x{height} (data: {d.width}x{d.height})"
        )
    sizes = aspect_buckets(width, height, m, d.aspect_buckets)
    lengths = {}
    for spec in specs:
        lengths[spec.index] = frame_buckets(spec.frame_buckets, family.valid_frames)
        if list(lengths[spec.index]) != sorted(set(spec.frame_buckets)):
            plan.notes.append(
                f"{family.name} needs {family.frame_step}k+1 frames; {spec.key.removesuffix('.path')} frame "
                f"buckets {list(spec.frame_buckets)} -> {list(lengths[spec.index])}"
            )
    plan.frames = max(max(v) for v in lengths.values())

    for item in items:
        spec = specs[item.dataset]
        try:
            info = probe_fn(item)
        except MediaError as exc:
            plan.problems.append(Problem(item.path, str(exc)))
            continue
        plan.infos[item.path] = info
        try:
            w, h = pick_size((info.width, info.height), sizes, m, d.no_upscale)
        except ValueError as exc:
            plan.problems.append(Problem(item.path, str(exc), "dropped"))
            continue
        captions = caption_variants(item, spec)
        if info.is_image:
            plan.samples.append(Sample(item, w, h, 1, (), 0, captions, spec.repeats))
            continue
        try:
            frames, windows = plan_windows(
                info.frames,
                info.fps,
                lengths[spec.index],
                spec.frame_extraction,
                spec.frame_stride,
                spec.target_fps,
                family.valid_frames,
            )
        except TooShort as exc:
            reason = str(exc)
            if info.header_frames > info.frames:
                reason = f"is truncated ({info.frames} of {info.header_frames} frames readable); {reason}"
            plan.problems.append(Problem(item.path, reason, "dropped"))
            continue
        if info.header_frames > info.frames:
            plan.problems.append(
                Problem(
                    item.path,
                    f"is truncated ({info.frames} of {info.header_frames} frames readable); using those",
                    "warning",
                )
            )
        for number, indices in enumerate(windows):
            plan.samples.append(Sample(item, w, h, frames, indices, number, captions, spec.repeats))
    return plan
