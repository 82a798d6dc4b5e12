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


class CachedItems(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], text_choice: TextChoice = TextChoice()):
        self.files = list(files)
        self.choice = text_choice
        self.loads = [0] * len(self.files)  # per index: how many times it was loaded (one pick per load)
        self.empty = load_file(str(text_choice.empty_text))["text"] if text_choice.dropout > 0 else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tensors = load_file(str(self.files[index]))
        extra = sorted((k for k in tensors if k.startswith("text.")), key=lambda k: int(k.split(".")[1]))
        variants = [tensors["text"]] + [tensors[k] for k in extra]
        # Seeded by (seed, index, load count): the same run picks the same captions, each epoch picks anew.
        rng = random.Random(f"{self.choice.seed}:{index}:{self.loads[index]}")
        self.loads[index] += 1
        text = variants[rng.randrange(len(variants))]
        if self.empty is not None and rng.random() < self.choice.dropout:
            text = self.empty
        return {"latents": tensors["latents"], "text": text}


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


def collate(items: list[dict[str, torch.Tensor]], text_length: int) -> dict[str, torch.Tensor]:
    """Stacks latents; zero-pads each caption's embeddings to `text_length` tokens, as the pipeline does."""
    text = torch.zeros(len(items), text_length, items[0]["text"].shape[-1], dtype=items[0]["text"].dtype)
    for row, item in enumerate(items):
        tokens = item["text"][:text_length]
        text[row, : len(tokens)] = tokens
    return {"latents": torch.stack([item["latents"] for item in items]), "text": text}
