"""HunyuanVideo 13B text-to-video through diffusers' HunyuanVideoPipeline components.

Facts: the VAE compresses time 4x and space 8x into 16 channels, scaled by `scaling_factor` (0.476986; no
mean/std); the transformer patches 1x2x2 and takes latents channel-major (B, C, F, H, W) like Wan; valid frame
counts are 4k+1, sizes multiples of 16. 20 dual-stream blocks (video and text each with their own weights,
joint attention) are followed by 40 single-stream blocks (one weight set over the concatenated tokens).
Text: Llava-Llama-3-8B (4096-d) runs on the prompt wrapped in HunyuanVideo's template; the pipeline keeps the
hidden state of the third-from-last layer and crops the template's first `crop_start` (95) tokens; the real
tokens are masked in the transformer. CLIP-L's pooled output (768-d) joins the timestep embedding.
The T2V model is guidance-distilled: the transformer takes the guidance scale (times 1000) as an input.
Training uses guidance 1.0, as finetrainers does (finetrainers/models/hunyuan_video/base_specification.py,
`forward(guidance=1.0)` -> `* 1000.0`; musubi-tuner's `--guidance_scale` also defaults to 1.0, though its
training call passes it without the x1000 its sampling applies); sampling uses `--guidance` (pipeline: 6.0).
Objective: flow matching; the converted checkpoint's scheduler samples with shift 7.0
(diffusers scripts/convert_hunyuan_video_to_diffusers.py, `FlowMatchEulerDiscreteScheduler(shift=7.0)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.models import Family, ShippedModel, Source, common

# The distilled-guidance input while training, in pipeline units (the transformer gets it x 1000).
TRAIN_GUIDANCE = 1.0
CLIP_LENGTH = 77  # CLIP-L's context, as HunyuanVideoPipeline tokenizes it

# Dual-stream blocks (`transformer_blocks.N`): video attention projections and the text ("added") ones.
_DUAL_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0") + (
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
_DUAL_FFN = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# Single-stream blocks (`single_transformer_blocks.N`): q/k/v over video + text (no output projection: the
# attention output is concatenated with the MLP's and projected once by `proj_out`).
_SINGLE_FFN = ("proj_mlp", "proj_out")
# The adaptive norms' timestep -> shift/scale/gate linears (3072 -> 6 x 3072 per stream in the dual blocks):
# block linears too, so in "blocks" (musubi-tuner leaves them out by default; the `attention`/`ffn` presets do).
_MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")
# Not targeted: the token refiner (`context_embedder`), which turns Llama states into text tokens before the
# blocks. It is not a transformer block; musubi-tuner, too, targets only the two block kinds
# (networks/lora.py: HUNYUAN_TARGET_REPLACE_MODULES = MMDoubleStreamBlock, MMSingleStreamBlock).
_PROBE = "transformer_blocks.0.attn."


def load_transformer(source: Source, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return common.load_transformer(HunyuanVideoTransformer3DModel, source, dtype, _PROBE)


@dataclass
class Encoders(common.Encoders):
    tokenizer_2: Any  # CLIP-L's tokenizer
    text_encoder_2: torch.nn.Module  # CLIP-L: only its pooled output is used


def load_encoders(source: Source, device: torch.device, dtype: torch.dtype) -> Encoders:
    """Llama (~15 GB in bf16) and CLIP-L (0.25 GB) in `dtype`, the VAE in fp32 (tiled when the recipe says
    memory.vae_tiling: untiled, encoding 848x480x61 needs ~17 GiB of VAE activations, estimated)."""
    shared = common.load_encoders(source, device, dtype)
    tokenizer_2 = common.load_component(source, "tokenizer_2")
    text_encoder_2 = common.load_component(source, "text_encoder_2", dtype).to(device).eval()
    return Encoders(**vars(shared), tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)


def _template() -> tuple[str, int]:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]


@torch.no_grad()
def encode_prompts(
    enc: Encoders, prompts: list[str], max_sequence_length: int
) -> list[dict[str, torch.Tensor]]:
    """Per prompt: `text`, the Llama states of its real tokens after the template crop ((tokens, 4096), padding
    dropped: collate pads with zeros and `predict` masks them), and `text_pooled`, CLIP-L's pooled output (768,).
    As HunyuanVideoPipeline.encode_prompt: Llama runs with the attention mask on `max_sequence_length` +
    crop_start tokens and its third-from-last hidden state is kept; CLIP reads at most 77 tokens."""
    template, crop = _template()
    tokens = enc.tokenizer(
        [template.format(p) for p in prompts],
        max_length=max_sequence_length + crop,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(enc.device)
    out = enc.text_encoder(
        input_ids=tokens.input_ids.to(enc.device), attention_mask=mask, output_hidden_states=True
    )
    hidden = out.hidden_states[-3][:, crop:]
    lengths = mask[:, crop:].sum(dim=1)
    clip_ids = enc.tokenizer_2(
        prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    # CLIP-L stays where the family loaded it (the CPU under memory.text_encoder=cpu/int8): its inputs go there.
    clip_device = next(enc.text_encoder_2.parameters()).device
    pooled = enc.text_encoder_2(clip_ids.to(clip_device), output_hidden_states=False).pooler_output
    return [
        {"text": h[: int(n)].cpu(), "text_pooled": p.cpu()}
        for h, n, p in zip(hidden, lengths, pooled, strict=True)
    ]


@torch.no_grad()
def encode_video(enc: Encoders, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> scaled latents (B, 16, 1 + (F-1)/4, H/8, W/8); HunyuanVideoPipeline
    divides by the same factor before decoding."""
    latents = enc.vae.encode(video.to(enc.device, torch.float32)).latent_dist.mode()
    return (latents * enc.vae.config.scaling_factor).cpu()


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    extras: dict[str, torch.Tensor] | None = None,
):
    """The transformer call HunyuanVideoPipeline makes, with the cached text: the real-token mask is derived
    from the zero padding (a Llama hidden state of a real token is never all zeros), the pooled CLIP embedding
    comes from `extras["text_pooled"]`, and the distilled guidance input is TRAIN_GUIDANCE x 1000."""
    guidance = torch.full((len(noisy),), TRAIN_GUIDANCE * 1000.0, device=noisy.device, dtype=noisy.dtype)
    return transformer(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=text,
        encoder_attention_mask=common.text_mask(text).to(text.dtype),
        pooled_projections=extras["text_pooled"].to(text.dtype),
        guidance=guidance,
        return_dict=False,
    )[0]


