"""LoRA file layouts: read any of them into one in-memory form, write diffusers, ComfyUI or a peft folder.

Layouts (Wan names shown; diffusers' module names are the kit's own):
  diffusers  `transformer.blocks.0.attn1.to_q.lora_A.weight`, peft config JSON in the header
             (`lora_adapter_metadata`), which is where rank and alpha live.
  comfy      `diffusion_model.blocks.0.self_attn.q.lora_A.weight` (ComfyUI's own module names, the generic
             form ComfyUI's `model_lora_keys_unet` maps for every model) plus a scalar `.alpha` per layer, so
             ComfyUI's scale alpha/rank is the trained one. diffusion-pipe writes this layout too. Wan, LTX-Video
             (`diffusion_model.transformer_blocks.0.attn1.to_q`) and CogVideoX (`diffusion_model.blocks.0.q`);
             their names are in finetune/comfy_names.py.
  kohya      `lora_unet_blocks_0_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha` (musubi-tuner);
             read only.
  peft       a folder with `adapter_config.json` + `adapter_model.safetensors`
             (`base_model.model.blocks.0.attn1.to_q.lora_A.weight`), for `PeftModel.from_pretrained`.

Every tensor is accounted for: a key that maps to no layer is an error naming it, never dropped. Tensors are
never rescaled on the way through (alpha travels beside them), so diffusers -> comfy -> diffusers is bitwise.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from finetune.comfy_names import (  # noqa: F401  (re-exported: the Wan map's home was here)
    COMFY_FUSED,
    COMFY_MAPS,
    WAN_BLOCK_NAMES,
    WAN_OTHER_NAMES,
    wan_to_diffusers,
    wan_to_original,
)
from finetune.errors import UserError
from finetune.io import atomic_save_safetensors, atomic_write_text

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name (finetune.lora re-exports it)
# Wan 2.2 A14B's low-noise expert (transformer_2): the same `transformer.` keys in a second file, which diffusers
# loads with load_lora_weights(..., weight_name=this, load_into_transformer_2=True). See finetune/experts.py.
TRANSFORMER_2_WEIGHTS_NAME = "pytorch_lora_weights_transformer_2.safetensors"
COMFY_NAME = "pytorch_lora_weights_comfy.safetensors"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OUR_METADATA_KEY = "finetune"
# The diffusers peft config rides along in other layouts under this key, so converting back is bitwise. It must
# not be `lora_adapter_metadata` there: diffusers folds a ComfyUI file's alpha into its weights and would then
# apply the header's alpha a second time.
CARRIED_CONFIG_KEY = "finetune_diffusers_config"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FORMATS = ("diffusers", "comfy", "peft")

_BLOCK_UNDERSCORE = re.compile(r"blocks_(\d+)_(.+)")


def _from_underscored(name: str) -> str | None:
    """kohya's `blocks_0_self_attn_q` (dots flattened to underscores) -> diffusers name, or None. Both the
    original names (musubi-tuner) and diffusers' names (diffusers-based trainers) are recognised."""
    m = _BLOCK_UNDERSCORE.fullmatch(name)
    if m:
        for original, diffusers in WAN_BLOCK_NAMES.items():
            if m[2] in (original.replace(".", "_"), diffusers.replace(".", "_")):
                return f"blocks.{m[1]}.{diffusers}"
        return None
    for original, diffusers in WAN_OTHER_NAMES.items():
        if name in (original.replace(".", "_"), diffusers.replace(".", "_")):
            return diffusers
    return None


# --- the in-memory adapter --------------------------------------------------------------------------------


@dataclass
class LoraLayer:
    down: torch.Tensor  # lora_A: (rank, in_features)
    up: torch.Tensor  # lora_B: (out_features, rank)
    alpha: float  # the layer's output is scaled by alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class Adapter:
    layers: dict[str, LoraLayer]  # diffusers module name (no `transformer.` prefix) -> layer
    format: str = "diffusers"
    info_json: str | None = None  # our metadata, kept as the exact string it was
    diffusers_config: str | None = None  # diffusers' peft config JSON; dropped once tensors change
    path: Path | None = None
    file_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> dict[str, Any]:
        try:
            info = json.loads(self.info_json) if self.info_json else {}
        except json.JSONDecodeError:
            return {}
        return info if isinstance(info, dict) else {}

    @property
    def params(self) -> int:
        return sum(x.down.numel() + x.up.numel() for x in self.layers.values())

    def ranks(self) -> list[int]:
        return sorted({x.rank for x in self.layers.values()})

    def alphas(self) -> list[float]:
        return sorted({x.alpha for x in self.layers.values()})


# --- reading ------------------------------------------------------------------------------------------------


