"""The real models `finetune estimate` and tools/bench.py size: each family's shipped configs (finetune/models/
configs, copied from the hub repos; nothing is downloaded) or a local diffusers folder's, and how to build a
model from a config with no weights (the class comes from the config's `_class_name` / `architectures`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from finetune.config import Recipe
from finetune.errors import UserError

CONFIGS = Path(__file__).parent / "models" / "configs"


def _read(path: Path) -> dict:
    """A config as saved: `_class_name` (diffusers) or `architectures` (transformers) names its class."""
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "_source"}


def kwargs_of(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


class Configs(NamedTuple):
    label: str
    transformer: dict
    text_encoders: list[dict]
    vae: dict


def fake_extras(family, config: dict, latent: tuple[int, ...], text_len: int) -> dict:
    """The family's fake per-batch extras; an entry given as None is shaped like the latents (Wan I2V's
    `condition`) and is made here, where the latent shape is known."""
    extras = family.fake_extras(config, latent[0], text_len) if family.fake_extras else {}
    return {k: torch.randn(latent, dtype=torch.bfloat16) if v is None else v for k, v in extras.items()}


def _shipped(family, recipe: Recipe):
    """The family's shipped model that model.path / model.base names, or None."""
    name = f"{recipe.model.path} {recipe.model.base or ''}".lower()
    return next((m for m in family.shipped if any(fragment in name for fragment in m.names)), None)


def family_of(recipe: Recipe):
    """model.family, else the family whose shipped models match the name, else the local folder's pipeline."""
    from finetune.models import _registry, family_for, get_family, resolve_source

    families = [get_family(recipe.model.family)] if recipe.model.family else list(_registry().values())
    for family in families:
        # Variants first: "wan2.1-i2v-14b" is Wan's I2V variant, not the T2V 14B the family's own entries match.
        for candidate in (*(family.variants() if family.variants else ()), family):
            if _shipped(candidate, recipe):
                return candidate
    if recipe.model.family and not Path(recipe.model.base or recipe.model.path).expanduser().is_dir():
        return families[0]
    return family_for(recipe.model, resolve_source(recipe.model))  # a local folder: its variant too


def model_configs(recipe: Recipe) -> Configs:
    """The real model's configs: from a local diffusers folder when `model.path`/`model.base` is one, else the
    shipped configs of the hub model it names (finetune/models/configs; nothing is downloaded)."""
    family = family_of(recipe)
    folder = Path(recipe.model.base or recipe.model.path).expanduser()
    shipped = _shipped(family, recipe)
    local = folder / "transformer" / "config.json"
    if not local.is_file() and shipped is None:
        known = ", ".join(m.label for m in family.shipped) or "none yet"
        raise UserError(
            f"model.path: no config known for '{recipe.model.path}' (estimate knows, for {family.name}: {known}; "
            "or point model.path at a local diffusers folder with transformer/config.json)"
        )
    label = shipped.label if shipped else str(folder)
    transformer = _read(local) if local.is_file() else _read(CONFIGS / shipped.transformer)
    encoders = sorted(folder.glob("text_encoder*/config.json"))
    if encoders:
        text = [_read(path) for path in encoders]
    elif shipped:
        text = [_read(CONFIGS / name) for name in shipped.text_encoders]
    else:
        raise UserError(f"model.path: {folder} has no text_encoder/config.json to size the cache stage from")
    vae = folder / "vae" / "config.json"
    if not vae.is_file() and shipped is None:
        raise UserError(f"model.path: {folder} has no vae/config.json to size the cache stage from")
    return Configs(label, transformer, text, _read(vae) if vae.is_file() else _read(CONFIGS / shipped.vae))


class Extras(NamedTuple):
    image_encoder: dict | None  # the image encoder's config, when the cache stage loads one
    experts: int  # transformers of the transformer's config in the pipeline (Wan 2.2 A14B: 2)


def model_extras(recipe: Recipe) -> Extras:
    """What else the pipeline holds, beyond model_configs: an image encoder, a second expert."""
    family = family_of(recipe)
    folder = Path(recipe.model.base or recipe.model.path).expanduser()
    if (folder / "transformer" / "config.json").is_file():
        image = folder / "image_encoder" / "config.json"
        experts = 2 if (folder / "transformer_2" / "config.json").is_file() else 1
        return Extras(_read(image) if image.is_file() else None, experts)
    shipped = _shipped(family, recipe)  # model_configs has already refused a model it does not know
    return Extras(_read(CONFIGS / shipped.image_encoder) if shipped.image_encoder else None, shipped.experts)


def diffusers_class(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"])


def text_encoder_model(config: dict, dtype: torch.dtype = torch.bfloat16):
    """The transformers model a text encoder config names, built from the config (weights uninitialised)."""
    import transformers

    class_name = config.get("_class_name") or config["architectures"][0]
    cls = getattr(transformers, class_name)
    kwargs = {k: v for k, v in kwargs_of(config).items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    for name, module in model.named_modules():  # from_pretrained keeps T5's `wo` in fp32 (overflow)
        if name.endswith(".wo") and isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(torch.empty_like(module.weight, dtype=torch.float32))
    return model.eval()


def latent_shape(recipe: Recipe, family, tcfg: dict, batch: int) -> tuple[int, ...]:
    """The largest bucket's latent shape. Channels: the transformer's output (its input can be wider, e.g. Wan
    I2V concatenates 20 conditioning channels that predict adds)."""
    frames = family.valid_frames(recipe.data.frames)
    t_stride, s_stride = family.vae_stride
    channels = tcfg.get("out_channels") or tcfg["in_channels"]
    h, w = recipe.data.height // s_stride, recipe.data.width // s_stride
    return (batch, channels, (frames - 1) // t_stride + 1, h, w)
