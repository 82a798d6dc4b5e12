"""LTX-Video end to end on a tiny LTXPipeline folder the kit has never seen: `finetune train` (family inferred)
-> LTXPipeline.load_lora_weights puts a LoRA on every block linear -> `finetune merge` at 0.7 equals base +
adapter -> `finetune generate` in every mode LTX supports writes the requested frames. Plus the pieces the
training step shares with LTXPipeline (packing, text, masked cross-attention), checked against diffusers."""

from __future__ import annotations

import av
import pytest
import torch

from finetune.cli import main
from finetune.models import ltx
from tests.clips import write_image, write_video
from tests.family_tiny import (
    assert_loads_on_every_block_linear,
    assert_merge_matches,
    build_tiny_ltx,
    make_clips,
    write_recipe,
)

SIZE, FRAMES, TEXT = 64, 9, 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx")
    base = build_tiny_ltx(root / "base")
    data = make_clips(root / "clips", SIZE, 12)
    recipe = write_recipe(root / "recipe.yaml", base, data, root, SIZE, FRAMES, TEXT)
    assert main(["train", str(recipe)]) == 0
    return {"root": root, "base": base, "adapter": root / "adapter"}


def transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 8, 2, 2, 2, generator=g)
    text = torch.randn(1, TEXT, transformer.config.caption_channels, generator=g)
    text[:, 10:] = 0  # padding, as collate leaves it
    with torch.no_grad():
        return ltx.predict(transformer, latents, torch.tensor([500.0]), text)


def test_adapter_loads_in_ltx_pipeline_on_every_block_linear(world, caplog):
    from diffusers import LTXPipeline

    pipe = assert_loads_on_every_block_linear(
        LTXPipeline, world, ("transformer_blocks",), transformer_output, 2 * 10, caplog
    )
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.scaling["style"] == pytest.approx(2.0)


def test_merge_at_0_7_matches_base_plus_adapter(world):
    from diffusers import LTXPipeline

    assert_merge_matches(LTXPipeline, world, transformer_output, scale=0.7, tol=1e-4)


def frames_of(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def media(world):
    folder = world["root"] / "media"
    return {
        "first": write_image(folder / "first.png", SIZE, SIZE, (255, 0, 0)),
        "last": write_image(folder / "last.png", SIZE, SIZE, (0, 0, 255)),
        "clip": write_video(folder / "clip.mp4", frames=17, width=SIZE, height=SIZE, color=(0, 200, 0)),
    }


@pytest.mark.parametrize(
    "mode,extra,frames,out",
    [
        ("t2v", [], 9, "t2v.mp4"),
        ("still", [], 1, "still.png"),
        ("image", ["--image", "first"], 9, "i2v.mp4"),
        ("keyframes", ["--image", "first", "--last-image", "last"], 17, "kf.mp4"),
        ("sdedit", ["--video", "clip", "--strength", "0.6"], 9, "v2v.mp4"),
        ("extend", ["--extend", "clip"], 17, "ext.mp4"),
    ],
)
def test_generate_mode_writes_the_requested_frames(world, media, mode, extra, frames, out):
    path = world["root"] / "gen" / out
    extra = [str(media.get(x, x)) for x in extra]
    args = ["generate", "--model", str(world["base"]), "--lora", f"{world['adapter']}:0.8", "--prompt",
            "a red square moving left", "--width", str(SIZE), "--height", str(SIZE), "--frames", str(frames),
            "--steps", "2", "--max-sequence-length", str(TEXT), "--out", str(path), *extra]  # fmt: skip
    assert main(args) == 0
    decoded = frames_of(path)
    assert len(decoded) == frames and decoded[0].shape == (SIZE, SIZE, 3)


# --- the training step's pieces against LTXPipeline's own ---


def test_pack_and_unpack_match_ltx_pipeline():
    from diffusers import LTXPipeline

    x = torch.randn(2, 8, 3, 4, 6)
    for p, p_t in [(1, 1), (2, 1)]:
        ours = ltx.pack(x, p, p_t)
        assert torch.equal(ours, LTXPipeline._pack_latents(x, p, p_t))
        assert torch.equal(ltx.unpack(ours, 3 // p_t, 4 // p, 6 // p, p, p_t), x)


def test_cached_text_and_masked_prediction_equal_the_pipeline_call(world):
    """Our text (real tokens, zero-padded by collate) with the mask derived from it gives exactly the
    transformer output that LTXPipeline's padded T5 output + tokenizer mask gives."""
    from diffusers import LTXPipeline

    from finetune.data.batches import collate
    from finetune.models import Source

    pipe = LTXPipeline.from_pretrained(world["base"])
    prompt = "a red square moving left"
    embeds, mask, _, _ = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, max_sequence_length=TEXT
    )
    source = Source(str(world["base"]), False, str(world["base"]))
    encoders = ltx.load_encoders(source, torch.device("cpu"), torch.float32)
    ours = ltx.encode_prompts(encoders, [prompt], TEXT)[0]
    assert len(ours) == int(mask.sum()) < TEXT
    assert (ours - embeds[0, : len(ours)]).abs().max() < 1e-5, (ours - embeds[0, : len(ours)]).abs().max()
    text = collate([{"latents": torch.zeros(1), "text": ours}], TEXT)["text"]
    latents = torch.randn(1, 8, 2, 2, 2)
    with torch.no_grad():
        expected = pipe.transformer(
            hidden_states=LTXPipeline._pack_latents(latents), encoder_hidden_states=embeds, timestep=torch.tensor([300.0]),
            encoder_attention_mask=mask, num_frames=2, height=2, width=2, rope_interpolation_scale=(8 / 25, 32, 32),
            return_dict=False,
        )[0]  # fmt: skip
        got = ltx.predict(pipe.transformer, latents, torch.tensor([300.0]), text)
    assert torch.allclose(LTXPipeline._pack_latents(got), expected, atol=1e-5)
