"""Wan 2.1 text-to-video (1.3B, 14B) through diffusers' WanPipeline components.

Facts: VAE compresses time 4x and space 8x into 16 channels; the transformer patches 1x2x2; valid frame counts
are 4k+1; the text encoder is umT5-XXL (4096-d, 512 tokens, zero-padded); Wan samples with flow shift 3.0 at 480p.
"""

from __future__ import annotations

import torch

from finetune.models import Family, ShippedModel, Source, common

_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0") + (
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
_FFN = ("ffn.net.0.proj", "ffn.net.2")
_UMT5 = ("umt5-xxl.encoder.json",)


# A single file whose keys start like this is already in diffusers' layout (e.g. `merge --transformer-only`).
_DIFFUSERS_PROBE = "blocks.0.attn1."


def load_transformer(source: Source, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return common.load_transformer(WanTransformer3DModel, source, dtype, _DIFFUSERS_PROBE)


Encoders = common.Encoders
load_encoders = common.load_encoders


@torch.no_grad()
def encode_prompts(enc: Encoders, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
    """One (tokens, dim) tensor per prompt, trimmed to its real length; padded back with zeros at train time,
    exactly as WanPipeline pads them at inference (it passes no attention mask to the transformer)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = enc.tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(enc.device)
    hidden = enc.text_encoder(tokens.input_ids.to(enc.device), mask).last_hidden_state
    return [h[: int(n)].cpu() for h, n in zip(hidden, mask.sum(dim=1), strict=True)]


@torch.no_grad()
def encode_video(enc: Encoders, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, 16, 1 + (F-1)/4, H/8, W/8), the space the
    transformer denoises in (WanPipeline undoes this normalisation before decoding)."""
    vae = enc.vae
    latents = vae.encode(video.to(enc.device, torch.float32)).latent_dist.mode()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
    return ((latents - mean) / std).cpu()


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    extras: dict[str, torch.Tensor] | None = None,  # nothing else is cached for this family's text-to-video
):
    return transformer(
        hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text, return_dict=False
    )[0]


def load_pipeline(source: Source, dtype: torch.dtype):
    from diffusers import WanPipeline, WanTransformer3DModel

    return common.load_pipeline(WanPipeline, WanTransformer3DModel, source, dtype, _DIFFUSERS_PROBE)


def _video(pipe, inputs):
    """SDEdit through WanVideoToVideoPipeline (same modules): the clip's latents noised to `strength`."""
    from diffusers import WanVideoToVideoPipeline

    return WanVideoToVideoPipeline.from_pipe(pipe), {"video": inputs.video, "strength": inputs.strength}


def _specialize(source: Source) -> Family:
    from finetune.models import wan_i2v

    return wan_i2v.variant_for(source)


def _variants() -> tuple[Family, ...]:
    from finetune.models import wan_i2v

    return tuple(wan_i2v.VARIANTS.values())


FAMILY = Family(
    name="wan",
    pipeline_classes=("WanPipeline", "WanImageToVideoPipeline"),
    lora_presets={"blocks": _ATTENTION + _FFN, "attention": _ATTENTION, "ffn": _FFN},
    blocks_attr="blocks",
    vae_stride=(4, 8),
    patch=(1, 2, 2),
    frame_step=4,
    flow_shift=3.0,
    load_transformer=load_transformer,
    load_encoders=load_encoders,
    encode_prompts=encode_prompts,
    encode_video=encode_video,
    predict=predict,
    load_pipeline=load_pipeline,
    modes={"t2v": lambda pipe, inputs: (pipe, {}), "video": _video},
    specialize=_specialize,  # I2V, FLF2V, TI2V-5B: finetune/models/wan_i2v.py
    variants=_variants,
    shipped=(
        # Before "14b": each A14B expert is a Wan 2.1 14B transformer, and training holds one (experts.py).
        ShippedModel(
            ("t2v-a14b",),
            "Wan2.2 T2V A14B (one expert resident)",
            "wan2.2-t2v-a14b.transformer.json",
            _UMT5,
            "wan2.1.vae.json",
            experts=2,
        ),
        ShippedModel(("14b",), "Wan2.1 T2V 14B", "wan2.1-t2v-14b.transformer.json", _UMT5, "wan2.1.vae.json"),
        ShippedModel(
            ("1.3b", "1_3b"), "Wan2.1 T2V 1.3B", "wan2.1-t2v-1.3b.transformer.json", _UMT5, "wan2.1.vae.json"
        ),
    ),
)
