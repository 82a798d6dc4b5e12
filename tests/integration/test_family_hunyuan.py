"""HunyuanVideo end to end on a tiny HunyuanVideoPipeline folder the kit has never seen: `finetune train`
(family inferred from model_index.json, validation samples through the pipeline with cached text) ->
HunyuanVideoPipeline.load_lora_weights puts a LoRA on every linear of both block kinds -> `finetune merge` at
0.7 equals base + adapter -> `finetune generate` writes the requested frames (mp4, and a png at --frames 1).
Plus the pieces the training step shares with HunyuanVideoPipeline (text encoding, the transformer call),
checked against diffusers."""

from __future__ import annotations

import pytest
import torch
import yaml

from finetune.cli import main
from finetune.data.batches import collate, text_tensors
from finetune.models import Source, hunyuan
from tests.family_tiny import (
    assert_loads_on_every_block_linear,
    assert_merge_matches,
    assert_wrote_frames,
    make_clips,
    wrapped,
    write_recipe,
)
from tests.hunyuan_tiny import CLIP_DIM, LLAMA_DIM, build_tiny_hunyuan
from tests.tiny import rel

SIZE, FRAMES, TEXT = 32, 5, 16
PROMPT = "a red square moving left"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    base = build_tiny_hunyuan(root / "base")
    data = make_clips(root / "clips", SIZE, 8)
    recipe = write_recipe(root / "recipe.yaml", base, data, root, SIZE, FRAMES, TEXT)
    tree = yaml.safe_load(recipe.read_text())
    # Validation samples go through HunyuanVideoPipeline with the cached prompt tensors (mask, pooled CLIP).
    tree["train"]["validation"] = {"every": 3, "prompts": [PROMPT], "width": SIZE, "height": SIZE,
                                   "frames": FRAMES, "steps": 2, "holdout": 1}  # fmt: skip
    tree["data"]["caption_dropout"] = 0.5  # the empty prompt's `text` and `text_pooled` are cached too
    tree["output"]["formats"] = ["diffusers", "comfy"]  # ComfyUI's fused q/k/v layout, written beside it
    recipe.write_text(yaml.safe_dump(tree))
    assert main(["train", str(recipe)]) == 0
    return {"root": root, "base": base, "adapter": root / "adapter"}


def fake_batch(seed=0, real_tokens=10):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(1, TEXT, LLAMA_DIM, generator=g)
    text[:, real_tokens:] = 0  # padding, as collate leaves it
    return latents, text, {"text_pooled": torch.randn(1, CLIP_DIM, generator=g)}


def transformer_output(transformer, seed=0):
    latents, text, extras = fake_batch(seed)
    with torch.no_grad():
        return hunyuan.predict(transformer, latents, torch.tensor([500.0]), text, extras)


