"""CogVideoX 5B-I2V end to end on a tiny CogVideoXImageToVideoPipeline folder the kit has never seen: `finetune
train` (family and variant read from the folder; each clip's first frame is its condition) -> the pipeline's
`load_lora_weights` puts a LoRA on every block linear -> `finetune merge` at 0.7 equals base + adapter ->
`finetune generate --image` writes the requested frames; text-to-video is one line. Plus the condition against
CogVideoXImageToVideoPipeline.prepare_latents and its denoising step's transformer input."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from finetune.config import ModelConfig
from finetune.models import cogvideox_i2v, family_for, resolve_source
from tests.clips import write_image
from tests.cogvideox_i2v_tiny import FRAMES, SIZE, TEXT, build_tiny_cogvideox_i2v
from tests.family_tiny import (
    assert_loads_on_every_block_linear,
    assert_merge_matches,
    make_clips,
    write_recipe,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox-i2v")
    base = build_tiny_cogvideox_i2v(root / "base")
    recipe = write_recipe(
        root / "recipe.yaml", base, make_clips(root / "clips", SIZE, 12), root, SIZE, FRAMES, TEXT
    )
    assert main(["train", str(recipe)]) == 0
    return {"root": root, "base": base, "adapter": root / "adapter"}


def transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 3, 4, 4, generator=g)
    extras = {"image_latents": torch.randn(1, 4, 1, 4, 4, generator=g)}
    text = torch.randn(1, TEXT, transformer.config.text_embed_dim, generator=g)
    with torch.no_grad():
        return cogvideox_i2v.predict(transformer, latents, torch.tensor([500]), text, extras)


def test_the_cache_holds_each_clips_first_frame_latents(world):
    shards = sorted((world["root"] / "cache" / "items").glob("*.safetensors"))
    item = load_file(str(shards[0]))
    assert item["image_latents"].shape == (4, 1, 4, 4) and item["latents"].shape == (4, 3, 4, 4)
    # Encoded alone, the first frame is not the clip's first latent frame (the VAE normalises over time).
    assert not torch.allclose(item["image_latents"], item["latents"][:, :1], atol=1e-3)


def test_adapter_loads_in_the_pipeline_on_every_block_linear(world, caplog):
    from diffusers import CogVideoXImageToVideoPipeline

    assert_loads_on_every_block_linear(
        CogVideoXImageToVideoPipeline, world, ("transformer_blocks",), transformer_output, 2 * 8, caplog
    )


def test_merge_at_0_7_matches_base_plus_adapter(world):
    from diffusers import CogVideoXImageToVideoPipeline

    assert_merge_matches(CogVideoXImageToVideoPipeline, world, transformer_output, scale=0.7, tol=1e-4)


def gen_args(world, out, *extra):
    return ["generate", "--model", str(world["base"]), "--lora", f"{world['adapter']}:0.8", "--prompt",
            "a red square moving right", "--width", str(SIZE), "--height", str(SIZE), "--frames", str(FRAMES),
            "--steps", "2", "--max-sequence-length", str(TEXT), "--out", str(out), *extra]  # fmt: skip


def test_generate_image_to_video_writes_the_requested_frames(world):
    out = world["root"] / "i2v.mp4"
    image = write_image(world["root"] / "first.png", SIZE, SIZE, (255, 0, 0))
    assert main(gen_args(world, out, "--image", str(image))) == 0
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == FRAMES and decoded[0].shape == (SIZE, SIZE, 3)


def test_text_to_video_is_one_line(world, capsys):
    assert main(gen_args(world, world["root"] / "t2v.mp4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: the cogvideox i2v model animates an image: give --image PNG"


def test_condition_is_the_pipelines(world):
    """Cached image latents + zero frames = CogVideoXImageToVideoPipeline.prepare_latents' image_latents, up to
    the latent sample the pipeline draws (the cache keeps the mean); the forward is the pipeline's."""
    from diffusers import CogVideoXImageToVideoPipeline
    from diffusers.utils.torch_utils import randn_tensor

    cfg = ModelConfig(path=str(world["base"]))
    source = resolve_source(cfg)
    family = family_for(cfg, source)
    assert (family.name, family.variant) == ("cogvideox", "i2v")
    pixels = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    video = torch.from_numpy(pixels).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1
    cached = family.encode_video(family.load_encoders(source, torch.device("cpu"), torch.float32), video)

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(world["base"])
    _, image_latents = pipe.prepare_latents(
        video[:, :, 0],
        1,
        4,
        FRAMES,
        SIZE,
        SIZE,
        torch.float32,
        torch.device("cpu"),
        torch.Generator().manual_seed(5),
    )
    with torch.no_grad():
        dist = pipe.vae.encode(video[:, :, :1]).latent_dist
    eps = randn_tensor(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    scale = pipe.vae.config.scaling_factor
    assert torch.equal(cached["image_latents"], dist.mean * scale)
    assert torch.allclose(
        image_latents[:, :1].transpose(1, 2), (dist.mean + dist.std * eps) * scale, atol=1e-6
    )
    assert image_latents[:, 1:].eq(0).all() and image_latents.shape[1] == 3

    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(cached["latents"].shape, generator=g)
    text = torch.randn(1, TEXT, 24, generator=g)
    t = torch.tensor([700])
    with torch.no_grad():
        ours = family.predict(pipe.transformer, noisy, t, text, cached)
        rotary = pipe._prepare_rotary_positional_embeddings(SIZE, SIZE, 3, torch.device("cpu"))
        condition = torch.cat([cached["image_latents"], torch.zeros(1, 4, 2, 4, 4)], dim=2)
        theirs = pipe.transformer(
            hidden_states=torch.cat([noisy.transpose(1, 2), condition.transpose(1, 2)], dim=2),
            encoder_hidden_states=text,
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
    assert torch.equal(ours, theirs.transpose(1, 2))
