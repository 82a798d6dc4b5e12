"""Each switch of the memory plan on a small real Wan transformer on the CPU, through memory.py's own code:
the exact ones (block swap, activation offload, pieces of recompute) give the plain path's loss and grads;
the lossy ones (fp8, nf4, int8) stay close and train."""

from __future__ import annotations

import pytest
import torch

from finetune.config import build_recipe
from finetune.errors import UserError
from finetune.memory import BlockSwapper, make_optimizer
from finetune.models import get_family
from tests.tiny import planned

CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
    text_dim=24, freq_dim=32, ffn_dim=40, num_layers=3, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)  # fmt: skip
CPU = torch.device("cpu")


def recipe(*overrides):
    tree = {"model": {"family": "wan", "path": "unused/unused"}, "data": {"path": "unused"}}
    return build_recipe(tree, ["lora.rank=4", "train.optimizer=adamw", *overrides])


def build(r):
    """The training path's order: plan, LoRA (B made non-zero so LoRA grads flow everywhere), finish."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**CONFIG)
    return transformer, *planned(transformer, r, get_family("wan"), CPU)


def loss_and_grads(transformer, params):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 6, CONFIG["text_dim"], generator=g)
    out = transformer(latents, torch.tensor([500.0]), text, return_dict=False)[0]
    loss = (out - latents).pow(2).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.item(), grads


@pytest.fixture(scope="module")
def plain():
    transformer, _, params, _ = build(recipe())
    return loss_and_grads(transformer, params)


@pytest.mark.parametrize(
    "overrides",
    [
        ["memory.blocks_to_swap=2"],
        ["memory.activation_offload=true"],
        ["memory.ffn_chunks=3"],
        ["memory.blocks_to_swap=3", "memory.activation_offload=true", "memory.ffn_chunks=2"],
    ],
    ids=["swap", "offload", "ffn-chunks", "all"],
)
def test_exact_switches_change_nothing_numerically(plain, overrides):
    transformer, plan, params, _ = build(recipe(*overrides))
    loss, grads = loss_and_grads(transformer, params)
    assert loss == pytest.approx(plain[0], rel=1e-5)
    torch.testing.assert_close(grads, plain[1], rtol=1e-4, atol=1e-7)
    if plan.swapper:  # forward and the backward recompute both brought each swapped block in
        assert plan.swapper.onloads == 2 * len(plan.swapper.swapped)


def test_block_swap_keeps_lora_weights_resident_and_frozen_weights_on_the_host():
    transformer, plan, _, _ = build(recipe("memory.blocks_to_swap=1"))
    swapped = transformer.blocks[2]
    frozen = [p for p in swapped.parameters() if not p.requires_grad]
    assert frozen
    # between forwards every frozen weight of a swapped block is its host tensor
    pairs = plan.swapper.host[2]
    assert len(pairs) == len(frozen) + len(list(swapped.buffers()))
    assert all(p.data.data_ptr() == h.data_ptr() for p, h in pairs)
    assert not any(p.requires_grad for p, _ in pairs)


def test_fp8_storage_trains_close_to_fp32(plain):
    transformer, _, params, _ = build(recipe("memory.base_dtype=fp8"))
    linear = transformer.blocks[0].ffn.net[2].base_layer
    assert linear.weight.dtype == torch.float8_e4m3fn
    assert all(p.dtype == torch.float32 for p in params)  # LoRA stays fp32
    loss, grads = loss_and_grads(transformer, params)
    assert loss == pytest.approx(plain[0], rel=5e-2)
    assert float((grads - plain[1]).norm() / plain[1].norm()) < 0.1


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bitsandbytes_base_on_the_cpu(plain, kind):
    bnb = pytest.importorskip("bitsandbytes")
    transformer, _, params, optimizer = build(recipe(f"memory.base_dtype={kind}"))
    layer_type = bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(transformer.blocks[1].attn1.to_q.base_layer, layer_type)
    loss, grads = loss_and_grads(transformer, params)
    assert loss == pytest.approx(plain[0], rel=0.1)
    assert float((grads - plain[1]).norm() / plain[1].norm()) < 0.3
    assert grads.abs().sum() > 0


def test_swap_needs_checkpointing_and_enough_blocks():
    with pytest.raises(UserError, match="gradient_checkpointing"):
        build(recipe("memory.blocks_to_swap=1", "train.gradient_checkpointing=false"))
    with pytest.raises(UserError, match="only 3 blocks"):
        build(recipe("memory.blocks_to_swap=4"))


def test_swapper_hooks_can_be_removed():
    transformer, plan, params, _ = build(recipe("memory.blocks_to_swap=1"))
    plan.swapper.remove()
    assert isinstance(plan.swapper, BlockSwapper)
    assert not transformer.blocks[2]._forward_pre_hooks


@pytest.mark.parametrize(
    "name,expected",
    [("adamw", "torch.optim.adamw.AdamW"), ("adamw8bit", "AdamW8bit"), ("paged_adamw8bit", "PagedAdamW8bit")],
)
def test_optimizer_choice(name, expected):
    pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.zeros(300))
    optimizer = make_optimizer(recipe(f"train.optimizer={name}"), [p])
    assert type(optimizer).__name__ == expected.rsplit(".", 1)[-1]
    p.grad = torch.ones(300)
    optimizer.step()
    assert torch.all(p < 0)  # one step against a positive gradient


def test_optimizer_falls_back_to_torchao_without_bitsandbytes(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    optimizer = make_optimizer(recipe("train.optimizer=adamw8bit"), [torch.nn.Parameter(torch.zeros(8))])
    try:
        import torchao.optim  # noqa: F401

        assert type(optimizer).__module__.startswith("torchao")
    except ImportError:
        assert type(optimizer) is torch.optim.AdamW


def test_the_cache_stage_keeps_only_the_vae_encoder():
    """drop_decoder removes the decoder half; encoding is unchanged (the cache never decodes)."""
    from diffusers import AutoencoderKLWan

    from finetune.memory import drop_decoder

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False]
    )
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.encode(video).latent_dist.mode()
        full = sum(p.numel() for p in vae.parameters())
        drop_decoder(vae)
        after = vae.encode(video).latent_dist.mode()
    assert vae.decoder is None and sum(p.numel() for p in vae.parameters()) < 0.6 * full
    assert torch.equal(before, after)