def test_training_wrote_validation_samples_and_a_held_out_loss(world):
    assert sorted(p.name for p in (world["adapter"] / "samples").rglob("*.mp4"))
    # The held-out clip's fixed-noise loss went through `predict` with its cached pooled CLIP embedding.
    rows = (world["adapter"] / "logs" / "validation.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and float(rows[1].split(",")[1]) > 0


def test_adapter_loads_in_hunyuan_pipeline_on_every_block_linear(world, caplog):
    from diffusers import HunyuanVideoPipeline

    blocks = ("transformer_blocks", "single_transformer_blocks")
    # 14 linears per dual-stream block (8 attention, 4 FFN, 2 modulation), 6 per single-stream block.
    pipe = assert_loads_on_every_block_linear(
        HunyuanVideoPipeline, world, blocks, transformer_output, 14 + 6, caplog
    )
    loaded = wrapped(pipe.transformer, "style")  # = every block linear, checked above
    assert any(n.startswith("single_transformer_blocks.0.proj_mlp") for n in loaded)
    assert not [n for n in loaded if n.startswith("context_embedder")]
    assert pipe.transformer.single_transformer_blocks[0].attn.to_q.scaling["style"] == pytest.approx(2.0)


def test_merge_at_0_7_matches_base_plus_adapter(world):
    from diffusers import HunyuanVideoPipeline

    assert_merge_matches(HunyuanVideoPipeline, world, transformer_output, scale=0.7, tol=1e-4)


@pytest.mark.parametrize("frames,out", [(5, "t2v.mp4"), (1, "still.png")])
def test_generate_writes_the_requested_frames(world, frames, out):
    path = world["root"] / "gen" / out
    args = ["generate", "--model", str(world["base"]), "--lora", f"{world['adapter']}:0.8", "--prompt", PROMPT,
            "--width", str(SIZE), "--height", str(SIZE), "--frames", str(frames), "--steps", "2",
            "--max-sequence-length", str(TEXT), "--out", str(path)]  # fmt: skip
    assert main(args) == 0
    assert_wrote_frames(path, frames, SIZE)


def test_video_to_video_is_refused_with_one_line(world, capsys):
    clip = world["root"] / "clips" / "clip0.mp4"
    args = ["generate", "--model", str(world["base"]), "--prompt", PROMPT, "--video", str(clip),
            "--out", str(world["root"] / "gen" / "v2v.mp4")]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hunyuan family cannot do this" in err[0] and "wan" in err[0]


# --- the training step's pieces against HunyuanVideoPipeline's own ---


@pytest.fixture(scope="module")
def pipe_and_encoders(world):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(world["base"])
    source = Source(str(world["base"]), False, str(world["base"]))
    return pipe, hunyuan.load_encoders(source, torch.device("cpu"), torch.float32)


def test_text_encoding_equals_the_pipeline_encode_prompt(pipe_and_encoders):
    pipe, encoders = pipe_and_encoders
    prompts = [PROMPT, "a blue ball", ""]
    ours = hunyuan.encode_prompts(encoders, prompts, TEXT)
    for prompt, got in zip(prompts, ours, strict=True):
        embeds, pooled, mask = pipe.encode_prompt(prompt, max_sequence_length=TEXT)
        n = int(mask.sum())
        # Right padding after the template crop: the real tokens come first, the prompt's words + <|eot_id|>.
        assert mask[0, :n].all() and n == len(pipe.tokenizer(prompt).input_ids) + 1
        assert got["text"].shape == (n, LLAMA_DIM)
        assert torch.allclose(got["text"], embeds[0, :n], atol=1e-6)
        assert torch.allclose(got["text_pooled"], pooled[0], atol=1e-6)
        # Cached, collated (zero-padded) text gives back the pipeline's mask: no real row is all zeros.
        collated = collate([{"latents": torch.zeros(1), **text_tensors([got])}], TEXT)
        assert torch.equal(hunyuan.common.text_mask(collated["text"]), mask.bool())
        assert collated["text_pooled"].shape == (1, CLIP_DIM)


def test_predict_equals_the_pipeline_transformer_call(pipe_and_encoders):
    """Our cached text + derived mask + pooled CLIP + guidance 1.0 x 1000 give exactly the transformer output of
    the call HunyuanVideoPipeline makes with its own padded embeddings and tokenizer mask."""
    pipe, encoders = pipe_and_encoders
    embeds, pooled, mask = pipe.encode_prompt(PROMPT, max_sequence_length=TEXT)
    ours = hunyuan.encode_prompts(encoders, [PROMPT], TEXT)[0]
    batch = collate([{"latents": torch.zeros(1), **text_tensors([ours])}], TEXT)
    latents = torch.randn(1, 16, 2, 4, 4)
    t = torch.tensor([300.0])
    with torch.no_grad():
        expected = pipe.transformer(
            hidden_states=latents, timestep=t, encoder_hidden_states=embeds, encoder_attention_mask=mask.float(),
            pooled_projections=pooled, guidance=torch.tensor([1.0]) * 1000.0, return_dict=False,
        )[0]  # fmt: skip
        got = hunyuan.predict(
            pipe.transformer, latents, t, batch["text"], {"text_pooled": batch["text_pooled"]}
        )
        other_guidance = pipe.transformer(
            hidden_states=latents, timestep=t, encoder_hidden_states=embeds, encoder_attention_mask=mask.float(),
            pooled_projections=pooled, guidance=torch.tensor([6.0]) * 1000.0, return_dict=False,
        )[0]  # fmt: skip
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert rel(other_guidance, expected) > 1e-4  # the guidance input matters: the check above can fail


def test_validation_text_kwargs_drive_the_pipeline(pipe_and_encoders):
    """The family hook turns cached prompt tensors into the call the pipeline makes from the prompt itself."""
    pipe, encoders = pipe_and_encoders
    texts = hunyuan.encode_prompts(encoders, [PROMPT, ""], TEXT)
    batches = [collate([{"latents": torch.zeros(1), **text_tensors([t])}], TEXT) for t in texts]
    kwargs = hunyuan.pipeline_text_kwargs(*({k: v for k, v in b.items() if k != "latents"} for b in batches))
    common = dict(width=SIZE, height=SIZE, num_frames=FRAMES, num_inference_steps=2, output_type="latent",
                  max_sequence_length=TEXT)  # fmt: skip
    cached = pipe(**kwargs, generator=torch.Generator().manual_seed(1), **common).frames
    direct = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(1), **common).frames
    assert torch.allclose(cached, direct, atol=1e-5)


