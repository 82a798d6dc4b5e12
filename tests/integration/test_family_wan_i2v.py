"""Image-conditioned Wan end to end, driven as a new user would, on tiny pipeline folders the kit has never seen:
Wan 2.1 I2V, FLF2V and Wan 2.2 TI2V-5B. `finetune train` (family and variant read from the folder; the
condition comes from each clip's own frames) -> the variant's diffusers pipeline `load_lora_weights` puts a LoRA
on every block linear (the I2V image keys/values included) -> `finetune merge` at 0.7 equals base + adapter ->
`finetune generate` writes the requested frames in every mode the variant can run; the others are one line."""

from __future__ import annotations

import functools

import av
import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune import objectives
from finetune.cli import main
from finetune.models import wan_i2v
from tests.clips import write_image
from tests.family_tiny import (
    assert_loads_on_every_block_linear,
    assert_merge_matches,
    assert_wrote_frames,
    make_clips,
    write_recipe,
)
from tests.wan_i2v_tiny import IMAGE_TOKENS, build_tiny_wan_i2v, build_tiny_wan_ti2v

FRAMES, TEXT = 9, 16
SIZES = {"i2v": 32, "flf2v": 32, "ti2v": 64}  # TI2V's VAE compresses 16x: 64 px = 4 latent px = 2x2 tokens
PIPELINES = {"i2v": "WanImageToVideoPipeline", "flf2v": "WanImageToVideoPipeline", "ti2v": "WanPipeline"}


@pytest.fixture(scope="module", params=["i2v", "flf2v", "ti2v"])
def world(request, tmp_path_factory):
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    if variant == "ti2v":
        base = build_tiny_wan_ti2v(root / "base")
    else:
        base = build_tiny_wan_i2v(root / "base", last_frame=variant == "flf2v")
    size = SIZES[variant]
    recipe = write_recipe(
        root / "recipe.yaml", base, make_clips(root / "clips", size, 12), root, size, FRAMES, TEXT
    )
    settings = yaml.safe_load(
        recipe.read_text()
    )  # samples at the end; I2V ones start from a cached clip's frame
    settings["train"]["validation"] = {"every": 3, "prompts": ["a red square"], "width": size, "height": size,
                                       "frames": 5, "steps": 2}  # fmt: skip
    recipe.write_text(yaml.safe_dump(settings))
    calls = []  # what the training step's conditioning hook returned, step by step

    def spy(family, x0, noisy, timesteps, extras, *share_and_generator):
        out = original(family, x0, noisy, timesteps, extras, *share_and_generator)
        calls.append(
            {"variant": family.variant, "timesteps": out[1].shape, "keep": out[2], "extras": set(extras)}
        )
        return out

    original = objectives.condition
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objectives, "condition", spy)
        assert main(["train", str(recipe)]) == 0
    return {"variant": variant, "root": root, "base": base, "adapter": root / "adapter", "size": size,
            "calls": calls}  # fmt: skip


def pipeline_class(world):
    import diffusers

    return getattr(diffusers, PIPELINES[world["variant"]])


def transformer_output(world, transformer, seed=0):
    """The transformer on fixed noisy latents, text and (for I2V) condition + image embeddings."""
    g = torch.Generator().manual_seed(seed)
    channels = transformer.config.out_channels
    latents = torch.randn(1, channels, 3, 4, 4, generator=g)
    text = torch.randn(1, TEXT, transformer.config.text_dim, generator=g)
    with torch.no_grad():
        if world["variant"] == "ti2v":
            x0 = torch.randn(latents.shape, generator=g)
            noisy, t, _ = wan_i2v.first_frame_condition(x0, latents, torch.tensor([500.0]))
            return transformer(noisy, t, text, return_dict=False)[0]
        images = 2 if world["variant"] == "flf2v" else 1
        extras = {
            "condition": torch.randn(1, 16, 3, 4, 4, generator=g),
            "image_embeds": torch.randn(1, images, IMAGE_TOKENS, transformer.config.image_dim, generator=g),
        }
        last = world["variant"] == "flf2v"
        return wan_i2v.predict_conditioned(
            transformer, latents, torch.tensor([500.0]), text, extras, last=last
        )


def test_training_cached_each_clips_own_condition(world):
    shards = sorted((world["root"] / "cache" / "items").glob("*.safetensors"))
    assert len(shards) == 2
    item = load_file(str(shards[0]))
    if world["variant"] == "ti2v":
        assert set(item) == {"latents", "text"} and item["latents"].shape == (48, 3, 4, 4)  # nothing extra
    else:
        images = 2 if world["variant"] == "flf2v" else 1
        assert item["condition"].shape == item["latents"].shape == (16, 3, 4, 4)
        assert item["image_embeds"].shape == (images, IMAGE_TOKENS, 16)
        # The condition encodes the clip's first frame, then zeros: the first latent frame is the clip's (the
        # causal VAE encodes frame 0 alone), the others are not.
        assert torch.allclose(item["condition"][:, :1], item["latents"][:, :1], atol=1e-5)
        assert not torch.allclose(item["condition"][:, 1:], item["latents"][:, 1:], atol=1e-3)


