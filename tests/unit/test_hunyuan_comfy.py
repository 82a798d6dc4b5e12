"""HunyuanVideo's ComfyUI layout, where q, k, v (and a single-stream block's MLP input) are one fused layer.

The oracle is diffusers' own reader of that layout (lora_conversion_utils._convert_hunyuan_video_lora_to_diffusers,
which splits a fused LoRA back into the diffusers layers): every diffusers layer's update B @ A x alpha / rank
must come back exactly. It splits single-stream blocks at the real hidden size (3072), so the layers here have
the real output widths; their input width is small where nothing depends on it."""

from __future__ import annotations

import pytest
import torch

from finetune.comfy_names import hunyuan_to_comfy_layers
from finetune.formats import LoraLayer

HIDDEN, MLP = 3072, 4 * 3072
DUAL = {  # diffusers name inside transformer_blocks.N -> output rows
    **dict.fromkeys(["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj"], HIDDEN),
    **dict.fromkeys(
        ["attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2"], HIDDEN
    ),
    "ff.net.0.proj": MLP,
    "ff_context.net.0.proj": MLP,
    "norm1.linear": 6 * HIDDEN,
    "norm1_context.linear": 6 * HIDDEN,
}
SINGLE = {"attn.to_q": HIDDEN, "attn.to_k": HIDDEN, "attn.to_v": HIDDEN, "proj_mlp": MLP, "proj_out": HIDDEN,
          "norm.linear": 3 * HIDDEN}  # fmt: skip
# ComfyUI's HunyuanVideo weights (the Flux-style blocks of comfy/ldm/hunyuan_video) and the LoRA name comfy/lora.py
# maps onto each (its HunyuanVideo branch: `_attn.qkv.` -> `_attn_qkv.`, `_mod.lin.` -> `_mod.linear.`, ...).
COMFY_ACCEPTS = {
    "img_attn.qkv": "img_attn_qkv", "img_attn.proj": "img_attn_proj", "txt_attn.qkv": "txt_attn_qkv",
    "txt_attn.proj": "txt_attn_proj", "img_mlp.0": "img_mlp.fc1", "img_mlp.2": "img_mlp.fc2",
    "txt_mlp.0": "txt_mlp.fc1", "txt_mlp.2": "txt_mlp.fc2", "img_mod.lin": "img_mod.linear",
    "txt_mod.lin": "txt_mod.linear", "linear1": "linear1", "linear2": "linear2", "modulation.lin": "modulation.linear",
}  # fmt: skip


def lora(name: str, rows: int, rank: int = 2, alpha: float = 4.0, width: int = 8) -> LoraLayer:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return LoraLayer(torch.randn(rank, width, generator=g), torch.randn(rows, rank, generator=g), alpha)


def every_layer(block: int = 0) -> dict[str, LoraLayer]:
    layers = {
        f"transformer_blocks.{block}.{n}": lora(f"transformer_blocks.{block}.{n}", r) for n, r in DUAL.items()
    }
    for n, r in SINGLE.items():
        layers[f"single_transformer_blocks.{block}.{n}"] = lora(f"single_transformer_blocks.{block}.{n}", r)
    return layers


def read_back(comfy: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """What diffusers' reader makes of our ComfyUI layers: diffusers name -> B @ A x (fused alpha / fused rank)."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    tensors, scales = {}, {}
    for name, (down, up, alpha) in comfy.items():
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
        scales[name] = alpha / down.shape[0]
    back = _convert_hunyuan_video_lora_to_diffusers(tensors)
    deltas = {}
    for key in back:
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            deltas[name] = back[key.replace("lora_A", "lora_B")] @ back[key]
    return deltas, scales


def test_every_block_linear_comes_back_exactly_through_diffusers_reader():
    layers = every_layer(block=3)
    comfy = hunyuan_to_comfy_layers(layers)
    assert sorted(comfy) == sorted(
        [f"double_blocks.3.{n}" for n in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj",
                                          "img_mlp.fc1", "img_mlp.fc2", "txt_mlp.fc1", "txt_mlp.fc2",
                                          "img_mod.linear", "txt_mod.linear")]
        + [f"single_blocks.3.{n}" for n in ("linear1", "linear2", "modulation.linear")]
    )  # fmt: skip
    assert comfy["single_blocks.3.linear1"][0].shape == (4 * 2, 8)  # rank 4 x 2: q, k, v, MLP stacked
    assert comfy["single_blocks.3.linear1"][1].shape == (3 * HIDDEN + MLP, 8)
    assert all(alpha / down.shape[0] == 2.0 for down, _, alpha in comfy.values())  # the trained alpha / rank
    deltas, _ = read_back(comfy)
    assert sorted(deltas) == sorted(layers)
    for name, layer in layers.items():
        expected = layer.scale * layer.up @ layer.down
        assert torch.allclose(2.0 * deltas[name], expected, rtol=1e-5, atol=1e-4), name


def test_untrained_parts_are_zero_and_different_scales_are_folded_in():
    layers = {  # the real input width here: the rows of the untrained parts (k, v) are sized from it
        "single_transformer_blocks.0.attn.to_q": lora(
            "single_transformer_blocks.0.attn.to_q", HIDDEN, 2, 4.0, HIDDEN
        ),
        "single_transformer_blocks.0.proj_mlp": lora(
            "single_transformer_blocks.0.proj_mlp", MLP, 3, 3.0, HIDDEN
        ),
    }
    comfy = hunyuan_to_comfy_layers(layers)
    down, up, alpha = comfy["single_blocks.0.linear1"]
    assert up.shape == (3 * HIDDEN + MLP, 5) and alpha == 5.0  # scale 1: each part's own scale is in its rows
    assert not up[
        HIDDEN : 3 * HIDDEN
    ].any()  # k and v were not trained: zero rows, as ComfyUI needs all of them
    deltas, scales = read_back(comfy)
    for name, layer in layers.items():
        assert torch.allclose(scales["single_blocks.0.linear1"] * deltas[name], layer.scale * layer.up @ layer.down,
                              rtol=1e-5, atol=1e-4)  # fmt: skip
    assert not deltas["single_transformer_blocks.0.attn.to_k"].any()


def test_names_are_ones_comfyui_maps_onto_its_hunyuan_weights():
    accepted = {
        f"{kind}_blocks.0.{alias}" for kind in ("double", "single") for alias in COMFY_ACCEPTS.values()
    }
    assert set(hunyuan_to_comfy_layers(every_layer())) <= accepted


def test_a_layer_outside_the_blocks_is_refused():
    from finetune.errors import UserError

    with pytest.raises(UserError, match="context_embedder.proj_in"):
        hunyuan_to_comfy_layers({"context_embedder.proj_in": lora("transformer_blocks.0.attn.to_q", HIDDEN)})
