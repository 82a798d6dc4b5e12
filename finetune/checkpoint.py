"""Checkpoints: the whole training state, so that a run stopped at step k goes on as if it never stopped.

    checkpoints/step-N/
        pytorch_lora_weights.safetensors, README.md, recipe.yaml   the adapter, usable as is (train.write_adapter)
        training_state.safetensors   optimizer tensors and RNG states (uint8 tensors), safetensors like all weights
        training_state.json          step, data position, loss history, optimizer/scheduler scalars, python RNG

A `step-N` folder is written to a temp folder and renamed (finetune.io.atomic_dir), and old ones are renamed away
before they are deleted, so a folder named `step-N` is always complete, whenever the process dies.

The LoRA weights are restored from the adapter file itself (fp32, bit for bit), so they are not stored twice.
The noise and sigmas of batch i come from generators seeded by (seed, i) (see `batch_generator`), so the data
position alone restores them, whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune.data.batches import bucket_batches
from finetune.errors import UserError
from finetune.formats import TRANSFORMER_2_WEIGHTS_NAME
from finetune.io import atomic_dir
from finetune.lora import WEIGHTS_NAME

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")

# A change to one of these makes the saved adapter and optimizer state meaningless for the new recipe.
INCOMPATIBLE = {
    "model.family": "the adapter belongs to the model it was trained on",
    "model.path": "the adapter belongs to the model it was trained on",
    "model.base": "the adapter belongs to the model it was trained on",
    "lora.rank": "the saved LoRA weights have another shape",
    "lora.alpha": "the saved LoRA weights were trained at another scale",
    "lora.targets": "the saved LoRA weights sit on other layers",
    "lora.experts": "the saved LoRA weights and step count belong to other experts",
    "data.width": "the model learnt at another size",
    "data.height": "the model learnt at another size",
    "data.frames": "the model learnt at another length",
    "train.optimizer": "the saved optimizer state belongs to another optimizer",
    "train.validation.holdout": "held-out items would be trained on, or trained items validated on",
}


# --- random state -------------------------------------------------------------------------------------------


def batch_generator(seed: int, batch_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for the noise and sigmas of batch `batch_index` (counted over the whole run).

    A function of (seed, index) rather than one long stream: a resumed run needs only the data position to draw
    the same noise, and 2 processes with grad_accum 1 draw what 1 process with grad_accum 2 draws."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + batch_index) % 2**63)


def capture_rng() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch, every CUDA device): LoRA dropout and any library that draws."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _rng_to_saveable(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "cuda_devices": len(state.get("cuda", [])),
    }
    tensors = {"rng.torch": state["torch"]}
    tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(state.get("cuda", []))})
    return plain, tensors


def _rng_from_saved(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    version, internal, gauss = plain["python"]
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    return {
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch": tensors["rng.torch"],
        "cuda": [tensors[f"rng.cuda.{i}"] for i in range(plain["cuda_devices"])],
    }


# --- optimizer state: tensors to safetensors, the rest to JSON ----------------------------------------------


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        per_param[str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                key = f"optimizer.{pid}.{name}"
                tensors[key] = value
                per_param[str(pid)][name] = {"tensor": key}
            else:
                per_param[str(pid)][name] = {"value": value}
    return {"state": per_param, "param_groups": state_dict["param_groups"]}, tensors


def _join_optimizer(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = {
        int(pid): {n: tensors[v["tensor"]] if "tensor" in v else v["value"] for n, v in entries.items()}
        for pid, entries in plain["state"].items()
    }
    groups = [dict(g) for g in plain["param_groups"]]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


# --- the data position ---------------------------------------------------------------------------------------


def data_signature(files: list[Path], batch_size: int, seed: int) -> str:
    """What the batch stream depends on. Cache file names are content hashes of (clip, caption, settings)."""
    blob = json.dumps([[Path(f).name for f in files], batch_size, seed])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def batch_stream(files: list[Path], batch_size: int, seed: int, start: int) -> Iterator[list[int]]:
    """The seeded endless stream of index batches (bucket_batches), fast-forwarded past `start` batches.
    Fast-forwarding walks index lists only (no data is read): ~1 s per million batches."""
    return itertools.islice(bucket_batches(files, batch_size, seed), start, None)


# --- writing -------------------------------------------------------------------------------------------------


def state_bytes(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Size of one checkpoint: the adapter, the optimizer tensors (before the first step: AdamW's two
    moments assumed), and ~1 MB for RNG states, card, recipe and loss history."""
    lora = sum(p.numel() * p.element_size() for p in params)
    moments = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    return lora + (moments or 2 * lora) + 2**20