def pipeline_text_kwargs(
    prompt: dict[str, torch.Tensor], negative: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """HunyuanVideoPipeline's arguments for cached (collated) prompt tensors: embeddings, their mask and the
    pooled CLIP embedding, for the prompt and the negative prompt (used only with `true_cfg_scale` > 1)."""
    return {
        "prompt_embeds": prompt["text"],
        "prompt_attention_mask": common.text_mask(prompt["text"]).to(prompt["text"].dtype),
        "pooled_prompt_embeds": prompt["text_pooled"],
        "negative_prompt_embeds": negative["text"],
        "negative_prompt_attention_mask": common.text_mask(negative["text"]).to(negative["text"].dtype),
        "negative_pooled_prompt_embeds": negative["text_pooled"],
    }


def load_pipeline(source: Source, dtype: torch.dtype):
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    return common.load_pipeline(HunyuanVideoPipeline, HunyuanVideoTransformer3DModel, source, dtype, _PROBE)


FAMILY = Family(
    name="hunyuan",
    pipeline_classes=("HunyuanVideoPipeline",),
    lora_presets={
        "blocks": _DUAL_ATTENTION + _DUAL_FFN + _SINGLE_FFN + _MODULATION,
        "attention": _DUAL_ATTENTION,  # the single blocks' q/k/v share these names: matched there too
        "ffn": _DUAL_FFN + _SINGLE_FFN,
    },
    blocks_attr="transformer_blocks",
    more_blocks=("single_transformer_blocks",),
    vae_stride=(4, 8),
    patch=(1, 2, 2),
    frame_step=4,
    flow_shift=7.0,
    load_transformer=load_transformer,
    load_encoders=load_encoders,
    encode_prompts=encode_prompts,
    encode_video=encode_video,
    predict=predict,
    load_pipeline=load_pipeline,
    modes={"t2v": lambda pipe, inputs: (pipe, {})},
    pipeline_text_kwargs=pipeline_text_kwargs,
    shipped=(
        ShippedModel(
            ("hunyuanvideo", "hunyuan-video", "hunyuan_video"),
            "HunyuanVideo 13B",
            "hunyuanvideo.transformer.json",
            ("llava-llama-3-8b.encoder.json", "clip-vit-large-patch14.encoder.json"),
            "hunyuanvideo.vae.json",
        ),
    ),
    text_dim_key="text_embed_dim",
    fake_extras=lambda config, batch, text_length: {
        "text_pooled": torch.randn(batch, config["pooled_projection_dim"])
    },
)
