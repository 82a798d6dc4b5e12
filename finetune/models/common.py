"""Loading code every family shares: the transformer (folder, hub id, or one .safetensors file), the tokenizer
named by model_index.json, a text encoder and the VAE, each turned into one clear line when it cannot load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from finetune.errors import UserError
from finetune.models import Source, dtype_kwarg, loading, model_index


def load_transformer(cls, source: Source, dtype: torch.dtype, diffusers_probe: str) -> torch.nn.Module:
    """`cls` from the base's transformer/ folder, or from one file: in diffusers' key layout (recognised by the
    key prefix `diffusers_probe`, e.g. a `finetune merge --transformer-only` output) it is loaded strictly, so a
    key that does not fit is an error rather than a silent no-op; otherwise diffusers converts the original
    checkpoint layout."""
    if not source.transformer_is_file:
        with loading("the transformer", source.transformer):
            return cls.from_pretrained(
                source.transformer, subfolder=source.component, **dtype_kwarg("diffusers", dtype)
            )
    with safe_open(source.transformer, framework="pt") as f:
        keys = set(f.keys())
    if not any(k.startswith(diffusers_probe) for k in keys):
        with loading("the transformer", source.transformer):
            return cls.from_single_file(
                source.transformer,
                config=source.base,
                subfolder=source.component,
                **dtype_kwarg("diffusers", dtype),
            )
    from safetensors.torch import load_file

    with loading("the transformer config", source.base):
        config = cls.load_config(source.base, subfolder=source.component)
    model = cls.from_config(config).to(dtype)
    missing, unexpected = model.load_state_dict(load_file(source.transformer), strict=False)
    if missing or unexpected:
        raise UserError(
            f"model.path: {source.transformer} does not fit the transformer of {source.base}: "
            f"{len(missing)} missing keys (e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {sorted(unexpected)[:2]}); is model.base the right model?"
        )
    return model


def load_component(source: Source, name: str, dtype: torch.dtype | None = None) -> Any:
    """The component `name` (tokenizer, text_encoder, vae, ...) of the class model_index.json names, loaded the
    way diffusers loads it (AutoTokenizer would also look for a config.json pipeline repos lack, offline)."""
    import importlib

    library, class_name = model_index(source.base)[name]
    cls = getattr(importlib.import_module(library), class_name)
    kwargs = (
        {} if dtype is None else dtype_kwarg("diffusers" if library == "diffusers" else "transformers", dtype)
    )
    with loading(f"the {name.replace('_', ' ')}", source.base):
        return cls.from_pretrained(source.base, subfolder=name, **kwargs)


@dataclass
class Encoders:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    device: torch.device


def load_encoders(source: Source, device: torch.device, dtype: torch.dtype) -> Encoders:
    """Tokenizer, text encoder (in `dtype`) and VAE, each of the class model_index.json names. The VAE stays in
    fp32: it is small next to the text encoder (0.25 GB for Wan 2.1, 1.7 GB for LTX), and bf16 encoding visibly
    shifts colours."""
    tokenizer = load_component(source, "tokenizer")
    text_encoder = load_component(source, "text_encoder", dtype)
    vae = load_component(source, "vae", torch.float32)
    return Encoders(tokenizer, text_encoder.to(device).eval(), vae.to(device).eval(), device)


def load_pipeline(cls, transformer_cls, source: Source, dtype: torch.dtype, diffusers_probe: str):
    """`cls.from_pretrained(base)`, with the transformer swapped in when it comes from another folder or file."""
    with loading("the pipeline", source.base):
        if source.transformer_is_file or source.transformer != source.base:
            transformer = load_transformer(transformer_cls, source, dtype, diffusers_probe)
            return cls.from_pretrained(
                source.base, transformer=transformer, **dtype_kwarg("diffusers", dtype)
            )
        return cls.from_pretrained(source.base, **dtype_kwarg("diffusers", dtype))


def text_mask(text: torch.Tensor) -> torch.Tensor:
    """(B, tokens) mask of real tokens in zero-padded cached text. The cache keeps each caption's real tokens
    only and collate pads with zeros; a real T5/Llama output row ends in a normalisation with a learned scale
    and is never all zeros, so an all-zero row is padding."""
    return text.abs().amax(dim=-1) > 0