def check_disk_space(folder: Path, needed: int) -> None:
    """Twice the checkpoint size must be free: the new folder is complete before the oldest is removed."""
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < 2 * needed:
        raise UserError(
            f"output.dir {folder}: only {free / 2**20:,.0f} MiB free on its disk, and a checkpoint needs "
            f"~{needed / 2**20:,.0f} MiB (twice that while the next one is written); free some space, point "
            "output.dir at another disk, or lower output.keep_last"
        )


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temp and half-deleted folders start with a dot)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def write_checkpoint(
    root: Path,
    step: int,
    write_adapter: Callable[[Path, int], Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: dict[str, Any],
    progress: dict[str, Any],
    keep_last: int,
    needed_bytes: int,
) -> Path:
    """Writes `root/step-<step>` whole (or not at all), then removes all but the newest `keep_last`."""
    root = Path(root)
    _remove_leftovers(root)
    check_disk_space(root, needed_bytes)
    optimizer_plain, tensors = _split_optimizer(optimizer.state_dict())
    rng_plain, rng_tensors = _rng_to_saveable(rng)
    tensors.update(rng_tensors)
    plain = {
        "version": STATE_VERSION,
        "step": step,
        "progress": progress,
        "optimizer": optimizer_plain,
        "scheduler": scheduler.state_dict(),
        "rng": rng_plain,
    }
    target = root / f"step-{step}"
    with atomic_dir(target) as folder:
        write_adapter(folder, step)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
        # The JSON goes last: its presence is what `load_checkpoint` checks first.
        (folder / STATE_JSON).write_text(json.dumps(plain, indent=1))
    if keep_last:
        for _, old in checkpoint_dirs(root)[:-keep_last]:
            _delete(old)
    return target


def _delete(folder: Path) -> None:
    # Rename first (atomic), then delete: a kill during rmtree leaves a dot-folder, never a half `step-N`.
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temp and half-deleted folders from a run that was killed (one writer per output.dir)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    folder: Path
    step: int
    progress: dict[str, Any]
    recipe: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    lora: dict[str, torch.Tensor]


def find_checkpoint(resume: str, out_dir: Path) -> Path:
    if resume == "latest":
        found = checkpoint_dirs(Path(out_dir) / "checkpoints")
        if not found:
            raise UserError(
                f"train.resume=latest: no checkpoint under {Path(out_dir) / 'checkpoints'} (is output.dir the "
                "same as in the run you want to continue? or remove train.resume to start fresh)"
            )
        return found[-1][1]
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise UserError(f"train.resume: {path} is not a folder (give latest or a checkpoints/step-N folder)")
    return path


def load_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    # The trained expert's adapter: Wan 2.2 A14B's low-noise expert writes the transformer_2 file (experts.py).
    low = (folder / STATE_JSON).is_file() and json.loads((folder / STATE_JSON).read_text()).get(
        "progress", {}
    ).get("expert") == "low"
    weights = TRANSFORMER_2_WEIGHTS_NAME if low else WEIGHTS_NAME
    missing = [n for n in (STATE_JSON, STATE_TENSORS, weights, "recipe.yaml") if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"train.resume: {folder} is not a training checkpoint (no {', '.join(missing)}); give latest or a "
            "checkpoints/step-N folder (a final adapter folder has no optimizer state to continue from)"
        )
    plain = json.loads((folder / STATE_JSON).read_text())
    if plain.get("version") != STATE_VERSION:
        raise UserError(
            f"train.resume: {folder} was written by another checkpoint version ({plain.get('version')})"
        )
    tensors = load_file(str(folder / STATE_TENSORS))
    return Checkpoint(
        folder=folder,
        step=plain["step"],
        progress=plain["progress"],
        recipe=yaml.safe_load((folder / "recipe.yaml").read_text()),
        optimizer=_join_optimizer(plain["optimizer"], tensors),
        scheduler=plain["scheduler"],
        rng=_rng_from_saved(plain["rng"], tensors),
        lora=load_file(str(folder / weights)),
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_compatible(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> list[str]:
    """Refuses a resume whose recipe changed what the saved state means; returns notes for harmless changes
    (steps, save_every, validation, schedule length, lr, ...), which take their new values from here on."""
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k] and k != "train.resume")
    refused = [
        f"{k} was {old[k]!r}, now {new[k]!r} ({INCOMPATIBLE[k]})" for k in changed if k in INCOMPATIBLE
    ]
    if refused:
        raise UserError(
            f"train.resume: cannot continue {folder} with this recipe: {'; '.join(refused)}. Set it back, or "
            "start a new run in another output.dir"
        )
    return [f"note: resuming with a changed recipe: {k} {old[k]!r} -> {new[k]!r}" for k in changed]


def restore_lora(transformer: torch.nn.Module, saved: dict[str, torch.Tensor], folder: Path) -> None:
    """Copies the adapter file's tensors into the trainable LoRA parameters, strictly: every parameter must
    find its tensor, of the same shape, and no tensor may be left over."""
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    keys = {n: "transformer." + n.replace(".default.", ".") for n in params}
    missing = [k for k in keys.values() if k not in saved]
    extra = sorted(set(saved) - set(keys.values()))
    wrong = [k for n, k in keys.items() if k in saved and saved[k].shape != params[n].shape]
    if missing or extra or wrong:
        raise UserError(
            f"train.resume: {folder / WEIGHTS_NAME} does not fit this model's LoRA layers ({len(missing)} "
            f"missing, {len(extra)} unexpected, {len(wrong)} of another shape, e.g. {(missing + extra + wrong)[:2]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[keys[name]])


def restore_schedule(
    checkpoint: Checkpoint,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    lr: float,
) -> None:
    """Optimizer moments and the schedule's position. A changed train.lr applies from the resumed step on (the
    LambdaLR multiplies base_lrs, which the saved state would otherwise bring back)."""
    optimizer.load_state_dict(checkpoint.optimizer)
    scheduler.load_state_dict(checkpoint.scheduler)
    if any(base != lr for base in scheduler.base_lrs):
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    # Recompute the current lr from the (possibly new) schedule: the lambda reads the current recipe.
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, factors, strict=True):
        group["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
