"""LoRA-to-LoRA arithmetic against the full update matrices it stands for."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import UserError
from finetune.formats import Adapter, LoraLayer
from finetune.lora_math import concat_merge, delta, refactor


def _adapter(rank, alpha, seed, names=("blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj"), out=24, inp=16):
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        layers={
            n: LoraLayer(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), alpha)
            for n in names
        }
    )


def test_concat_merge_is_the_exact_weighted_sum():
    a, b = _adapter(4, 8.0, 0), _adapter(2, 1.0, 1)

    merged = concat_merge([a, b], [1.0, 0.5])

    for name, layer in merged.layers.items():
        assert layer.rank == 6 and layer.alpha == 6.0  # ranks add; scale 1
        expected = delta(a.layers[name]) + 0.5 * delta(b.layers[name])
        assert torch.allclose(delta(layer), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.down[:4], a.layers[name].down)  # A is kept as trained


def test_concat_merge_keeps_a_layer_only_one_adapter_has():
    a = _adapter(4, 4.0, 0, names=("blocks.0.attn1.to_q",))
    b = _adapter(4, 4.0, 1, names=("blocks.0.attn1.to_k",))

    merged = concat_merge([a, b], [0.6, 0.4])

    assert sorted(merged.layers) == ["blocks.0.attn1.to_k", "blocks.0.attn1.to_q"]
    assert torch.allclose(
        delta(merged.layers["blocks.0.attn1.to_k"]), 0.4 * delta(b.layers["blocks.0.attn1.to_k"])
    )


def test_concat_merge_of_adapters_for_different_shapes_is_an_error():
    with pytest.raises(UserError, match="different models"):
        concat_merge([_adapter(4, 4.0, 0), _adapter(4, 4.0, 1, out=32)], [1.0, 1.0])


def test_refactor_at_full_rank_is_exact_and_keeps_all_energy():
    a = _adapter(4, 8.0, 0)

    result = refactor(a, 4)

    assert result.energy == pytest.approx(1.0)
    for name, layer in result.adapter.layers.items():
        assert layer.rank == 4 and layer.alpha == 4.0
        assert torch.allclose(delta(layer), delta(a.layers[name]), rtol=1e-5, atol=1e-5)


def test_refactor_to_half_rank_keeps_the_energy_it_reports():
    a = _adapter(8, 8.0, 3)

    result = refactor(a, 4)

    kept_total, full_total = 0.0, 0.0
    for name, layer in a.layers.items():
        full, approx = delta(layer), delta(result.adapter.layers[name])
        s = torch.linalg.svdvals(full)
        energy = float((s[:4] ** 2).sum() / (s**2).sum())
        assert result.layer_energy[name] == pytest.approx(energy, rel=1e-9)
        # what the reported number means: the fraction of ||delta||^2 the rank-4 adapter reproduces
        residual = float(((full - approx) ** 2).sum() / (full**2).sum())
        assert 1 - residual == pytest.approx(energy, rel=1e-6)
        assert 0.5 < energy < 1.0  # random rank-8 factors: neither everything nor nothing
        kept_total += float((s[:4] ** 2).sum())
        full_total += float((s**2).sum())
    assert result.energy == pytest.approx(kept_total / full_total, rel=1e-9)


def test_refactor_beyond_the_true_rank_stops_at_it():
    result = refactor(_adapter(2, 2.0, 0), 8)
    assert {layer.rank for layer in result.adapter.layers.values()} == {2}
    assert result.energy == pytest.approx(1.0)


def test_refactor_rank_below_one_is_an_error():
    with pytest.raises(UserError):
        refactor(_adapter(2, 2.0, 0), 0)
