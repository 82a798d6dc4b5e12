"""Image-conditioned Wan: 2.1 I2V (480p/720p) and FLF2V, 2.2 TI2V-5B (and the conditioning of 2.2 I2V-A14B).

`model.family: wan` covers them all; the variant is read from the base's model_index.json and transformer config
(`variant_for`), and each variant is the Wan family with its own encode / predict / condition / modes:

  i2v    in_channels = 2 z + 4 (2.1 I2V: 36). The noisy latents are concatenated with a 4-channel frame mask
         and the VAE latents of [first frame, zeros...]; with `image_dim` the CLIP image encoder's penultimate
         hidden states of the first frame enter the cross-attention too (`encoder_hidden_states_image`).
  flf2v  the same with [first, zeros..., last] and both frames' embeddings (transformer `pos_embed_seq_len`).
  ti2v   model_index `expand_timesteps` (2.2 TI2V-5B, 48-channel VAE at 16x space): the first latent frame is
         replaced by the clean one, its tokens get timestep 0 (per-token timesteps) and the loss skips it.

Training conditions on each clip's own first (and last) frame, with no setting: the condition is what
WanImageToVideoPipeline.prepare_latents builds from that frame at generation time (tests check it bit for bit).

Cache cost per clip at 832x480x81 (fp32, like the latents: 16 x 21 x 60 x 104 = 8.4 MB): i2v/flf2v add the
condition latents (another 8.4 MB; the 4 mask channels are rebuilt from the shape, not stored) and the image
embeddings (257 x 1280 x 4 B = 1.3 MB per frame), and a second VAE encode of the clip-sized condition video.
TI2V-5B adds nothing: the causal VAE encodes frame 0 alone, so the clip's first latent frame is the image's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch

from finetune import objectives
from finetune.errors import UserError
from finetune.models import Family, ShippedModel, Source, common, loading, model_index
from finetune.models import wan as base

_IMAGE_LINEARS = ("attn2.add_k_proj", "attn2.add_v_proj")  # the cross-attention's image keys/values (I2V)


# --- what the base is ----------------------------------------------------------------------------------------


def transformer_config(source: Source) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    with loading("the transformer config", source.base):
        return dict(WanTransformer3DModel.load_config(source.base, subfolder=source.component))


def variant_name(index: dict[str, Any], config: dict[str, Any]) -> str:
    """The variant: "" (text-to-video), "ti2v", "i2v" or "flf2v", from model_index.json and the transformer."""
    if index.get("expand_timesteps"):
        return "ti2v"
    if config.get("in_channels", 16) != config.get("out_channels", 16):  # noise + mask + condition latents
        return "flf2v" if config.get("pos_embed_seq_len") else "i2v"
    return ""


def variant_for(source: Source) -> Family:
    config = transformer_config(source)
    name = variant_name(model_index(source.base), config)
    if name == "i2v" and config.get("image_dim") is None:  # Wan 2.2 I2V-A14B: no image encoder
        return WITHOUT_IMAGE_ENCODER
    return VARIANTS[name] if name else base.FAMILY


# --- the condition, as WanImageToVideoPipeline.prepare_latents builds it ---------------------------------------


def normalise(vae, latents: torch.Tensor) -> torch.Tensor:
    """(latents - mean) * (1 / std): the pipeline's own arithmetic (a division differs in the last bit)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return (latents - mean) * inv_std


def condition_video(video: torch.Tensor, last: bool) -> torch.Tensor:
    """(B, 3, F, H, W) -> [first frame, zeros..., (last frame)]: what the VAE encodes as the condition."""
    b, c, f, h, w = video.shape
    parts = [video[:, :, :1], video.new_zeros(b, c, f - 1 - int(last), h, w)]
    return torch.cat(parts + [video[:, :, -1:]] if last else parts, dim=2)


def frame_mask(like: torch.Tensor, last: bool, temporal: int = 4) -> torch.Tensor:
    """(B, 4, F', H', W') mask of the given pixel frames for latents shaped like `like` (B, C, F', H', W'):
    prepare_latents' construction (first frame repeated `temporal` times, folded into 4 channels)."""
    b, _, latent_frames, h, w = like.shape
    frames = (latent_frames - 1) * temporal + 1
    mask = torch.ones(b, 1, frames, h, w)
    mask[:, :, list(range(1, frames - 1 if last else frames))] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.concat([first, mask[:, :, 1:, :]], dim=2)
    return mask.view(b, -1, temporal, h, w).transpose(1, 2)


