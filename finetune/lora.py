"""LoRA through peft: target presets, wrapping, saving in diffusers' layout, loading that tells the truth, merging.

The saved file is what `WanPipeline.save_lora_weights` writes: keys `transformer.<module>.lora_A.weight` /
`lora_B.weight`, and the peft config (rank, alpha, targets) in the safetensors header under
`lora_adapter_metadata`, which diffusers reads back so that alpha != rank loads at the right scale.
Our own facts (family, base model, steps, trigger word, kit version) sit beside it under `finetune`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import finetune
from finetune.config import LoraConfig as LoraSettings
from finetune.errors import UserError
from finetune.formats import (
    DIFFUSERS_METADATA_KEY,
    OUR_METADATA_KEY,
    PICKLE_SUFFIXES,
    TRANSFORMER_2_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Adapter,
    diffusers_config_json,
    diffusers_state_dict,
    find_weights,
    read_adapter,
    refuse_pickle,
    write_diffusers,
)
from finetune.io import atomic_dir, atomic_save_safetensors
from finetune.models import Family
from finetune.ui import say


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
    in_blocks = [n for n in linears if n.startswith(tuple(f"{blocks}." for blocks in family.block_lists))]
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


def save_adapter(
    transformer: torch.nn.Module, out_dir: Path, info: dict[str, Any], weights_name: str = WEIGHTS_NAME
) -> Path:
    """Writes `out_dir/pytorch_lora_weights.safetensors` atomically (Wan 2.2 A14B's low-noise expert: the
    `..._transformer_2` file, same `transformer.` keys); `info` goes into the header."""
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(_config_for_diffusers(transformer), sort_keys=True, default=str),
        OUR_METADATA_KEY: json.dumps({**info, "kit_version": finetune.__version__}, sort_keys=True),
    }
    path = Path(out_dir) / weights_name
    atomic_save_safetensors(lora_state_dict(transformer), path, metadata)
    return path


def write_extra_formats(folder: Path, formats: list[str], weights_name: str = WEIGHTS_NAME) -> list[Path]:
    """The ComfyUI file and/or peft folder files beside a saved diffusers adapter (`output.formats`). The
    low-noise expert of Wan 2.2 A14B gets its own: `..._transformer_2_comfy.safetensors`, peft under
    transformer_2/."""
    from finetune.experts import comfy_name
    from finetune.formats import write_comfy, write_peft

    adapter = read_adapter(Path(folder) / weights_name)
    written = []
    if "comfy" in formats:
        written.append(write_comfy(adapter, Path(folder) / comfy_name(weights_name)))
    if "peft" in formats:
        peft_dir = Path(folder) if weights_name == WEIGHTS_NAME else Path(folder) / "transformer_2"
        written.append(write_peft(adapter, peft_dir))
    return written


def adapter_file(path: str | Path) -> Path:
    """The weights file of an adapter: a folder (diffusers, peft or ComfyUI file names inside), a file, or a hub
    id `owner/name` (or `owner/name/file.safetensors`) resolved through the local Hugging Face cache."""
    local = Path(path).expanduser()
    if not local.exists():
        from finetune.hub import download_adapter, looks_like_hub_ref

        if looks_like_hub_ref(str(path)):
            local = download_adapter(str(path))
        else:
            raise UserError(f"--lora: {local} not found (give an adapter folder or its .safetensors file)")
    return find_weights(local)


def adapter_info(path: str | Path) -> dict[str, Any]:
    """Our metadata from the header (family, base_model, steps, trigger, ...); {} when there is none."""
    file = adapter_file(path)
    if file.suffix in PICKLE_SUFFIXES:
        refuse_pickle(file)
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        info = json.loads(meta.get(OUR_METADATA_KEY, "{}"))
    except json.JSONDecodeError:  # metadata is data: a malformed value is ignored, never evaluated
        return {}
    return info if isinstance(info, dict) else {}


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`path/to/adapter:0.7` -> (path, 0.7); no suffix means scale 1 (a Windows `C:\\` is not a scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


@dataclass
class MatchReport:
    """How an adapter's layers meet a model's modules."""

    matched: list[str]
    unexpected: list[str]  # no such linear layer in the model
    shape_mismatch: list[str]  # "name: adapter OUTxIN, model OUTxIN"

    @property
    def problems(self) -> int:
        return len(self.unexpected) + len(self.shape_mismatch)


def match_report(transformer: torch.nn.Module, adapter: Adapter) -> MatchReport:
    modules = dict(transformer.named_modules())
    matched, unexpected, mismatch = [], [], []
    for name, layer in adapter.layers.items():
        module = modules.get(name)
        base = getattr(module, "base_layer", module)  # a layer that already carries another adapter
        if not isinstance(base, torch.nn.Linear):
            unexpected.append(name)
        elif (base.out_features, base.in_features) != (layer.up.shape[0], layer.down.shape[1]):
            mismatch.append(
                f"{name}: adapter {layer.up.shape[0]}x{layer.down.shape[1]}, "
                f"model {base.out_features}x{base.in_features}"
            )
        else:
            matched.append(name)
    return MatchReport(matched, unexpected, mismatch)


def _wrapped(transformer: torch.nn.Module, adapter_name: str) -> set[str]:
    return {
        n
        for n, m in transformer.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and adapter_name in m.lora_A
    }


def load_adapters(pipe, loras: list[tuple[str, float]]) -> list[str]:
    """Loads each adapter (any layout: diffusers, ComfyUI, kohya, peft) onto the pipeline's transformer at its
    scale, and accounts for every layer: diffusers warns and carries on when keys do not match, which users meet
    as "it loaded but did nothing". Here one layer without a home stops the load, naming the base the adapter
    was trained for; a good load prints one line with the counts. A Wan 2.2 A14B adapter folder's second file
    (`pytorch_lora_weights_transformer_2.safetensors`, the low-noise expert) goes into `transformer_2`."""
    from finetune.experts import adapter_parts

    names = []
    placed: dict[str, list[tuple[str, float]]] = {}  # component -> (adapter name, scale) loaded into it
    for i, (path, scale) in enumerate(loras):
        name = f"lora{i}"
        for component, file in adapter_parts(adapter_file(path)):
            model = getattr(pipe, component, None)
            if model is None:
                raise UserError(
                    f"--lora {path}: {file.name} is the low-noise expert's adapter (transformer_2 of Wan 2.2 "
                    "A14B), and this model has one transformer; give it a Wan 2.2 A14B base"
                )
            _load_one(pipe, component, model, file, name, path)
            placed.setdefault(component, []).append((name, scale))
        names.append(name)
    if not names:
        return names
    if getattr(pipe, "transformer_2", None) is None:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    else:  # per expert: diffusers' pipe.set_adapters wants every name in both denoisers
        for component, entries in placed.items():
            getattr(pipe, component).set_adapters([n for n, _ in entries], [s for _, s in entries])
    return names


def _load_one(pipe, component: str, model: torch.nn.Module, file: Path, name: str, path: str) -> None:
    adapter = read_adapter(file)
    report = match_report(model, adapter)
    total = len(adapter.layers)
    where = "" if component == "transformer" else f" ({file.name} into {component})"
    if report.problems:
        trained_for = adapter.info.get("base_model", "an unknown base")
        examples = (report.unexpected[:2] + report.shape_mismatch[:2])[:3]
        raise UserError(
            f"--lora {path}{where}: {report.problems} of {total} LoRA layers found no match in this model "
            f"({len(report.unexpected)} with no such layer, {len(report.shape_mismatch)} with another shape; "
            f"e.g. {examples}); the adapter was trained for {trained_for}"
        )
    second = {"load_into_transformer_2": True} if component == "transformer_2" else {}
    if adapter.format == "diffusers":
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name, **second)
    else:  # converted in memory; alpha travels in the config, the tensors are the file's own
        pipe.load_lora_into_transformer(
            diffusers_state_dict(adapter),
            transformer=model,
            adapter_name=name,
            metadata=json.loads(diffusers_config_json(adapter)),
            _pipeline=pipe,
        )
    missing = sorted(set(adapter.layers) - _wrapped(model, name))
    if missing:
        raise UserError(
            f"--lora {path}{where}: {len(missing)} of {total} LoRA layers found no match in this model after "
            f"loading (e.g. {missing[:2]}); the adapter was trained for "
            f"{adapter.info.get('base_model', 'an unknown base')}"
        )
    say(
        f"--lora {path}{where}: {len(report.matched)}/{total} layers matched ({adapter.format} layout, rank "
        f"{'/'.join(map(str, adapter.ranks()))}), 0 missing, 0 unexpected, 0 shape mismatches"
    )


# --- inspect, merge into one LoRA, resize ----------------------------------------------------------------


def _block_relative(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[1].isdigit() else name


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """What a user wants to know before loading an adapter; the keys of `finetune inspect --json`."""
    file = adapter_file(path)
    adapter = read_adapter(file)
    info = adapter.info
    ranks, alphas = adapter.ranks(), adapter.alphas()
    # Wan 2.2 A14B: the low-noise expert's adapter sits beside the high-noise expert's.
    second = file.parent / TRANSFORMER_2_WEIGHTS_NAME
    low = read_adapter(second) if file.name == WEIGHTS_NAME and second.is_file() else None
    return {
        "path": str(adapter.path),
        "format": adapter.format,
        "family": info.get("family"),
        "base_model": info.get("base_model"),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "targets": sorted({_block_relative(n) for n in adapter.layers}),
        "layers": len(adapter.layers),
        "params": adapter.params,
        "file_size": adapter.file_size,
        "dtype": str(next(iter(adapter.layers.values())).down.dtype).removeprefix("torch."),
        "trigger": info.get("trigger") or None,
        "steps": info.get("steps"),
        "items": info.get("items"),
        "recipe_hash": info.get("recipe_hash"),
        "kit_version": info.get("kit_version"),
        "second_expert": None
        if low is None
        else f"{second.name}: {len(low.layers)} layers, {low.params:,} params",
    }


def _derived_info(adapter: Adapter, sources: list[dict[str, Any]], **changes: Any) -> str:
    info = {**adapter.info, **changes, "derived_from": sources, "kit_version": finetune.__version__}
    ranks, alphas = adapter.ranks(), adapter.alphas()
    info["rank"] = ranks[0] if len(ranks) == 1 else ranks
    info["alpha"] = alphas[0] if len(alphas) == 1 else alphas
    info["lora_layers"] = len(adapter.layers)
    return json.dumps(info, sort_keys=True)


def merge_into_lora(loras: list[tuple[str, float]], out: Path, rank: int | None = None) -> Path:
    """Several adapters at their scales -> one adapter in `out`: exact (ranks concatenated) without `rank`,
    else the weighted sum re-factored by SVD to `rank`, with the retained energy reported."""
    from finetune import lora_math

    if not loras:
        raise UserError("merge --into-lora: give at least one --lora PATH[:SCALE]")
    adapters = [read_adapter(adapter_file(p)) for p, _ in loras]
    families = {a.info.get("family") for a in adapters} - {None}
    if len(families) > 1:
        raise UserError(f"merge --into-lora: the adapters are for different families ({sorted(families)})")
    merged = lora_math.concat_merge(adapters, [s for _, s in loras])
    how = f"exact, rank {'/'.join(map(str, merged.ranks()))}"
    if rank is not None:
        result = lora_math.refactor(merged, rank)
        merged = result.adapter
        how = f"rank {rank} by SVD, {result.energy:.2%} of the energy retained"
    sources = [{"path": str(p), "scale": s} for p, s in loras]
    merged.info_json = _derived_info(merged, sources, merge=how)
    out = Path(out)
    with atomic_dir(out) as folder:
        write_diffusers(merged, folder / WEIGHTS_NAME)
    say(f"merged {len(loras)} adapter(s) into one LoRA at {out} ({how})")
    return out


def resize_adapter(path: str | Path, rank: int, out: Path) -> tuple[Path, float, dict[str, float]]:
    """An adapter re-factored to `rank` by SVD; returns (folder, overall energy kept, per-layer energy)."""
    from finetune import lora_math

    adapter = read_adapter(adapter_file(path))
    result = lora_math.refactor(adapter, rank)
    resized = result.adapter
    resized.info_json = _derived_info(
        resized, [{"path": str(path), "scale": 1.0}], resize=f"rank {rank}, energy {result.energy:.6f}"
    )
    out = Path(out)
    with atomic_dir(out) as folder:
        write_diffusers(resized, folder / WEIGHTS_NAME)
    worst = min(result.layer_energy.items(), key=lambda kv: kv[1])
    say(
        f"resized to rank {rank}: {result.energy:.2%} of the energy retained overall "
        f"(lowest layer: {worst[0]} {worst[1]:.2%})"
    )
    return out, result.energy, result.layer_energy
