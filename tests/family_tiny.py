"""Tiny pipelines of the other families, built from the real diffusers/transformers classes and saved with
`save_pretrained`, so each family is tested the way a user's downloaded folder is read.

The VAEs keep the real models' compression (LTX-Video: 8x time, 32x space; CogVideoX: 4x time, 8x space) so
the family facts (frame rule, size multiple) are exercised as they are on the real weights; widths are tiny.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import tiny_tokenizer


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=48, num_layers=1, num_heads=2)
    )


def build_tiny_ltx(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """LTX-Video 0.9.x layout: T5 text encoder, 128-channel-style VAE (here 8 channels), patch 1x1x1."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_dim = 24
    transformer = LTXVideoTransformer3DModel(
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


def build_tiny_cogvideox(folder: Path, seed: int = 0, layers: int = 2, text_length: int = 16) -> Path:
    """CogVideoX 1.0 layout (5B style: rotary embeddings) with its v-prediction DDIM scheduler."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_dim = 24
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # rotary splits it 1/4 time, 3/8 height, 3/8 width
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=text_dim,
        num_layers=layers,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=text_length,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    )
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
    pipe = CogVideoXPipeline(
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


def block_linears(transformer, blocks_attr: str) -> list[str]:
    return sorted(
        n
        for n, m in transformer.named_modules()
        if n.startswith(blocks_attr + ".") and type(m) is torch.nn.Linear
    )


def wrapped(transformer, adapter: str) -> list[str]:
    return sorted(n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A)
