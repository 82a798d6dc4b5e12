"""`finetune check-data`: decode every clip at the recipe's size and length, and say what will be trained on."""

from __future__ import annotations

from pathlib import Path

from finetune.config import build_recipe, load_recipe
from finetune.data import MediaError, Problem, discover, load_clip
from finetune.errors import UserError
from finetune.models import get_family
from finetune.ui import progress, say


def check_data(target: str, overrides: list[str] = ()) -> int:
    """Returns the number of usable items; raises UserError when there are none (or any problem, if strict)."""
    if Path(target).is_dir():  # a bare folder: checked against the default recipe (Wan, 832x480, 81 frames)
        recipe = build_recipe({"model": {"path": "-", "family": "wan"}, "data": {"path": target}}, overrides)
    else:
        recipe = load_recipe(target, overrides)
    family = get_family(recipe.model.family or "wan")
    d = recipe.data
    m = family.size_multiple
    width, height, frames = d.width // m * m, d.height // m * m, family.valid_frames(d.frames)
    items, problems = discover(Path(d.path), strict=d.strict)
    usable = 0
    for item in progress(items, desc="checking", unit="file"):
        try:
            load_clip(item.path, width, height, 1 if item.is_image else frames)
            usable += 1
        except MediaError as exc:
            if d.strict:
                raise UserError(f"{item.path}: {exc} (data.strict=true)") from None
            problems.append(Problem(item.path, str(exc)))
    images = sum(item.is_image for item in items)
    say(
        f"{d.path}: {len(items)} files ({len(items) - images} videos, {images} images), {usable} usable "
        f"at {width}x{height}, {frames} frames"
    )
    for p in problems:
        say(f"  {p.path}: {p.reason}")
    if not usable:
        raise UserError(f"data.path: nothing usable in {d.path}")
    return usable
