"""Batches from the cache: items grouped by latent shape (a batch must stack), order seeded and reproducible."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def latent_shape(path: Path) -> tuple[int, ...]:
    with safe_open(str(path), framework="pt") as f:  # reads the header only, not the tensor
        return tuple(f.get_slice("latents").get_shape())


@dataclass(frozen=True)
class TextChoice:
    """How a loaded item picks its text: one of its cached caption variants (`text`, `text.1`, ...) at random,
    replaced by the empty prompt's embedding with probability `dropout` (what classifier-free guidance needs)."""

    dropout: float = 0.0
    empty_text: Path | None = None  # cache.dir/empty_text-*.safetensors, written once by the cache stage
    seed: int = 0


def is_text_key(key: str) -> bool:
    """Text-side shard keys follow the caption variants: `text`, `text_pooled`, ... and `text.1`, `text_pooled.1`."""
    name = key.split(".")[0]
    return name == "text" or name.startswith("text_")


def text_tensors(encoded: list) -> dict[str, torch.Tensor]:
    """A family's encoded captions as shard keys. Each caption is one tensor (`text`) or a dict of tensors whose
    names start with `text` (e.g. HunyuanVideo's CLIP `text_pooled`); caption n > 0 is stored as `<name>.n`."""
    tensors = {}
    for n, variant in enumerate(encoded):
        for name, tensor in (variant if isinstance(variant, dict) else {"text": variant}).items():
            assert is_text_key(name), name
            tensors[name if n == 0 else f"{name}.{n}"] = tensor
    return tensors


def video_tensors(encoded) -> dict[str, torch.Tensor]:
    """A family's encoded clip (batch of 1) as shard keys: `latents`, plus any conditioning it caches with them
    (e.g. Wan I2V's image-encoder embeddings); a plain tensor is the latents."""
    parts = encoded if isinstance(encoded, dict) else {"latents": encoded}
    return {name: tensor[0] for name, tensor in parts.items()}


class CachedItems(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], text_choice: TextChoice = TextChoice()):
        self.files = list(files)
        self.choice = text_choice
        self.loads = [0] * len(self.files)  # per index: how many times it was loaded (one pick per load)
        self.empty = load_file(str(text_choice.empty_text)) if text_choice.dropout > 0 else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tensors = load_file(str(self.files[index]))
        variants = 1 + sum(1 for k in tensors if k.startswith("text."))
        # Seeded by (seed, index, load count): the same run picks the same captions, each epoch picks anew.
        rng = random.Random(f"{self.choice.seed}:{index}:{self.loads[index]}")
        self.loads[index] += 1
        pick = rng.randrange(variants)
        item = {k: v for k, v in tensors.items() if not is_text_key(k)}  # latents and clip-side conditioning
        item |= {k: v for k, v in tensors.items() if is_text_key(k) and "." not in k}
        if pick:
            item |= {
                k.split(".")[0]: v for k, v in tensors.items() if k.endswith(f".{pick}") and is_text_key(k)
            }
        if self.empty is not None and rng.random() < self.choice.dropout:
            item |= self.empty
        return item


def bucket_batches(files: list[Path], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of index batches. Each epoch shuffles within each shape bucket, cuts batches, and shuffles
    the batch order, so a clip bucket and an image bucket interleave instead of running one after the other."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for index, path in enumerate(files):
        buckets.setdefault(latent_shape(path), []).append(index)
    epoch = 0
    while True:
        rng = random.Random(seed * 100_003 + epoch)
        batches = []
        for shape in sorted(buckets):
            indices = buckets[shape][:]
            rng.shuffle(indices)
            batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        rng.shuffle(batches)
        yield from batches
        epoch += 1


def extras_of(batch: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    """What else a batch holds besides latents and text (conditioning, pooled text), on `device` in `dtype`:
    the `extras` argument of a family's predict."""
    return {k: v.to(device, dtype) for k, v in batch.items() if k not in ("latents", "text")}


def collate(items: list[dict[str, torch.Tensor]], text_length: int) -> dict[str, torch.Tensor]:
    """Zero-pads each caption's embeddings to `text_length` tokens, as the pipeline does; stacks the rest
    (latents, and any other tensors the family cached: those have one shape per bucket)."""
    text = torch.zeros(len(items), text_length, items[0]["text"].shape[-1], dtype=items[0]["text"].dtype)
    for row, item in enumerate(items):
        tokens = item["text"][:text_length]
        text[row, : len(tokens)] = tokens
    others = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "text"}
    return others | {"text": text}
