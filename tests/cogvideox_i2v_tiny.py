"""A tiny CogVideoX 1.0 5B-I2V layout from the real diffusers classes, saved with save_pretrained: the transformer
takes 2 x the latent channels (noise + image latents, frame-major), learned positional embeddings at its one
trained size (as the real 5B-I2V at 720x480x49), and the v-prediction DDIM scheduler."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.family_tiny import _t5
from tests.tiny import tiny_tokenizer

SIZE, FRAMES, TEXT = 32, 9, 16  # the one size the learned positional embeddings cover


def build_tiny_cogvideox_i2v(folder: Path, seed: int = 0) -> Path:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_dim = 24
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=8,  # 4 noisy + 4 image latent channels
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=text_dim,
        num_layers=2,
        sample_width=SIZE // 8,
        sample_height=SIZE // 8,
        sample_frames=FRAMES,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
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
    pipe = CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(tokenizer, text_dim),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return Path(folder)
