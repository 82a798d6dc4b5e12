"""CogVideoX 2B / 5B text-to-video through diffusers' CogVideoXPipeline components.

Facts: the VAE compresses time 4x and space 8x into 16 channels, scaled by `scaling_factor` (no mean/std);
the transformer patches 2x2 in space (CogVideoX 1.5 also 2 in time) and takes latents frame-major,
(B, F, C, H, W); valid frame counts are 4k+1; the text is T5-XXL over exactly `max_text_seq_length` (226)
tokens, padding included and unmasked, because the transformer's positional embeddings cover that length;
5B uses 3D rotary embeddings computed from the latent grid, 2B fixed sin-cos ones.
Objective: v-prediction on the DDPM alphas of its own scheduler (zero terminal SNR, SNR shift), not flow
matching; see finetune/objectives.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.errors import UserError
from finetune.models import Family, ShippedModel, Source, common

_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")  # joint text + video attention
_FFN = ("ff.net.0.proj", "ff.net.2")
# The adaptive LayerNorms' linears (timestep -> shift/scale/gate for video and text): small, and part of
# "every block linear"; 6 x 512 x 3072 = 9.4M base weights per norm on the 5B.
_MODULATION = ("norm1.linear", "norm2.linear")
_PROBE = "transformer_blocks.0.attn1."


def load_transformer(source: Source, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return common.load_transformer(CogVideoXTransformer3DModel, source, dtype, _PROBE)


@dataclass
class Encoders(common.Encoders):
    text_length: int  # the transformer's max_text_seq_length: every caption is encoded at exactly this length


def load_encoders(source: Source, device: torch.device, dtype: torch.dtype) -> Encoders:
    from diffusers import CogVideoXTransformer3DModel

    with common.loading("the transformer config", source.base):
        config = CogVideoXTransformer3DModel.load_config(source.base, subfolder="transformer")
    shared = common.load_encoders(source, device, dtype)
    return Encoders(**vars(shared), text_length=config["max_text_seq_length"])


@torch.no_grad()
def encode_prompts(enc: Encoders, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
    """(text_length, dim) per prompt, padding positions included: CogVideoXPipeline feeds all of them."""
    if max_sequence_length < enc.text_length:
        raise UserError(
            f"cache.max_sequence_length: {max_sequence_length} is below the {enc.text_length} text tokens this "
            f"CogVideoX transformer takes; set cache.max_sequence_length={enc.text_length}"
        )
    tokens = enc.tokenizer(
        prompts,
        padding="max_length",
        max_length=enc.text_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return list(enc.text_encoder(tokens.input_ids.to(enc.device))[0].cpu())


@torch.no_grad()
def encode_video(enc: Encoders, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> scaled latents (B, 16, 1 + (F-1)/4, H/8, W/8) (channel-major like every
    family's cache; `predict` turns them frame-major)."""
    latents = enc.vae.encode(video.to(enc.device, torch.float32)).latent_dist.mode()
    return (latents * enc.vae.config.scaling_factor).cpu()


def rotary_embeddings(config, frames: int, height: int, width: int, device: torch.device):
    """CogVideoXPipeline._prepare_rotary_positional_embeddings, from the latent grid (F, H, W)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = config.patch_size, config.patch_size_t
    grid = (height // p, width // p)
    base_w, base_h = config.sample_width // p, config.sample_height // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid, temporal_size=frames,
            device=device,
        )  # fmt: skip
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
        temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_h, base_w), device=device,
    )  # fmt: skip


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    extras: dict[str, torch.Tensor] | None = None,  # nothing else is cached for this family's text-to-video
):
    config = transformer.config
    length = config.max_text_seq_length
    if text.shape[1] < length:
        raise UserError(
            f"cache.max_sequence_length: {text.shape[1]} is below the {length} text tokens CogVideoX takes; "
            f"set cache.max_sequence_length={length}"
        )
    _, _, frames, height, width = noisy.shape
    rotary = None
    if config.use_rotary_positional_embeddings:
        rotary = rotary_embeddings(config, frames, height, width, noisy.device)
    out = transformer(
        hidden_states=noisy.transpose(1, 2),  # (B, F, C, H, W)
        encoder_hidden_states=text[:, :length],  # collate zero-pads beyond the real length: not part of it
        timestep=timesteps,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0]
    return out.transpose(1, 2)


def load_pipeline(source: Source, dtype: torch.dtype):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    return common.load_pipeline(CogVideoXPipeline, CogVideoXTransformer3DModel, source, dtype, _PROBE)


def _text_length(pipe) -> dict[str, Any]:
    # The pipeline must be called with the transformer's own text length, whatever --max-sequence-length says.
    return {"max_sequence_length": pipe.transformer.config.max_text_seq_length}


def _video(pipe, inputs):
    """SDEdit through CogVideoXVideoToVideoPipeline: the clip's latents noised to `strength`, then denoised."""
    from diffusers import CogVideoXVideoToVideoPipeline

    return CogVideoXVideoToVideoPipeline.from_pipe(pipe), {
        "video": inputs.video,
        "strength": inputs.strength,
        **_text_length(pipe),
    }


def _specialize(source: Source) -> Family:
    from finetune.models import cogvideox_i2v

    return cogvideox_i2v.variant_for(source)


def _variants() -> tuple[Family, ...]:
    from finetune.models import cogvideox_i2v

    return (cogvideox_i2v.I2V,)


FAMILY = Family(
    name="cogvideox",
    pipeline_classes=("CogVideoXPipeline", "CogVideoXVideoToVideoPipeline", "CogVideoXImageToVideoPipeline"),
    lora_presets={"blocks": _ATTENTION + _FFN + _MODULATION, "attention": _ATTENTION, "ffn": _FFN},
    blocks_attr="transformer_blocks",
    vae_stride=(4, 8),
    patch=(1, 2, 2),
    frame_step=4,
    flow_shift=1.0,  # unused: the objective is v-prediction
    load_transformer=load_transformer,
    load_encoders=load_encoders,
    encode_prompts=encode_prompts,
    encode_video=encode_video,
    predict=predict,
    load_pipeline=load_pipeline,
    objective="v_prediction",
    modes={"t2v": lambda pipe, inputs: (pipe, _text_length(pipe)), "video": _video},
    shipped=(
        ShippedModel(
            ("cogvideox-5b", "cogvideox_5b"),
            "CogVideoX-5B",
            "cogvideox-5b.transformer.json",
            ("t5-v1_1-xxl.encoder.json",),
            "cogvideox.vae.json",
        ),  # fmt: skip
        ShippedModel(
            ("cogvideox-2b", "cogvideox_2b"),
            "CogVideoX-2B",
            "cogvideox-2b.transformer.json",
            ("t5-v1_1-xxl.encoder.json",),
            "cogvideox.vae.json",
        ),  # fmt: skip
    ),
    text_dim_key="text_embed_dim",
    specialize=_specialize,  # 5B-I2V: finetune/models/cogvideox_i2v.py
    variants=_variants,
)
