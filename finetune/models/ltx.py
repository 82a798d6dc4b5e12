"""LTX-Video 0.9.x (2B, 13B) through diffusers' LTXPipeline components.

Facts: the VAE compresses time 8x and space 32x into 128 channels, so the transformer patches 1x1x1 and sees
tokens already "packed" (one token per latent voxel, (B, F*H*W, C)); valid frame counts are 8k+1 and sizes
multiples of 32; the text encoder is T5-XXL (4096-d), 128 tokens at inference, with an attention mask (padding
is masked out in cross-attention); the time embedding takes 1000 * sigma; rotary positions are scaled by
(8 / frame_rate, 32, 32) with frame_rate 25. Trained with flow matching; sampling shifts sigmas by sequence
length (dynamic shifting), training here uses a fixed shift (`train.flow_shift`, default below).
"""

from __future__ import annotations

import torch

from finetune.models import Family, ShippedModel, Source, common

FRAME_RATE = 25  # LTXPipeline's default; only enters through the rotary interpolation scale
VAE_STRIDE = (8, 32)

_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0") + (
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
_FFN = ("ff.net.0.proj", "ff.net.2")
_PROBE = "transformer_blocks.0.attn1."  # a key only diffusers' layout has


def load_transformer(source: Source, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return common.load_transformer(LTXVideoTransformer3DModel, source, dtype, _PROBE)


Encoders = common.Encoders
load_encoders = common.load_encoders


@torch.no_grad()
def encode_prompts(enc: Encoders, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
    """One (real tokens, dim) tensor per prompt. As LTXPipeline does, T5 runs on the padded ids without a mask
    (so the real tokens' outputs are exactly the pipeline's) and the padding is masked later, in the transformer."""
    tokens = enc.tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    hidden = enc.text_encoder(tokens.input_ids.to(enc.device))[0]
    return [h[: int(n)].cpu() for h, n in zip(hidden, tokens.attention_mask.sum(dim=1), strict=True)]


def normalize(latents: torch.Tensor, vae) -> torch.Tensor:
    shape = (1, -1, 1, 1, 1)
    mean = vae.latents_mean.view(shape).to(latents)
    std = vae.latents_std.view(shape).to(latents)
    return (latents - mean) * vae.config.scaling_factor / std


@torch.no_grad()
def encode_video(enc: Encoders, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, 128, 1 + (F-1)/8, H/32, W/32), unpacked: packing
    into tokens happens in `predict`, so the cache keeps the (C, F, H, W) layout of every family."""
    latents = enc.vae.encode(video.to(enc.device, torch.float32)).latent_dist.mode()
    return normalize(latents, enc.vae).cpu()


def pack(latents: torch.Tensor, p: int, p_t: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F/p_t * H/p * W/p, C * p_t * p * p), LTXPipeline._pack_latents."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // p_t, p_t, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens: torch.Tensor, f: int, h: int, w: int, p: int, p_t: int) -> torch.Tensor:
    """The inverse of `pack` for a latent of (F, H, W) = (f * p_t, h * p, w * p)."""
    x = tokens.reshape(tokens.size(0), f, h, w, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    extras: dict[str, torch.Tensor] | None = None,  # nothing else is cached for this family's text-to-video
):
    config = transformer.config
    p, p_t = config.patch_size, config.patch_size_t
    _, _, frames, height, width = noisy.shape
    f, h, w = frames // p_t, height // p, width // p
    out = transformer(
        hidden_states=pack(noisy, p, p_t),
        encoder_hidden_states=text,
        timestep=timesteps,
        encoder_attention_mask=common.text_mask(text).to(text.dtype),
        num_frames=f,
        height=h,
        width=w,
        rope_interpolation_scale=(VAE_STRIDE[0] / FRAME_RATE, VAE_STRIDE[1], VAE_STRIDE[1]),
        return_dict=False,
    )[0]
    return unpack(out, f, h, w, p, p_t)


def load_pipeline(source: Source, dtype: torch.dtype):
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    return common.load_pipeline(LTXPipeline, LTXVideoTransformer3DModel, source, dtype, _PROBE)


# Generation modes: LTX-Video was trained with frame conditioning, so one set of weights animates an image,
# interpolates keyframes and continues clips (LTXImageToVideoPipeline / LTXConditionPipeline share its modules).
def _image(pipe, inputs):
    from diffusers import LTXImageToVideoPipeline

    return LTXImageToVideoPipeline.from_pipe(pipe), {"image": inputs.image}


def _condition_pipeline(pipe, inputs):
    """LTXConditionPipeline on the same modules. It sets its timesteps without the sequence-length shift `mu`
    that LTX-Video 0.9.0/0.9.1 schedulers (use_dynamic_shifting) need, so give it a fixed-shift copy of the
    scheduler at the shift LTXPipeline would use at this size: exp(mu)."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    config = pipe.scheduler.config
    if not config.get("use_dynamic_shifting"):
        return LTXConditionPipeline.from_pipe(pipe)
    tokens = (
        ((inputs.frames - 1) // VAE_STRIDE[0] + 1)
        * (inputs.height // VAE_STRIDE[1])
        * (inputs.width // VAE_STRIDE[1])
    )
    mu = calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        config, use_dynamic_shifting=False, shift=math.exp(mu)
    )
    return LTXConditionPipeline.from_pipe(pipe, scheduler=scheduler)


def _keyframes(pipe, inputs):
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    conditions = [LTXVideoCondition(image=inputs.image, frame_index=0)]
    conditions.append(LTXVideoCondition(image=inputs.last_image, frame_index=inputs.frames - 1))
    return _condition_pipeline(pipe, inputs), {"conditions": conditions}


def _video(pipe, inputs):
    """SDEdit: the input clip's latents noised to sigma = strength, then denoised with the prompt."""
    condition = _condition_pipeline(pipe, inputs)
    video = condition.video_processor.preprocess_video(inputs.video, inputs.height, inputs.width)
    vae = condition.vae
    with torch.no_grad():
        latents = vae.encode(video.to(pipe.device, vae.dtype)).latent_dist.mode()
    # LTXConditionPipeline normalises its own conditions without the scaling factor; do the same.
    latents = condition._normalize_latents(latents, vae.latents_mean, vae.latents_std)
    return condition, {"latents": latents, "denoise_strength": inputs.strength}


def _extend(pipe, inputs):
    """Continues a clip: its last frames (8k+1 of them) condition the first frames of the new video."""
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    keep = FAMILY.valid_frames(min(len(inputs.extend), max(1, inputs.frames - FAMILY.frame_step)))
    conditions = [LTXVideoCondition(video=inputs.extend[-keep:], frame_index=0)]
    return _condition_pipeline(pipe, inputs), {"conditions": conditions}


def first_frame_condition(x0, noisy, timesteps, extras, chosen):
    """Image-to-video training as LTXImageToVideoPipeline samples: the chosen clips' first latent frame given
    clean with timestep 0 on its tokens (patch 1: one token per latent pixel), left out of the loss. The causal
    VAE encodes pixel frame 0 alone, so the clip's first latent frame is the image's latent: nothing cached."""
    from finetune import objectives

    return objectives.first_frame_condition(x0, noisy, timesteps, chosen, patch=FAMILY.patch[1:])


FAMILY = Family(
    name="ltx",
    pipeline_classes=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
    lora_presets={"blocks": _ATTENTION + _FFN, "attention": _ATTENTION, "ffn": _FFN},
    blocks_attr="transformer_blocks",
    vae_stride=VAE_STRIDE,
    patch=(1, 1, 1),
    frame_step=8,
    # LTXPipeline's dynamic shift at 768x512x97 (4,992 tokens) is exp(~1.15) ~ 3.2; a fixed 3.0 trains there.
    flow_shift=3.0,
    load_transformer=load_transformer,
    load_encoders=load_encoders,
    encode_prompts=encode_prompts,
    encode_video=encode_video,
    predict=predict,
    load_pipeline=load_pipeline,
    modes={
        "t2v": lambda pipe, inputs: (pipe, {}),
        "image": _image,
        "last_image": _keyframes,
        "video": _video,
        "extend": _extend,
    },
    shipped=(
        ShippedModel(
            ("ltx-video", "ltxv", "ltx_video"),
            "LTX-Video 2B (0.9.x)",
            "ltx-video-2b.transformer.json",
            ("t5-v1_1-xxl.encoder.json",),
            "ltx-video-0.9.1.vae.json",
        ),  # fmt: skip
    ),
    text_dim_key="caption_channels",
    condition=first_frame_condition,  # on train.first_frame_conditioning of the clips (default 0: text-to-video)
)
