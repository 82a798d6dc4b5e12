"""LTX-Video image-to-video training, driven as a user would: `train.first_frame_conditioning: 1` in the recipe
-> every step gives the clip's clean first latent frame at timestep 0 (per-token timesteps) and leaves it out of
the loss -> the adapter is written and loads in LTXImageToVideoPipeline."""

from __future__ import annotations

import yaml

from finetune import objectives
from finetune.cli import main
from tests.family_tiny import block_linears, build_tiny_ltx, make_clips, wrapped, write_recipe

SIZE, FRAMES, TEXT = 64, 9, 16


def test_first_frame_conditioned_training(tmp_path, monkeypatch):
    from diffusers import LTXImageToVideoPipeline

    base = build_tiny_ltx(tmp_path / "base")
    recipe = write_recipe(tmp_path / "recipe.yaml", base, make_clips(tmp_path / "clips", SIZE, 12), tmp_path,
                          SIZE, FRAMES, TEXT)  # fmt: skip
    settings = yaml.safe_load(recipe.read_text())
    settings["train"]["first_frame_conditioning"] = 1.0
    recipe.write_text(yaml.safe_dump(settings))
    calls, original = [], objectives.condition

    def spy(*args):
        out = original(*args)
        calls.append(out)
        return out

    monkeypatch.setattr(objectives, "condition", spy)
    assert main(["train", str(recipe)]) == 0
    assert len(calls) == 3
    for _, per_token, keep in calls:  # 9 frames at 64 px: 2 latent frames of 2 x 2 tokens
        assert per_token.shape == (1, 8) and per_token[0, :4].eq(0).all() and per_token[0, 4:].gt(0).all()
        assert keep[0, 0, :, 0, 0].tolist() == [False, True]
    pipe = LTXImageToVideoPipeline.from_pretrained(base)
    expected = block_linears(pipe.transformer, "transformer_blocks")
    pipe.load_lora_weights(tmp_path / "adapter", adapter_name="i2v")
    assert wrapped(pipe.transformer, "i2v") == expected and len(expected) == 20
