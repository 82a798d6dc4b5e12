"""Tiny pipelines of the other families, built from the real diffusers/transformers classes and saved with
`save_pretrained`, so each family is tested the way a user's downloaded folder is read.

The VAEs keep the real models' compression (LTX-Video: 8x time, 32x space; CogVideoX: 4x time, 8x space) so
the family facts (frame rule, size multiple) are exercised as they are on the real weights; widths are tiny.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import rel, tiny_tokenizer


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=48, num_layers=1, num_heads=2)
    )


def tiny_ltx_transformer(layers: int = 2, text_dim: int = 24):
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=layers,
        caption_channels=text_dim,
    )


def tiny_cogvideox_transformer(
    layers: int = 2,
    text_length: int = 16,
    image_to_video: bool = False,
    trained_size: int = 64,
    text_dim: int = 24,
):
    """5B style (rotary embeddings); `image_to_video`: 2 x the latent channels in, learned positional embeddings
    at its one trained size (see build_tiny_cogvideox)."""
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # rotary splits it 1/4 time, 3/8 height, 3/8 width
        in_channels=8 if image_to_video else 4,  # I2V: 4 noisy + 4 image latent channels
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=text_dim,
        num_layers=layers,
        sample_width=trained_size // 8,
        sample_height=trained_size // 8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=text_length,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=image_to_video,
    )


def build_tiny_ltx(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """LTX-Video 0.9.x layout: T5 text encoder, 128-channel-style VAE (here 8 channels), patch 1x1x1."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_dim = 24
    transformer = tiny_ltx_transformer(layers, text_dim)
    # patch 4 x 2^3 spatial scalings = 32x space; 2^3 temporal = 8x time, as in LTX-Video 0.9.x.
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=4,
        patch_size_t=1,
    )
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=_t5(tokenizer, text_dim),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def build_tiny_cogvideox(
    folder: Path,
    seed: int = 0,
    layers: int = 2,
    text_length: int = 16,
    image_to_video: bool = False,
    trained_size: int = 64,
) -> Path:
    """CogVideoX 1.0 layout (5B style: rotary embeddings) with its v-prediction DDIM scheduler.

    `image_to_video`: the 5B-I2V layout (CogVideoXImageToVideoPipeline): the transformer takes 2 x the latent
    channels (noise + image latents, frame-major) and has learned positional embeddings at its one trained
    size, `trained_size` pixels square (as the real 5B-I2V at 720x480x49)."""
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_dim = 24
    transformer = tiny_cogvideox_transformer(layers, text_length, image_to_video, trained_size, text_dim)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    pipeline_class = (
        diffusers.CogVideoXImageToVideoPipeline if image_to_video else diffusers.CogVideoXPipeline
    )
    pipe = pipeline_class(
        tokenizer=tokenizer,
        text_encoder=_t5(tokenizer, text_dim),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


# Shared by the family tests: clips, a recipe, and what "a LoRA on every block linear" means.
def make_clips(folder: Path, size: int, frames: int) -> Path:
    from tests.clips import write_video

    for i, (color, word) in enumerate([((255, 0, 0), "red"), ((0, 200, 0), "green")]):
        write_video(folder / f"clip{i}.mp4", frames=frames, width=size, height=size, color=color)
        (folder / f"clip{i}.txt").write_text(f"a {word} square moving right")
    return folder


def write_recipe(path: Path, base: Path, data: Path, work: Path, size: int, frames: int, text: int) -> Path:
    import yaml

    recipe = {
        "model": {"path": str(base)},  # no family: inferred from model_index.json, as a new user would
        "data": {"path": str(data), "width": size, "height": size, "frames": frames},
        "cache": {"dir": str(work / "cache"), "max_sequence_length": text},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 3, "lr": 1e-2, "optimizer": "adamw", "batch_size": 1, "seed": 3},
        "output": {"dir": str(work / "adapter"), "save_every": 0},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def assert_wrote_frames(path: Path, frames: int, size: int) -> None:
    """`finetune generate` wrote `frames` frames of size x size: one .png image, else a video."""
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            assert image.size == (size, size)
        return
    import av

    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (size, size, 3)


def block_linears(transformer, *blocks_attrs: str) -> list[str]:
    """Every nn.Linear under the named block lists (e.g. "blocks", or HunyuanVideo's two kinds)."""
    prefixes = tuple(attr + "." for attr in blocks_attrs)
    return sorted(
        n for n, m in transformer.named_modules() if n.startswith(prefixes) and type(m) is torch.nn.Linear
    )


def wrapped(transformer, adapter: str) -> list[str]:
    return sorted(n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A)


# The two checks every family's end-to-end test makes on its trained adapter. `world` is the test's module
# fixture: {"base": pipeline folder, "adapter": trained adapter folder, "root": a scratch folder}.
# `forward(transformer)` is the family's transformer on fixed inputs (the same output on every call).
def assert_loads_on_every_block_linear(
    pipe_cls, world: dict, blocks_attrs: tuple[str, ...], forward, count, caplog
):
    """The pipeline's own `load_lora_weights` reads the adapter without a missing/unexpected-key warning, puts
    a LoRA on exactly every block linear (`count` of them) and changes the output. Returns the pipeline with
    the adapter loaded as "style", for the family's own extra checks."""
    pipe = pipe_cls.from_pretrained(world["base"])
    before = forward(pipe.transformer)
    expected = block_linears(pipe.transformer, *blocks_attrs)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(world["adapter"], adapter_name="style")
    assert not [
        r for r in caplog.records if "missing" in r.getMessage().lower() or "unexpected" in r.getMessage()
    ]
    assert wrapped(pipe.transformer, "style") == expected and len(expected) == count
    assert rel(forward(pipe.transformer), before) > 1e-3
    return pipe


def assert_merge_matches(pipe_cls, world: dict, forward, scale: float = 0.7, tol: float = 1e-4) -> None:
    """`finetune merge` at `scale` (into root/merged) gives the transformer that base + adapter at weight
    `scale` gives in the pipeline, and that differs from the base (so the first check is not trivially true)."""
    from finetune.cli import main

    base, adapter, merged_dir = world["base"], world["adapter"], world["root"] / "merged"
    assert (
        main(["merge", "--model", str(base), "--lora", f"{adapter}:{scale}", "--out", str(merged_dir)]) == 0
    )
    merged = pipe_cls.from_pretrained(merged_dir)
    reference = pipe_cls.from_pretrained(base)
    base_out = forward(reference.transformer)
    reference.load_lora_weights(adapter, adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[scale])
    expected = forward(reference.transformer)
    assert rel(forward(merged.transformer), expected) < tol
    assert rel(expected, base_out) > 1e-3