def test_each_training_step_was_conditioned_as_the_variant_is(world):
    calls = world["calls"]
    assert len(calls) == 3 and all(c["variant"] == world["variant"] for c in calls)
    for call in calls:
        if world["variant"] == "ti2v":  # clean first frame: per-token timesteps, frame 0 out of the loss
            assert call["timesteps"] == (1, 3 * 2 * 2) and call["keep"][0, 0, :, 0, 0].tolist() == [0, 1, 1]
        else:  # channel-concatenated condition and image embeddings reach predict as extras
            assert call["timesteps"] == (1,) and call["keep"] is None
            assert call["extras"] == {"condition", "image_embeds"}


def test_validation_samples_were_written(world):
    """Before training and at step 3; the I2V variants animate the first (and last) frame of a cached clip."""
    for tag in ("base", "step-3"):
        (sample,) = (world["root"] / "adapter" / "samples" / tag).glob("*.mp4")
        with av.open(str(sample)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == 5 and decoded[0].shape == (world["size"], world["size"], 3)


def test_adapter_loads_in_the_pipeline_on_every_block_linear(world, caplog):
    image_kv = 0 if world["variant"] == "ti2v" else 2  # attn2.add_k_proj / add_v_proj (the image keys/values)
    forward = functools.partial(transformer_output, world)
    assert_loads_on_every_block_linear(
        pipeline_class(world), world, ("blocks",), forward, 2 * (10 + image_kv), caplog
    )


def test_merge_at_0_7_matches_base_plus_adapter(world):
    forward = functools.partial(transformer_output, world)
    assert_merge_matches(pipeline_class(world), world, forward, scale=0.7, tol=1e-4)


MODES = {
    "i2v": [("image", ["--image", "first"], 9, "i2v.mp4")],
    "flf2v": [("keyframes", ["--image", "first", "--last-image", "last"], 9, "kf.mp4")],
    "ti2v": [
        ("t2v", [], 9, "t2v.mp4"),
        ("still", [], 1, "still.png"),
        ("image", ["--image", "first"], 9, "i2v.mp4"),
    ],
}


def generate_args(world, out, frames, *extra):
    size = str(world["size"])
    return ["generate", "--model", str(world["base"]), "--lora", f"{world['adapter']}:0.8", "--prompt",
            "a red square moving right", "--width", size, "--height", size, "--frames", str(frames),
            "--steps", "2", "--max-sequence-length", str(TEXT), "--out", str(out), *extra]  # fmt: skip


def test_generate_writes_the_requested_frames_in_every_mode(world):
    size = world["size"]
    media = {
        "first": write_image(world["root"] / "media" / "first.png", size, size, (255, 0, 0)),
        "last": write_image(world["root"] / "media" / "last.png", size, size, (0, 0, 255)),
    }
    for _, extra, frames, name in MODES[world["variant"]]:
        out = world["root"] / "gen" / name
        assert main(generate_args(world, out, frames, *[str(media.get(x, x)) for x in extra])) == 0
        assert_wrote_frames(out, frames, size)


REFUSED = {
    "i2v": [([], "the wan i2v model animates an image: give --image PNG"),
            (["--image", "first", "--last-image", "last"], "the wan family (i2v model) cannot do this; "
             "families that can: ltx, wan (flf2v models)")],
    "flf2v": [([], "the wan flf2v model animates an image: give --image PNG"),
              (["--image", "first"], "the wan family (flf2v model) cannot do this; families that can: "
               "cogvideox (i2v models), ltx, wan (i2v, ti2v models)")],
    # TI2V-5B's pipeline would take a last image and silently ignore it: refused instead.
    "ti2v": [(["--image", "first", "--last-image", "last"], "the wan family (ti2v model) cannot do this")],
}  # fmt: skip


def test_a_mode_the_variant_cannot_run_is_one_line(world, capsys):
    media = {
        "first": write_image(world["root"] / "refuse" / "a.png", 32, 32),
        "last": write_image(world["root"] / "refuse" / "b.png", 32, 32),
    }
    for extra, message in REFUSED[world["variant"]]:
        capsys.readouterr()
        out = world["root"] / "refused.mp4"
        assert main(generate_args(world, out, 9, *[str(media.get(x, x)) for x in extra])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
        assert not any("Loading" in line for line in err) and not out.exists()  # before any weights load