def _frames_as_images(video: torch.Tensor, last: bool) -> list:
    """The clip's first (and last) frame as uint8 HWC arrays: the PIL image a user would give, as pixels."""
    picks = [video[:, 0], video[:, -1]] if last else [video[:, 0]]
    return [
        ((p + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy() for p in picks
    ]


@torch.no_grad()
def image_embeds(enc, video: torch.Tensor, last: bool) -> torch.Tensor:
    """(B, n, tokens, dim): the image encoder's penultimate hidden states of each clip's first (and last) frame,
    as WanImageToVideoPipeline.encode_image computes them."""
    device = next(enc.image_encoder.parameters()).device
    rows = []
    for clip in video:
        inputs = enc.image_processor(images=_frames_as_images(clip, last), return_tensors="pt").to(device)
        rows.append(enc.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2].float().cpu())
    return torch.stack(rows)


@dataclasses.dataclass
class ImageEncoders(common.Encoders):
    image_encoder: Any = None  # CLIP ViT-H/14 for Wan 2.1 I2V (~1.3 GB in bf16), on the encode device
    image_processor: Any = None


def load_encoders(source: Source, device: torch.device, dtype: torch.dtype) -> ImageEncoders:
    enc = common.load_encoders(source, device, dtype)
    image_encoder = common.load_component(source, "image_encoder", dtype).to(device).eval()
    processor = common.load_component(source, "image_processor")
    return ImageEncoders(enc.tokenizer, enc.text_encoder, enc.vae, enc.device, image_encoder, processor)


@torch.no_grad()
def encode_video(enc, video: torch.Tensor) -> torch.Tensor:
    """Latents normalised with the pipeline's arithmetic, so that for TI2V-5B the clip's first latent frame is
    bit for bit the `latent_condition` WanImageToVideoPipeline makes of that frame as an image."""
    return normalise(enc.vae, enc.vae.encode(video.to(enc.device, torch.float32)).latent_dist.mode()).cpu()


@torch.no_grad()
def encode_conditioned(enc, video: torch.Tensor, last: bool, embeds: bool) -> dict[str, torch.Tensor]:
    """Latents plus what the I2V transformer is conditioned on: `condition` (B, z, F', H', W') and, for models
    with an image encoder, `image_embeds` (B, n, tokens, dim)."""
    if last and video.shape[2] < 5:
        raise UserError(
            "data.frames: first-last-frame (FLF2V) training needs clips of at least 5 frames (one image has no "
            "last frame); raise data.frames / frame_buckets or drop still images from the data"
        )
    out = {"latents": base.encode_video(enc, video)}
    vae = enc.vae
    pixels = condition_video(video, last).to(enc.device, torch.float32)
    out["condition"] = normalise(vae, vae.encode(pixels).latent_dist.mode()).cpu()
    if embeds:
        out["image_embeds"] = image_embeds(enc, video, last)
    return out


def predict_conditioned(transformer, noisy, timesteps, text, extras=None, last: bool = False):
    """[noisy, frame mask, condition latents] along channels, image embeddings into the cross-attention, as
    WanImageToVideoPipeline feeds the transformer each step."""
    extras = extras or {}
    condition = extras["condition"]
    mask = frame_mask(condition, last).to(noisy.device, noisy.dtype)
    hidden = torch.cat([noisy, mask, condition.to(noisy.dtype)], dim=1)
    image = extras.get("image_embeds")
    if image is not None:  # (B, n, tokens, dim) -> (B n, tokens, dim); FLF2V's pos embedding pairs them again
        image = image.flatten(0, 1)
    return transformer(
        hidden_states=hidden,
        timestep=timesteps,
        encoder_hidden_states=text,
        encoder_hidden_states_image=image,
        return_dict=False,
    )[0]


# --- TI2V-5B: latent replacement with per-token timesteps ----------------------------------------------------


def first_frame_condition(x0, noisy, timesteps, extras=None, chosen=None):
    """The clean first latent frame at timestep 0 (objectives.first_frame_condition), tokens patched 2x2: as
    WanImageToVideoPipeline builds `latent_model_input` and `temp_ts` when `expand_timesteps` is set."""
    if chosen is None:
        chosen = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
    return objectives.first_frame_condition(x0, noisy, timesteps, chosen, patch=(2, 2))


# --- generation modes ----------------------------------------------------------------------------------------


def _image(pipe, inputs):
    from diffusers import WanImageToVideoPipeline

    if not isinstance(pipe, WanImageToVideoPipeline):  # TI2V-5B loads as WanPipeline; same modules
        pipe = WanImageToVideoPipeline.from_pipe(pipe)
    return pipe, {"image": inputs.image}


def _keyframes(pipe, inputs):
    return pipe, {"image": inputs.image, "last_image": inputs.last_image}


def _load_pipeline(cls_name: str, source: Source, dtype: torch.dtype):
    import diffusers

    cls = getattr(diffusers, cls_name)
    return common.load_pipeline(cls, diffusers.WanTransformer3DModel, source, dtype, base._DIFFUSERS_PROBE)


_UMT5 = ("umt5-xxl.encoder.json",)
_CLIP_H = "clip-vit-huge-14.image_encoder.json"
# What `finetune estimate` sizes without downloading (finetune/models/configs). The CLIP image encoder (ViT-H/14,
# 0.63 B parameters, ~1.3 GB in bf16, on the GPU only while caching) is not in the cache-stage estimate yet.
_SHIPPED = {
    "i2v": (
        ShippedModel(("i2v-14b", "i2v_14b"), "Wan2.1 I2V 14B", "wan2.1-i2v-14b.transformer.json", _UMT5,
                     "wan2.1.vae.json", image_encoder=_CLIP_H),
    ),
    "flf2v": (
        ShippedModel(("flf2v-14b", "flf2v_14b"), "Wan2.1 FLF2V 14B", "wan2.1-flf2v-14b.transformer.json", _UMT5,
                     "wan2.1.vae.json", image_encoder=_CLIP_H),
    ),
    "ti2v": (
        ShippedModel(("ti2v-5b", "ti2v_5b"), "Wan2.2 TI2V-5B", "wan2.2-ti2v-5b.transformer.json", _UMT5,
                     "wan2.2.vae.json"),
    ),
}  # fmt: skip


def _fake_extras(config: dict, batch: int, text_len: int, images: int = 1) -> dict:
    """For `finetune estimate`: the condition (None: shaped like the latents) and 257 CLIP tokens per image."""
    return {"condition": None, "image_embeds": torch.randn(batch, images, 257, config["image_dim"])}


def _variant(name: str, *, last: bool = False, embeds: bool = True) -> Family:
    blocks = base.FAMILY.lora_presets["blocks"]
    attention = base.FAMILY.lora_presets["attention"]
    if name == "ti2v":
        return dataclasses.replace(
            base.FAMILY,
            variant="ti2v",
            vae_stride=(4, 16),  # the Wan 2.2 VAE: 4x time, 16x space, 48 channels
            flow_shift=5.0,  # Wan 2.2 TI2V-5B samples with shift 5
            shipped=_SHIPPED[name],
            condition=first_frame_condition,
            condition_share=1.0,  # every clip trains image-to-video unless train.first_frame_conditioning says
            encode_video=encode_video,
            load_pipeline=functools.partial(_load_pipeline, "WanPipeline"),
            modes={"t2v": lambda pipe, inputs: (pipe, {}), "image": _image},
        )
    presets = {
        "blocks": blocks + _IMAGE_LINEARS,
        "attention": attention + _IMAGE_LINEARS,
        "ffn": base.FAMILY.lora_presets["ffn"],
    }
    return dataclasses.replace(
        base.FAMILY,
        variant=name,
        lora_presets=presets,
        shipped=_SHIPPED[name],
        fake_extras=functools.partial(_fake_extras, images=2 if last else 1),
        load_encoders=load_encoders if embeds else common.load_encoders,
        encode_video=functools.partial(encode_conditioned, last=last, embeds=embeds),
        predict=functools.partial(predict_conditioned, last=last),
        load_pipeline=functools.partial(_load_pipeline, "WanImageToVideoPipeline"),
        # FLF2V's image embedder takes exactly two images: it cannot animate one alone.
        modes={"last_image": _keyframes} if last else {"image": _image},
    )


VARIANTS = {"i2v": _variant("i2v"), "flf2v": _variant("flf2v", last=True), "ti2v": _variant("ti2v")}
# Channel-concatenated condition without CLIP embeddings (Wan 2.2 I2V-A14B's experts; their two-expert training
# is finetune/experts.py): the same "i2v" to the user.
WITHOUT_IMAGE_ENCODER = dataclasses.replace(
    _variant("i2v", embeds=False),
    lora_presets=base.FAMILY.lora_presets,  # no image keys/values in its cross-attention
    shipped=(),
    fake_extras=lambda config, batch, text_len: {"condition": None},
)