def comfy_parts(name: str) -> list[str]:
    """The diffusers layers, in row order, that ComfyUI's layer `name` (double_blocks.N.x / single_blocks.N.x) is."""
    from finetune import comfy_names as c

    kind, index, layer = name.split(".", 2)
    dual = kind == "double_blocks"
    prefix = f"{'transformer_blocks' if dual else 'single_transformer_blocks'}.{index}."
    fused = c.HUNYUAN_DUAL_FUSED if dual else c.HUNYUAN_SINGLE_FUSED
    if layer in fused:
        return [prefix + part for part in fused[layer]]
    names = c.HUNYUAN_DUAL_NAMES if dual else c.HUNYUAN_SINGLE_NAMES
    return [prefix + next(d for d, o in names.items() if o == layer)]


def test_comfy_file_applied_as_comfyui_does_equals_the_fused_adapter(world):
    """Training wrote the ComfyUI file (output.formats): on each ComfyUI weight (q/k/v, and a single block's MLP
    input, stacked into one), base + strength x alpha / rank x up @ down equals diffusers' fuse_lora."""
    from diffusers import HunyuanVideoPipeline
    from safetensors.torch import load_file

    comfy = load_file(str(world["adapter"] / "pytorch_lora_weights_comfy.safetensors"))
    names = sorted(
        {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in comfy if k.endswith("lora_A.weight")}
    )
    assert len(names) == 10 + 3 and all(k.startswith("diffusion_model.") for k in comfy)
    base = dict(HunyuanVideoPipeline.from_pretrained(world["base"]).transformer.named_modules())
    pipe = HunyuanVideoPipeline.from_pretrained(world["base"])
    pipe.load_lora_weights(world["adapter"])
    pipe.fuse_lora(components=["transformer"], lora_scale=0.7)
    fused = dict(pipe.transformer.named_modules())
    for name in names:
        parts = comfy_parts(name)
        down, up = (
            comfy[f"diffusion_model.{name}.lora_A.weight"],
            comfy[f"diffusion_model.{name}.lora_B.weight"],
        )
        alpha = comfy[f"diffusion_model.{name}.alpha"].item()
        weight = torch.cat([base[p].weight for p in parts]) + 0.7 * alpha / down.shape[0] * up @ down
        expected = torch.cat([fused[p].base_layer.weight if hasattr(fused[p], "base_layer") else fused[p].weight
                              for p in parts])  # fmt: skip
        assert torch.allclose(weight, expected, atol=1e-6), name
        assert not torch.allclose(weight, torch.cat([base[p].weight for p in parts]), atol=1e-6), name
