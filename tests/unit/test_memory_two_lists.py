"""Block swap over a model with two block lists (HunyuanVideo: dual-stream blocks, then single-stream ones), on
a tiny real HunyuanVideo transformer on the CPU through memory.py's own code (the hooks run, the "copies" are
host tensors), and the estimate's pricing of the swapped blocks of each list."""

from __future__ import annotations

import pytest
import torch

from finetune.config import build_recipe
from finetune.errors import UserError
from finetune.estimate import trace_training
from finetune.models import get_family
from finetune.tracing import keep_in_fp32
from tests.tiny import planned

# tests/hunyuan_tiny.py's transformer, with 2 dual-stream and 2 single-stream blocks: execution order
# transformer_blocks.0, .1, single_transformer_blocks.0, .1 = flat indices 0..3.
CONFIG = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=8, num_layers=2,
    num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1, guidance_embeds=True,
    text_embed_dim=16, pooled_projection_dim=12, rope_axes_dim=(2, 2, 4),
)  # fmt: skip
CPU = torch.device("cpu")


def recipe(*overrides):
    tree = {"model": {"family": "hunyuan", "path": "unused/unused"}, "data": {"path": "unused"}}
    return build_recipe(tree, ["lora.rank=4", "train.optimizer=adamw", *overrides])


def build(r, device=CPU):
    """The training path's order: plan, LoRA (B made non-zero so LoRA grads flow everywhere), finish."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(**CONFIG)
    return transformer, *planned(transformer, r, get_family("hunyuan"), device)


def train_step(transformer, params, optimizer):
    """One training step through the family's predict: (loss, LoRA grads, LoRA weights after the step)."""
    family = get_family("hunyuan")
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 2, 8, 8, generator=g)
    text = torch.randn(1, 6, CONFIG["text_embed_dim"], generator=g)
    extras = {"text_pooled": torch.randn(1, CONFIG["pooled_projection_dim"], generator=g)}
    out = family.predict(transformer, latents, torch.tensor([500.0]), text, extras)
    loss = (out - latents).pow(2).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grads, torch.cat([p.detach().flatten() for p in params])


def test_swap_across_both_lists_trains_exactly_as_without_and_prefetches_in_execution_order():
    transformer, _, params, optimizer = build(recipe())
    plain = train_step(transformer, params, optimizer)

    # 3 of 4 blocks: both single-stream blocks and the last dual-stream one.
    transformer, plan, params, optimizer = build(recipe("memory.blocks_to_swap=3"))
    swapper = plan.swapper
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert swapper.blocks == blocks and swapper.swapped == {1, 2, 3}
    assert transformer.single_transformer_blocks[0] is swapper.blocks[2]
    loss, grads, weights = train_step(transformer, params, optimizer)
    assert loss == pytest.approx(plain[0], rel=1e-5)
    torch.testing.assert_close(grads, plain[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(weights, plain[2], rtol=1e-5, atol=1e-7)
    # Forward brings in dual 1, single 0, single 1, each prefetched by the block before it (dual 1 -> single 0
    # crosses the lists); the backward recompute runs single 1, single 0, dual 1, each prefetched by the block
    # after it. Only the first block recomputed in backward had no copy in flight.
    assert list(swapper.recent) == [(1, True), (2, True), (3, True), (3, False), (2, True), (1, True)]
    assert swapper.onloads == 6 and not swapper.in_flight
    # Between steps every frozen weight of a swapped block is its host tensor again, of both lists.
    for i in (1, 2, 3):
        frozen = [p for p in blocks[i].parameters() if not p.requires_grad]
        assert len(swapper.host[i]) == len(frozen) + len(list(blocks[i].buffers()))
        assert all(p.data.data_ptr() == h.data_ptr() for p, h in swapper.host[i])


def test_placement_moves_everything_but_the_swapped_blocks_of_every_list():
    """finish()'s placement, on the meta device, where a move is visible on the CPU (BlockSwapper itself cannot
    run there): every weight outside the swapped blocks (embedders, refiner, norms, the resident dual block) is
    moved, the swapped blocks of both lists are left alone."""
    from diffusers import HunyuanVideoTransformer3DModel

    from finetune.memory import _place_except

    transformer = HunyuanVideoTransformer3DModel(**CONFIG)
    swapped_blocks = (transformer.transformer_blocks[1], *transformer.single_transformer_blocks)
    swapped = {id(t) for block in swapped_blocks for t in [*block.parameters(), *block.buffers()]}
    _place_except(transformer, {id(block) for block in swapped_blocks}, torch.device("meta"))
    tensors = list(transformer.named_parameters()) + list(transformer.named_buffers())
    assert 0 < len(swapped) < len(tensors)
    for name, t in tensors:
        assert t.device.type == ("cpu" if id(t) in swapped else "meta"), name


def test_swap_message_and_error_count_every_list(capsys):
    build(recipe("memory.blocks_to_swap=3"))
    assert (
        "memory: 3 of 4 blocks swapped from host memory (2 of single_transformer_blocks, 1 of transformer_blocks)"
        in capsys.readouterr().err
    )
    with pytest.raises(
        UserError, match=r"only 4 blocks \(2 transformer_blocks \+ 2 single_transformer_blocks\)"
    ):
        build(recipe("memory.blocks_to_swap=5"))


def test_estimate_prices_the_last_blocks_of_each_list_at_their_own_size():
    """4 dual + 3 single blocks (traced with 2 and 3 dual blocks and extended): swapping 4 blocks takes the 3
    single-stream blocks and 1 dual-stream block; the largest two of them (dual, single) stay resident."""
    from diffusers import HunyuanVideoTransformer3DModel

    config = dict(CONFIG, num_layers=4, num_single_layers=3)
    model = HunyuanVideoTransformer3DModel(**config).to(torch.bfloat16)
    keep_in_fp32(model)  # as the trace does

    def nbytes(block):
        return sum(p.numel() * p.element_size() for p in block.parameters())

    dual, single = nbytes(model.transformer_blocks[0]), nbytes(model.single_transformer_blocks[0])
    assert dual > single
    latent = (1, 16, 2, 8, 8)
    full = {"_class_name": "HunyuanVideoTransformer3DModel", **config}
    plain = trace_training(recipe("cache.max_sequence_length=6"), full, latent)
    for n, host, saving in [
        (2, 2 * single, 0),
        (4, dual + 3 * single, 2 * single),
        (6, 3 * dual + 3 * single, dual + 3 * single),
    ]:
        swap = trace_training(
            recipe("cache.max_sequence_length=6", f"memory.blocks_to_swap={n}"), full, latent
        )
        assert swap.swapped == host, n
        assert plain.peak - swap.peak == saving, n
        assert plain.at_peak["weights"] - swap.at_peak["weights"] == saving, n
