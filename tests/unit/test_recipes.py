"""Every shipped recipe is valid, says how to launch it, and keeps to the family's size and frame rules."""

from pathlib import Path

import pytest

from finetune.config import load_recipe
from finetune.models import get_family

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid_and_launchable(path):
    recipe = load_recipe(path)
    family = get_family(recipe.model.family)
    assert path.parent.name == family.name
    header = path.read_text().splitlines()[:6]
    assert any(
        line.startswith("# Launch:") and f"finetune train {path.parent.parent.name}/" in line
        for line in header
    )
    assert recipe.data.width % family.size_multiple == 0 and recipe.data.height % family.size_multiple == 0
    assert family.valid_frames(recipe.data.frames) == recipe.data.frames
