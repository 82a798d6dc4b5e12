"""Batches from cached latents: one shape per batch, every item once per epoch, seeded order, padded text."""

from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.data.batches import CachedItems, bucket_batches, collate, latent_shape

CLIP = (16, 3, 4, 6)  # channels, latent frames, height, width
IMAGE = (16, 1, 6, 4)


def _write_cache(folder: Path, shapes: list[tuple[int, ...]]) -> list[Path]:
    files = []
    for i, shape in enumerate(shapes):
        path = folder / f"item-{i:03d}.safetensors"
        save_file(
            {"latents": torch.full(shape, float(i)), "text": torch.full((3 + i % 4, 8), float(i))},
            str(path),
        )
        files.append(path)
    return files


@pytest.fixture
def mixed(tmp_path):
    """7 clips and 5 images, interleaved on disk."""
    shapes = [CLIP if i in {0, 2, 3, 5, 7, 8, 10} else IMAGE for i in range(12)]
    return _write_cache(tmp_path, shapes), shapes


def _epoch_length(shapes, batch_size):
    sizes = [shapes.count(s) for s in set(shapes)]
    return sum(-(-n // batch_size) for n in sizes)


def test_latent_shape_reads_the_header(tmp_path):
    (path,) = _write_cache(tmp_path, [CLIP])

    assert latent_shape(path) == CLIP


def test_cached_items_loads_each_file(tmp_path):
    files = _write_cache(tmp_path, [CLIP, IMAGE])
    items = CachedItems(files)

    assert len(items) == 2
    assert items[1]["latents"].shape == IMAGE
    assert torch.equal(items[1]["latents"], torch.full(IMAGE, 1.0))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_every_batch_has_one_shape_and_epoch_covers_each_item_once(mixed, batch_size):
    files, shapes = mixed
    n = _epoch_length(shapes, batch_size)

    epoch = list(islice(bucket_batches(files, batch_size, seed=0), n))

    assert all(1 <= len(b) <= batch_size for b in epoch)
    assert all(len({shapes[i] for i in b}) == 1 for b in epoch)
    assert sorted(i for b in epoch for i in b) == list(range(len(files)))
    # at most one short batch per shape bucket
    assert sum(len(b) < batch_size for b in epoch) <= 2


def test_the_stream_is_endless_and_every_epoch_covers_all(mixed):
    files, shapes = mixed
    n = _epoch_length(shapes, 2)

    stream = list(islice(bucket_batches(files, 2, seed=3), 3 * n))

    for e in range(3):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(i for b in epoch for i in b) == list(range(len(files)))
    assert stream[:n] != stream[n : 2 * n]  # each epoch reshuffles


def test_same_seed_same_order_different_seed_different_order(mixed):
    files, shapes = mixed
    n = 2 * _epoch_length(shapes, 2)

    a = list(islice(bucket_batches(files, 2, seed=5), n))
    b = list(islice(bucket_batches(files, 2, seed=5), n))
    c = list(islice(bucket_batches(files, 2, seed=6), n))

    assert a == b
    assert a != c


def test_buckets_interleave_rather_than_run_in_shape_order(tmp_path):
    shapes = [CLIP] * 20 + [IMAGE] * 20
    files = _write_cache(tmp_path, shapes)

    epoch = list(islice(bucket_batches(files, 1, seed=0), 40))

    kinds = [shapes[b[0]] for b in epoch]
    switches = sum(a != b for a, b in zip(kinds, kinds[1:], strict=False))
    assert switches > 5  # sorted by bucket would switch exactly once


def test_collate_stacks_latents_and_pads_or_truncates_text():
    items = [
        {"latents": torch.full(CLIP, 1.0), "text": torch.full((3, 8), 1.0, dtype=torch.bfloat16)},
        {"latents": torch.full(CLIP, 2.0), "text": torch.full((7, 8), 2.0, dtype=torch.bfloat16)},
    ]

    batch = collate(items, text_length=5)

    assert batch["latents"].shape == (2, *CLIP)
    assert torch.equal(batch["latents"][1], torch.full(CLIP, 2.0))
    text = batch["text"]
    assert text.shape == (2, 5, 8) and text.dtype == torch.bfloat16
    assert torch.equal(text[0, :3], torch.ones(3, 8, dtype=torch.bfloat16))
    assert torch.count_nonzero(text[0, 3:]) == 0  # zero padding after the caption's tokens
    assert torch.equal(text[1], torch.full((5, 8), 2.0, dtype=torch.bfloat16))  # 7 tokens cut to 5


def test_collate_of_files_from_the_cache(tmp_path):
    files = _write_cache(tmp_path, [IMAGE, IMAGE])
    items = CachedItems(files)

    batch = collate([items[0], items[1]], text_length=6)

    assert batch["text"].shape == (2, 6, 8)
    assert torch.equal(batch["text"][1, :4], torch.ones(4, 8))  # item 1 has 3 + 1 tokens of value 1
    assert torch.count_nonzero(batch["text"][1, 4:]) == 0
