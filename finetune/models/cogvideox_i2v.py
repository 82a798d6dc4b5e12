"""CogVideoX 1.0 5B-I2V: the cogvideox family's image-to-video variant (CogVideoXImageToVideoPipeline).

The transformer takes 2 x 16 channels, frame-major: the noisy latents and the image latents, i.e. the VAE latents
of the first frame encoded alone (scaled by `scaling_factor`) followed by zeros for the other latent frames.
Training conditions each clip on its own first frame, with no setting. The CogVideoX VAE normalises over time,
so the clip's first latent frame is not the first frame's encoding: the cache stores that one-frame encoding
(`image_latents`, 16 x 60 x 90 x 4 B = 0.35 MB per clip at 720x480) and `predict` pads it with zeros.
The pipeline samples the image's latent distribution with its generator; the cache keeps its mean (the
training condition is deterministic; the unit test checks the two differ exactly by the sampled noise).
5B-I2V has learned positional embeddings for 720x480 only: other sizes fail in the transformer, as in diffusers.
"""

from __future__ import annotations

import dataclasses

import torch

from finetune.errors import UserError
from finetune.models import Family, ShippedModel, Source, common
from finetune.models import cogvideox as base


def variant_for(source: Source) -> Family:
    from diffusers import CogVideoXTransformer3DModel

    with common.loading("the transformer config", source.base):
        config = CogVideoXTransformer3DModel.load_config(source.base, subfolder="transformer")
    if config["in_channels"] == config.get("out_channels", config["in_channels"]):
        return base.FAMILY
    if config.get("patch_size_t") is not None:
        raise UserError(
            f"model.path: {source.base} is CogVideoX 1.5 image-to-video (ofs embedding, frame padding), which "
            "this kit does not train yet; CogVideoX 1.0 5B-I2V and the text-to-video models are supported"
        )
    return I2V


def image_scale(vae) -> float:
    """CogVideoXImageToVideoPipeline.prepare_latents' factor (the 1.0 I2V models multiply by scaling_factor)."""
    factor = vae.config.scaling_factor
    return 1 / factor if vae.config.get("invert_scale_latents", False) else factor


@torch.no_grad()
def encode_video(enc, video: torch.Tensor) -> dict[str, torch.Tensor]:
    """Latents, and `image_latents` (B, 16, 1, H/8, W/8): the first frame encoded alone, scaled."""
    vae = enc.vae
    first = video[:, :, :1].to(enc.device, torch.float32)
    image = vae.encode(first).latent_dist.mode() * image_scale(vae)
    return {"latents": base.encode_video(enc, video), "image_latents": image.cpu()}


def predict(transformer, noisy, timesteps, text, extras=None):
    """[noisy, image latents + zero frames] along channels (frame-major in the transformer: the pipeline's
    `torch.cat([latent_model_input, latent_image_input], dim=2)`)."""
    image = extras["image_latents"][:, :, :1].to(noisy.dtype)  # one frame (the estimate's fake has F)
    padded = torch.cat(
        [image, image.new_zeros(*image.shape[:2], noisy.shape[2] - 1, *image.shape[3:])], dim=2
    )
    return base.predict(transformer, torch.cat([noisy, padded], dim=1), timesteps, text)


def load_pipeline(source: Source, dtype: torch.dtype):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    return common.load_pipeline(
        CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel, source, dtype, base._PROBE
    )


def _image(pipe, inputs):
    return pipe, {"image": inputs.image, **base._text_length(pipe)}


I2V = dataclasses.replace(
    base.FAMILY,
    variant="i2v",
    encode_video=encode_video,
    predict=predict,
    load_pipeline=load_pipeline,
    modes={"image": _image},
    shipped=(
        ShippedModel(
            ("cogvideox-5b-i2v", "cogvideox_5b_i2v"),
            "CogVideoX-5B-I2V",
            "cogvideox-5b-i2v.transformer.json",
            ("t5-v1_1-xxl.encoder.json",),
            "cogvideox.vae.json",
        ),
    ),  # fmt: skip
    fake_extras=lambda config, batch, text_len: {"image_latents": None},  # None: shaped like the latents
)
