"""Tiny image-conditioned Wan pipelines from the real diffusers/transformers classes, saved with save_pretrained:
Wan 2.1 I2V (transformer in_channels 36 = 16 noise + 4 mask + 16 condition, CLIP image encoder), FLF2V (the
same with `pos_embed_seq_len` for two images) and Wan 2.2 TI2V-5B (`expand_timesteps`, the 2.2 VAE: residual,
patch 2, 48 channels, 16x space). The CLIP vision tower and its image processor are built offline."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import tiny_tokenizer

TEXT_DIM = 24
IMAGE_SIZE, IMAGE_PATCH = 32, 16  # (32 / 16)^2 + 1 = 5 image tokens
IMAGE_TOKENS = (IMAGE_SIZE // IMAGE_PATCH) ** 2 + 1


def _text_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=1, num_heads=2)
    )


def _transformer(in_channels: int, out_channels: int, **extra):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=40,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **extra,
    )


def _clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=IMAGE_PATCH,
        )
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return encoder, processor


def build_tiny_wan_i2v(
    folder: Path,
    seed: int = 0,
    last_frame: bool = False,
    clip: bool = True,
    boundary_ratio: float | None = None,
) -> Path:
    """Wan 2.1 I2V layout (FLF2V with `last_frame`: the image embedder's position embedding spans two images;
    without `clip`: no image encoder, as Wan 2.2 I2V-A14B; with `boundary_ratio`: its two experts)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    image_encoder, image_processor = _clip()
    extra = {"pos_embed_seq_len": 2 * IMAGE_TOKENS} if last_frame else {}
    # image_dim: the CLIP width; added_kv_proj_dim: the transformer width (2 heads x 8), as 1280 / 5120 for real.
    if clip:
        transformer = _transformer(36, 16, image_dim=16, added_kv_proj_dim=16, **extra)
    else:
        transformer, image_encoder, image_processor = _transformer(36, 16), None, None
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(tokenizer),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        **(
            {"transformer_2": _transformer(36, 16), "boundary_ratio": boundary_ratio}
            if boundary_ratio
            else {}
        ),
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def build_tiny_wan_ti2v(folder: Path, seed: int = 0) -> Path:
    """Wan 2.2 TI2V-5B layout: a WanPipeline with expand_timesteps and the 48-channel residual VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.1 * (i % 7 - 3) for i in range(48)],  # not 0 / 1: the normalisation is exercised
        latents_std=[0.5 + 0.1 * (i % 5) for i in range(48)],
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(tokenizer),
        transformer=_transformer(48, 48),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        expand_timesteps=True,
    )
    pipe.save_pretrained(folder)
    return Path(folder)
