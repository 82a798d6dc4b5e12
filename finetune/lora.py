"""LoRA through peft: target presets, wrapping, saving in diffusers' layout, loading that tells the truth, merging.

The saved file is what `WanPipeline.save_lora_weights` writes: keys `transformer.<module>.lora_A.weight` /
`lora_B.weight`, and the peft config (rank, alpha, targets) in the safetensors header under
`lora_adapter_metadata`, which diffusers reads back so that alpha != rank loads at the right scale.
Our own facts (family, base model, steps, trigger word, kit version) sit beside it under `finetune`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import finetune
from finetune.config import LoraConfig as LoraSettings
from finetune.errors import UserError
from finetune.io import atomic_save_safetensors
from finetune.models import Family

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OUR_METADATA_KEY = "finetune"


def target_modules(family: Family, transformer: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """Full module names to wrap: every matching linear layer inside every transformer block."""
    if isinstance(targets, str):
        if targets not in family.lora_presets:
            raise UserError(
                f"lora.targets: unknown preset '{targets}' for {family.name} "
                f"(presets: {', '.join(family.lora_presets)}; or give a list of module names)"
            )
        suffixes = family.lora_presets[targets]
    else:
        suffixes = tuple(targets)
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    in_blocks = [n for n in linears if n.startswith(f"{family.blocks_attr}.")]
    chosen = []
    for suffix in suffixes:
        hits = [n for n in in_blocks if n == suffix or n.endswith("." + suffix)]
        if not hits:
            raise UserError(
                f"lora.targets: '{suffix}' matches no linear layer in the {family.name} blocks "
                f"(block linears: {sorted({n.split('.', 2)[2] for n in in_blocks})})"
            )
        chosen += hits
    return sorted(set(chosen))


def add_lora(transformer: torch.nn.Module, settings: LoraSettings, modules: list[str]) -> int:
    """Wraps `modules` with LoRA (B = 0, so the model is unchanged at step 0); returns the trainable count.

    LoRA weights are fp32 whatever the base dtype: their updates are ~lr x 1e-3 of their size, below bf16's
    resolution. They cost 4 bytes x rank x (in + out) per layer: ~88 MB at rank 32 on Wan 1.3B."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    # An exact-name regex, so that a name given for one block never also catches a look-alike elsewhere.
    pattern = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=pattern,
        init_lora_weights=True,
    )
    transformer.add_adapter(config)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    return sum(p.numel() for p in trainable)


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}


def _config_for_diffusers(transformer: torch.nn.Module) -> dict[str, Any]:
    config = transformer.peft_config["default"].to_dict()
    return {f"transformer.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_adapter(transformer: torch.nn.Module, out_dir: Path, info: dict[str, Any]) -> Path:
    """Writes `out_dir/pytorch_lora_weights.safetensors` atomically; `info` goes into the header."""
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(_config_for_diffusers(transformer), sort_keys=True, default=str),
        OUR_METADATA_KEY: json.dumps({**info, "kit_version": finetune.__version__}, sort_keys=True),
    }
    path = Path(out_dir) / WEIGHTS_NAME
    atomic_save_safetensors(lora_state_dict(transformer), path, metadata)
    return path


def adapter_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise UserError(f"--lora: {path} not found (give an adapter folder or its .safetensors file)")
    return path


def adapter_info(path: str | Path) -> dict[str, Any]:
    with safe_open(str(adapter_file(path)), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(OUR_METADATA_KEY, "{}"))


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`path/to/adapter:0.7` -> (path, 0.7); no suffix means scale 1 (a Windows `C:\\` is not a scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def load_adapters(pipe, loras: list[tuple[str, float]]) -> list[str]:
    """Loads each adapter onto the pipeline's transformer at its scale, and checks that every LoRA key found a
    layer: diffusers warns and carries on when keys do not match, which users meet as "it loaded but did
    nothing". Here a mismatch stops with the base the adapter was trained for."""
    names = []
    for i, (path, _) in enumerate(loras):
        file = adapter_file(path)
        name = f"lora{i}"
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())  # safe_open is not a dict: keys() is the only way to list them
        expected = {k.split(".lora_A.")[0].removeprefix("transformer.") for k in keys if ".lora_A." in k}
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        wrapped = {
            n
            for n, m in pipe.transformer.named_modules()
            if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and name in m.lora_A
        }
        missing = sorted(expected - wrapped)
        if not expected or missing:
            trained_for = adapter_info(file).get("base_model", "an unknown base")
            raise UserError(
                f"--lora {path}: {len(missing)} of {len(expected)} LoRA layers found no match in this model "
                f"(e.g. {missing[:2]}); the adapter was trained for {trained_for}"
            )
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return names
