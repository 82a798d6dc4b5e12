"""Family.fit, the one rounding rule behind generate, validation samples and the data plan: sizes down to the
family's size multiple, frames down to its frame rule; numbers worked out by hand from each model's VAE."""

import pytest

from finetune.models import cogvideox, hunyuan, ltx, wan


def wan_variant(name: str):
    return next(f for f in wan.FAMILY.variants() if f.variant == name)


@pytest.mark.parametrize(
    "family,requested,fitted",
    [
        # Wan 2.1: 8x VAE x 2x2 patch = 16 px, 4k+1 frames.
        (wan.FAMILY, (832, 480, 81), (832, 480, 81)),
        (wan.FAMILY, (833, 479, 84), (832, 464, 81)),
        # Wan 2.2 TI2V-5B: its 16x VAE x 2x2 patch = 32 px.
        (wan_variant("ti2v"), (1280, 704, 121), (1280, 704, 121)),
        (wan_variant("ti2v"), (832, 480, 50), (832, 480, 49)),
        (wan_variant("ti2v"), (1000, 700, 120), (992, 672, 117)),
        (wan_variant("i2v"), (1000, 700, 120), (992, 688, 117)),
        # LTX-Video: 32x VAE, patch 1, 8k+1 frames.
        (ltx.FAMILY, (720, 500, 160), (704, 480, 153)),
        (ltx.FAMILY, (704, 480, 8), (704, 480, 1)),
        (cogvideox.FAMILY, (720, 480, 49), (720, 480, 49)),
        (hunyuan.FAMILY, (1279, 719, 128), (1264, 704, 125)),
    ],
)
def test_fit_rounds_down_to_the_size_multiple_and_the_frame_rule(family, requested, fitted):
    assert family.fit(*requested) == fitted


def test_fit_leaves_a_too_small_size_at_zero_for_the_caller_to_refuse_or_clamp():
    assert wan.FAMILY.fit(15, 480, 0) == (0, 480, 1)  # an image is 1 frame
    assert wan_variant("ti2v").fit(31, 64, 1) == (0, 64, 1)


def test_each_caller_keeps_its_own_policy_for_a_too_small_size(capsys):
    """generate and the data plan refuse with one line; on a size the rule changes, generate says so."""
    from types import SimpleNamespace

    from finetune.data.plan import target_size
    from finetune.errors import UserError
    from finetune.generate import GenerateSettings, _fit

    ti2v = wan_variant("ti2v")
    with pytest.raises(UserError, match=r"^--width/--height: 20x64 is below the 32-pixel minimum of wan$"):
        _fit(ti2v, GenerateSettings("p", width=20, height=64, frames=9))
    s = _fit(ti2v, GenerateSettings("p", width=100, height=64, frames=10))
    assert (s.width, s.height, s.frames) == (96, 64, 9)
    assert "generating 96x64x9" in capsys.readouterr().err
    recipe = SimpleNamespace(data=SimpleNamespace(width=100, height=20))
    assert target_size(SimpleNamespace(data=SimpleNamespace(width=100, height=70)), ltx.FAMILY) == (96, 64)
    with pytest.raises(UserError, match=r"^data.width/data.height: 100x20 is below the 32-pixel minimum$"):
        target_size(recipe, ltx.FAMILY)