def find_weights(path: Path) -> Path:
    """The weights file of an adapter folder (diffusers, then peft, then ComfyUI names, then a lone
    .safetensors), or the file itself. Pickle files are named so that the caller can refuse them."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"--lora: {path} not found (give an adapter folder or its .safetensors file)")
    for name in (WEIGHTS_NAME, TRANSFORMER_2_WEIGHTS_NAME, PEFT_WEIGHTS, COMFY_NAME):
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not found and pickles:
        return pickles[0]
    what = f"{len(found)} .safetensors files (name one)" if found else "no .safetensors file"
    raise UserError(f"--lora: {path} has {what}")


def refuse_pickle(path: Path) -> None:
    raise UserError(
        f"{path}: a {path.suffix} file is a pickle, which can run code when loaded; adapters load from "
        f"safetensors only. Convert it once: finetune convert {path} --allow-pickle --to diffusers --out DIR "
        "(reads tensors only, with torch.load(weights_only=True))"
    )


def _read_tensors(file: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if file.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            refuse_pickle(file)
        try:
            # weights_only=True: the unpickler builds tensors and plain containers only, never arbitrary objects.
            loaded = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{file}: cannot read tensors from it ({type(exc).__name__}: {exc})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise UserError(f"{file}: expected a flat dict of tensors")
        return dict(loaded), {}
    if file.suffix != ".safetensors":
        raise UserError(f"{file}: not a .safetensors file")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"{file}: cannot read it as safetensors ({type(exc).__name__}: {exc})") from None


_KINDS = {
    ".lora_A.weight": "down",
    ".lora_down.weight": "down",
    ".lora_B.weight": "up",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}


def _try_split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _KINDS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def _split_key(key: str) -> tuple[str, str]:
    split = _try_split_key(key)
    if split:
        return split
    raise UserError(
        f"LoRA key '{key}': not a lora_A/lora_B/lora_down/lora_up weight or an alpha (DoRA scales, bias diffs "
        "and full-weight diffs are not supported); nothing was converted"
    )


def _comfy_family(keys: list[str], named_family: str | None) -> str | None:
    """The family whose ComfyUI names fit every mappable `diffusion_model.` key (None when no key maps: the
    key loop then names the first). The names of Wan, LTX-Video and CogVideoX differ except `proj_out`, so a
    file fits two families only when it holds nothing else; the family in its metadata decides then."""
    fits: dict[str, set[str]] = {}
    for key in keys:
        split = _try_split_key(key)
        if split and split[0].startswith("diffusion_model."):
            raw = split[0].removeprefix("diffusion_model.")
            families = {f for f, (_, to_diffusers) in COMFY_MAPS.items() if to_diffusers(raw)}
            if families:
                fits[key] = families
    if not fits:
        return None
    common = set.intersection(*fits.values())
    if named_family in common:
        return named_family
    if len(common) == 1:
        return common.pop()
    if not common:
        examples = {}
        for key, families in fits.items():
            examples.setdefault(min(families), key)
        raise UserError(
            f"ComfyUI keys of different families in one file ({', '.join(sorted(examples.values()))}); "
            "nothing was converted"
        )
    raise UserError(
        f"ComfyUI keys such as '{next(iter(fits))}' fit {' and '.join(sorted(common))} alike and the file "
        "names no family in its metadata; nothing was converted"
    )


def _module_name(raw: str, key: str, comfy_family: str | None = None) -> tuple[str, str]:
    """(diffusers module name, layout) for the module part of a key. diffusers and peft names are taken as
    they are (load_adapters checks each against the model); ComfyUI names go through `comfy_family`'s map,
    kohya names through the Wan map."""
    if raw.startswith("transformer."):
        return raw.removeprefix("transformer."), "diffusers"
    if raw.startswith("diffusion_model."):
        name = COMFY_MAPS[comfy_family][1](raw.removeprefix("diffusion_model.")) if comfy_family else None
        if name:
            return name, "comfy"
    elif raw.startswith("lora_unet_"):
        name = _from_underscored(raw.removeprefix("lora_unet_"))
        if name:
            return name, "kohya"
    elif "." in raw and not raw.startswith(("text_encoder", "unet.", "transformer_2.")):
        bare = raw.removeprefix("base_model.model.")
        layout = "peft" if bare != raw else "diffusers"
        return wan_to_diffusers(bare) or bare, layout
    raise UserError(
        f"LoRA key '{key}': '{raw}' is no transformer layer this kit can map (ComfyUI names are mapped for "
        f"{', '.join(COMFY_MAPS)}{f' (this file: {comfy_family})' if comfy_family else ''}, kohya names for wan; "
        "text-encoder and second-transformer keys are not supported); nothing was converted"
    )


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # peft's rule (peft.utils.other.get_pattern_key): a pattern matches a name that ends with it after a dot.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _alphas_from_config(config: dict[str, Any], names: list[str], ranks: dict[str, int]) -> dict[str, float]:
    """Per-layer alpha such that alpha / rank is peft's scale (rsLoRA's alpha / sqrt(rank) folded in)."""
    if config.get("use_dora"):
        raise UserError("LoRA config: use_dora=true (DoRA) is not supported")
    alphas = {}
    for name in names:
        r = ranks[name]
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", r)))
        alphas[name] = alpha * r**0.5 if config.get("use_rslora") else alpha
    return alphas


def read_adapter(path: str | Path, allow_pickle: bool = False) -> Adapter:
    """Any supported layout -> Adapter. Raises a UserError naming the first key it cannot account for."""
    file = find_weights(Path(path))
    tensors, header = _read_tensors(file, allow_pickle)
    if not tensors:
        raise UserError(f"{file}: holds no tensors")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    layouts = set()
    keys_family = _comfy_family(sorted(tensors), _named_family(header.get(OUR_METADATA_KEY)))
    for key in sorted(tensors):
        raw, kind = _split_key(key)
        name, layout = _module_name(raw, key, keys_family)
        layouts.add(layout)
        if kind in parts.setdefault(name, {}):
            raise UserError(f"LoRA key '{key}': a second {kind} tensor for layer {name}")
        parts[name][kind] = tensors[key]
    if len(layouts) > 1:
        raise UserError(f"{file}: mixes key layouts ({', '.join(sorted(layouts))}); convert each part apart")
    layout = layouts.pop()
    for name, p in parts.items():
        lacking = [k for k in ("down", "up") if k not in p]
        if lacking:
            raise UserError(f"{file}: layer {name} has no {' or '.join(lacking)} weight (a LoRA needs both)")
        if p["down"].ndim != 2 or p["up"].ndim != 2 or p["down"].shape[0] != p["up"].shape[1]:
            raise UserError(
                f"{file}: layer {name}: lora_A {tuple(p['down'].shape)} and lora_B {tuple(p['up'].shape)} "
                "do not form a LoRA (A is rank x in, B is out x rank)"
            )
    ranks = {name: p["down"].shape[0] for name, p in parts.items()}

    diffusers_config = header.get(DIFFUSERS_METADATA_KEY) if layout == "diffusers" else None
    diffusers_config = diffusers_config or header.get(CARRIED_CONFIG_KEY)
    if layout in ("comfy", "kohya"):  # alpha tensors; none means scale 1, as ComfyUI and diffusers read it
        alphas = {n: float(p["alpha"].item()) if "alpha" in p else float(ranks[n]) for n, p in parts.items()}
    else:
        if any("alpha" in p for p in parts.values()):
            raise UserError(f"{file}: alpha tensors in a {layout} file (its alpha belongs in the config)")
        config: dict[str, Any] = {}
        if layout == "peft" and (file.parent / PEFT_CONFIG).is_file():
            config = json.loads((file.parent / PEFT_CONFIG).read_text(encoding="utf-8"))
        elif header.get(DIFFUSERS_METADATA_KEY) or header.get(CARRIED_CONFIG_KEY):
            carried = json.loads(header.get(DIFFUSERS_METADATA_KEY) or header[CARRIED_CONFIG_KEY])
            config = {k.removeprefix("transformer."): v for k, v in carried.items()}
        alphas = _alphas_from_config(config, list(parts), ranks)
    layers = {n: LoraLayer(p["down"], p["up"], alphas[n]) for n, p in sorted(parts.items())}
    return Adapter(
        layers=layers,
        format=layout,
        info_json=header.get(OUR_METADATA_KEY),
        diffusers_config=diffusers_config,
        path=file,
        file_size=file.stat().st_size,
        extra={"family": keys_family} if layout == "comfy" else {},
    )


def _named_family(info_json: str | None) -> str | None:
    try:
        info = json.loads(info_json) if info_json else {}
    except json.JSONDecodeError:
        return None
    return info.get("family") if isinstance(info, dict) else None


def comfy_family(adapter: Adapter) -> str:
    """The family whose ComfyUI names to write: the metadata's, the one a ComfyUI file was read as, or the one
    family whose names cover every layer."""
    family = adapter.info.get("family") or adapter.extra.get("family")
    if family:
        return family
    fits = [f for f, (to_comfy, _) in COMFY_MAPS.items() if all(to_comfy(n) for n in adapter.layers)]
    if len(fits) > 1:
        raise UserError(
            f"ComfyUI layout: the adapter names no family in its metadata and its layers fit {' and '.join(fits)} "
            "alike; convert the adapter folder training wrote (its metadata names the family)"
        )
    return fits[0] if fits else "wan"  # none fits: the layer loop names the first layer without a name


# --- writing ------------------------------------------------------------------------------------------------


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """peft LoraConfig fields for this adapter: the most common rank/alpha, and patterns for the rest."""
    ranks = Counter(x.rank for x in adapter.layers.values())
    alphas = Counter(x.alpha for x in adapter.layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    exact = {n: "^" + re.escape(n) for n in adapter.layers}  # `^`: blocks.1 must not also catch blocks.11
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {exact[n]: x.rank for n, x in adapter.layers.items() if x.rank != r},
        "alpha_pattern": {exact[n]: x.alpha for n, x in adapter.layers.items() if x.alpha != alpha},
        "target_modules": sorted(adapter.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
        "peft_type": "LORA",
    }


def diffusers_config_json(adapter: Adapter) -> str:
    if adapter.diffusers_config:
        return adapter.diffusers_config
    return json.dumps({f"transformer.{k}": v for k, v in peft_config(adapter).items()}, sort_keys=True)


def diffusers_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, layer in adapter.layers.items():
        tensors[f"transformer.{name}.lora_A.weight"] = layer.down
        tensors[f"transformer.{name}.lora_B.weight"] = layer.up
    return tensors


def _header(adapter: Adapter, **extra: str) -> dict[str, str]:
    header = {"format": "pt", **extra}
    if adapter.info_json is not None:
        header[OUR_METADATA_KEY] = adapter.info_json
    return header


def write_diffusers(adapter: Adapter, file: Path) -> Path:
    header = _header(adapter, **{DIFFUSERS_METADATA_KEY: diffusers_config_json(adapter)})
    atomic_save_safetensors(diffusers_state_dict(adapter), file, header)
    return file


def comfy_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    family = comfy_family(adapter)
    if family in COMFY_FUSED:  # HunyuanVideo: ComfyUI fuses q, k, v (and the MLP input) into one layer
        tensors = {}
        for original, (down, up, alpha) in COMFY_FUSED[family](adapter.layers).items():
            tensors[f"diffusion_model.{original}.lora_A.weight"] = down
            tensors[f"diffusion_model.{original}.lora_B.weight"] = up
            tensors[f"diffusion_model.{original}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return tensors
    if family not in COMFY_MAPS:
        raise UserError(
            f"ComfyUI layout: no key map for the '{family}' family (known: {', '.join(COMFY_MAPS)})"
        )
    to_comfy = COMFY_MAPS[family][0]
    tensors = {}
    for name, layer in adapter.layers.items():
        original = to_comfy(name)
        if original is None:
            raise UserError(
                f"ComfyUI layout: layer '{name}' has no name in ComfyUI's {family} model; nothing was written"
            )
        tensors[f"diffusion_model.{original}.lora_A.weight"] = layer.down
        tensors[f"diffusion_model.{original}.lora_B.weight"] = layer.up
        # fp32: an alpha such as 8 or 16 is exact; ComfyUI and diffusers read it with .item().
        tensors[f"diffusion_model.{original}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def write_comfy(adapter: Adapter, file: Path) -> Path:
    header = _header(adapter, **{CARRIED_CONFIG_KEY: diffusers_config_json(adapter)})
    atomic_save_safetensors(comfy_state_dict(adapter), file, header)
    return file


def write_peft(adapter: Adapter, folder: Path) -> Path:
    config = {**peft_config(adapter), "base_model_name_or_path": adapter.info.get("base_model")}
    tensors = {}
    for name, layer in adapter.layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.down
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.up
    folder = Path(folder)
    header = _header(adapter, **{CARRIED_CONFIG_KEY: diffusers_config_json(adapter)})
    atomic_save_safetensors(tensors, folder / PEFT_WEIGHTS, header)
    atomic_write_text(folder / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def write_adapter_as(adapter: Adapter, to: str, out: str | Path) -> Path:
    """`out` a .safetensors file (diffusers, comfy) or a folder (the layout's file names inside)."""
    if to not in FORMATS:
        raise UserError(f"--to {to}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if to == "peft":
        if out.suffix == ".safetensors":
            raise UserError(f"--out {out}: a peft adapter is a folder (adapter_config.json + weights)")
        return write_peft(adapter, out)
    file = out if out.suffix == ".safetensors" else out / (WEIGHTS_NAME if to == "diffusers" else COMFY_NAME)
    return write_diffusers(adapter, file) if to == "diffusers" else write_comfy(adapter, file)


def convert(source: str | Path, to: str, out: str | Path, allow_pickle: bool = False) -> Path:
    adapter = read_adapter(source, allow_pickle=allow_pickle)
    return write_adapter_as(adapter, to, out)
