"""Per-clip and per-caption tensors beyond latents/text (conditioning, pooled text) survive cache -> batch."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from finetune.data.batches import CachedItems, TextChoice, collate, text_tensors, video_tensors


def _shard(path, captions: int) -> None:
    video = video_tensors({"latents": torch.ones(1, 4, 2, 3, 3), "image_embeds": torch.full((1, 5, 8), 2.0)})
    variants = [{"text": torch.full((3 + n, 6), float(n + 1)), "text_pooled": torch.full((7,), n + 1.0)}
                for n in range(captions)]  # fmt: skip
    save_file(video | text_tensors(variants), str(path))


def test_shard_keys_name_variants_and_clip_tensors():
    tensors = text_tensors([{"text": torch.zeros(2, 3), "text_pooled": torch.zeros(4)}, torch.ones(5, 3)])
    assert sorted(tensors) == ["text", "text.1", "text_pooled"]
    assert video_tensors(torch.zeros(1, 4, 2, 3, 3))["latents"].shape == (4, 2, 3, 3)


def test_pooled_text_follows_the_chosen_caption(tmp_path):
    _shard(tmp_path / "a.safetensors", captions=3)
    items = CachedItems([tmp_path / "a.safetensors"])
    seen = set()
    for _ in range(30):
        item = items[0]
        variant = item["text"][0, 0].item()
        assert item["text_pooled"][0].item() == variant  # the pooled embedding of the same caption
        assert item["text"].shape[0] == 2 + int(variant)
        assert "text.1" not in item and "text_pooled.1" not in item
        seen.add(variant)
    assert seen == {1.0, 2.0, 3.0}


def test_dropout_replaces_every_text_tensor_and_collate_stacks_extras(tmp_path):
    _shard(tmp_path / "a.safetensors", captions=1)
    _shard(tmp_path / "b.safetensors", captions=1)
    empty = tmp_path / "empty.safetensors"
    save_file(
        text_tensors([{"text": torch.full((1, 6), -1.0), "text_pooled": torch.full((7,), -1.0)}]), str(empty)
    )
    items = CachedItems([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], TextChoice(1.0, empty))
    batch = collate([items[0], items[1]], text_length=10)
    assert (
        batch["text"].shape == (2, 10, 6)
        and (batch["text"][:, 0] == -1).all()
        and (batch["text"][:, 1:] == 0).all()
    )
    assert (batch["text_pooled"] == -1).all() and batch["text_pooled"].shape == (2, 7)
    assert batch["image_embeds"].shape == (2, 5, 8) and (batch["image_embeds"] == 2).all()
    assert batch["latents"].shape == (2, 4, 2, 3, 3)
