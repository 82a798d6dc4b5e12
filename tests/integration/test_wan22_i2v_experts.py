"""Wan 2.2 I2V-A14B on a tiny layout of the real classes (WanImageToVideoPipeline with two experts, no image
encoder), driven as a new user would: `finetune train` conditions each clip on its first frame and trains both
experts -> both adapter files load into diffusers' pipeline with a LoRA on every block linear of each expert ->
`finetune generate --image` animates an image with both."""

from __future__ import annotations

import av
import pytest
import torch

from finetune.cli import main
from tests.clips import write_image
from tests.family_tiny import block_linears, make_clips, wrapped, write_recipe
from tests.wan_i2v_tiny import build_tiny_wan_i2v


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v_a14b")
    base = build_tiny_wan_i2v(root / "base", clip=False, boundary_ratio=0.9)
    recipe = write_recipe(root / "r.yaml", base, make_clips(root / "clips", 32, 9), root, 32, 5, 16)
    assert main(["train", str(recipe), "train.steps=2"]) == 0
    return {"root": root, "base": base, "adapter": root / "adapter"}


def test_both_experts_load_into_diffusers_on_every_block_linear(world):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(world["base"])
    linears = {id(t): block_linears(t, "blocks") for t in (pipe.transformer, pipe.transformer_2)}
    pipe.load_lora_weights(world["adapter"], adapter_name="style")
    pipe.load_lora_weights(world["adapter"], weight_name="pytorch_lora_weights_transformer_2.safetensors",
                           adapter_name="style", load_into_transformer_2=True)  # fmt: skip
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert linears[id(transformer)] and wrapped(transformer, "style") == linears[id(transformer)]
        trained = [m.lora_B["style"].weight for m in transformer.modules() if hasattr(m, "lora_B")]
        assert any(w.abs().max() > 0 for w in trained)  # each expert's LoRA moved from its zero start


def test_generate_animates_an_image_with_both_experts(world):
    image = write_image(world["root"] / "first.png", 32, 32, color=(200, 30, 30))
    out = world["root"] / "animated.mp4"
    args = ["generate", "--model", str(world["base"]), "--lora", str(world["adapter"]), "--prompt", "a red square",
            "--image", str(image), "--width", "32", "--height", "32", "--frames", "5", "--steps", "2",
            "--max-sequence-length", "16", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    assert torch.tensor(frames[0]).float().std() > 0
