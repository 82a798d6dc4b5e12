"""A tiny Wan pipeline built from the real diffusers/transformers classes and saved with save_pretrained.

Its sizes differ from the demo's (finetune/demo.py), so the kit is tested on a config it has never seen.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a red green blue yellow circle square ball moving left right up down over gray background in ink style "
    "clip image of the"
).split()


def tiny_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_wan(
    folder: Path, seed: int = 0, text_dim: int = 24, layers: int = 2, boundary_ratio: float | None = None
) -> Path:
    """`boundary_ratio`: a Wan 2.2 A14B-style pipeline, a second transformer (the low-noise expert, other
    weights) saved as transformer_2 and the boundary in model_index.json."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=48, num_layers=1, num_heads=2)
    )

    def tiny_transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=16,
            out_channels=16,
            text_dim=text_dim,
            freq_dim=32,
            ffn_dim=40,
            num_layers=layers,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    transformer = tiny_transformer()
    # B of a fresh output projection is random, as in a pretrained model (diffusers initialises it non-zero).
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **({"transformer_2": tiny_transformer(), "boundary_ratio": boundary_ratio} if boundary_ratio else {}),
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def transformer_output(transformer, seed: int = 0) -> torch.Tensor:
    """A tiny Wan transformer on one fixed noisy latent and fixed text: the quantity adapters change."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3, 4, 4, generator=g)
    text = torch.randn(1, 16, transformer.config.text_dim, generator=g)
    with torch.no_grad():
        return transformer(latents, torch.tensor([500.0]), text, return_dict=False)[0]


def rel(a, b) -> float:
    """Relative difference ||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def planned(transformer, recipe, family, device):
    """`transformer` through the training path's order: memory plan, LoRA (B made non-zero so LoRA gradients
    flow everywhere), finish -> (plan, trainable params, optimizer)."""
    from finetune.lora import add_lora, target_modules
    from finetune.memory import apply_memory_plan

    plan = apply_memory_plan(transformer, recipe, device, family)
    add_lora(transformer, recipe.lora, target_modules(family, transformer, recipe.lora.targets))
    torch.manual_seed(1)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    return plan, params, plan.finish(transformer, params)
