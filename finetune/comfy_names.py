"""Module names of Wan, LTX-Video, CogVideoX and HunyuanVideo in ComfyUI's LoRA keys, and the diffusers names.

ComfyUI maps a LoRA key `diffusion_model.<name>` onto its model's weight `diffusion_model.<name>.weight` for
every model (comfy/lora.py, `model_lora_keys_unet`, the "generic lora format"); for LTXV it also takes the bare
`<name>`. It has no map from diffusers' `transformer.*` names for any of these three families (no `isinstance`
branch for WAN or CogVideoX, the LTXV one adds only the bare names, and comfy/lora_convert.py converts none of
them), so the keys must carry ComfyUI's module names, which are:

  Wan        (comfy/ldm/wan/model.py): the original Wan checkpoint's names (`blocks.N.self_attn.q`, ...).
  LTX-Video  (comfy/ldm/lightricks/model.py): the original LTX checkpoint's names. Inside `transformer_blocks.N`
             they equal diffusers' (attn1/attn2.to_q/k/v/to_out.0, ff.net.0.proj, ff.net.2); outside, diffusers
             renamed patchify_proj -> proj_in and adaln_single -> time_embed
             (diffusers' single_file_utils.convert_ltx_transformer_checkpoint_to_diffusers).
  CogVideoX  (comfy/ldm/cogvideo/model.py): ComfyUI's own port, `blocks.N.q/k/v/attn_out/ff_proj/ff_out`,
             `norm1.linear`, `time_embedding_linear_1`, ... (it loads checkpoints already in these names).
  HunyuanVideo  the original checkpoint's names with q/k/v fused (diffusion-pipe's format, which comfy/lora.py
             maps for HunyuanVideo): one ComfyUI layer may stand for several diffusers layers (see below).

Checked against ComfyUI's source (Comfy-Org/ComfyUI; files and commits in /work/notes/4.md) in
tests/unit/test_formats.py (Wan) and tests/unit/test_formats_families.py (LTX-Video, CogVideoX).
"""

from __future__ import annotations

import re
from functools import partial

import torch

# --- Wan: diffusers <-> the original checkpoint's (ComfyUI's) names ---------------------------------------
# Checked against diffusers' own converters (single_file_utils.convert_wan_transformer_to_diffusers and
# lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers) in tests/unit/test_formats.py.
WAN_BLOCK_NAMES = {  # original -> diffusers, inside `blocks.N.`
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
WAN_OTHER_NAMES = {  # original -> diffusers, outside the blocks
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def wan_to_original(name: str) -> str | None:
    """diffusers module name -> original Wan name, or None when there is none."""
    m = _BLOCK.fullmatch(name)
    if m:
        back = {v: k for k, v in WAN_BLOCK_NAMES.items()}.get(m[2])
        return f"blocks.{m[1]}.{back}" if back else None
    return {v: k for k, v in WAN_OTHER_NAMES.items()}.get(name)


def wan_to_diffusers(name: str) -> str | None:
    """Original Wan name -> diffusers module name, or None."""
    m = _BLOCK.fullmatch(name)
    if m:
        to = WAN_BLOCK_NAMES.get(m[2])
        return f"blocks.{m[1]}.{to}" if to else None
    return WAN_OTHER_NAMES.get(name)


# --- LTX-Video and CogVideoX: ComfyUI name -> diffusers name, inside a block and outside ------------------
LTX_BLOCK_NAMES = {
    n: n
    for n in (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    )
}
LTX_OTHER_NAMES = {
    "patchify_proj": "proj_in",
    "adaln_single.emb.timestep_embedder.linear_1": "time_embed.emb.timestep_embedder.linear_1",
    "adaln_single.emb.timestep_embedder.linear_2": "time_embed.emb.timestep_embedder.linear_2",
    "adaln_single.linear": "time_embed.linear",
    "caption_projection.linear_1": "caption_projection.linear_1",
    "caption_projection.linear_2": "caption_projection.linear_2",
    "proj_out": "proj_out",
}
COGVIDEOX_BLOCK_NAMES = {
    "q": "attn1.to_q",
    "k": "attn1.to_k",
    "v": "attn1.to_v",
    "attn_out": "attn1.to_out.0",
    "ff_proj": "ff.net.0.proj",
    "ff_out": "ff.net.2",
    "norm1.linear": "norm1.linear",  # the adaptive norms' timestep -> shift/scale/gate linears
    "norm2.linear": "norm2.linear",
}
COGVIDEOX_OTHER_NAMES = {
    "patch_embed.proj": "patch_embed.proj",  # a Linear on CogVideoX 1.5 (a Conv2d on 1.0: no LoRA there)
    "patch_embed.text_proj": "patch_embed.text_proj",
    "time_embedding_linear_1": "time_embedding.linear_1",
    "time_embedding_linear_2": "time_embedding.linear_2",
    "ofs_embedding_linear_1": "ofs_embedding.linear_1",  # CogVideoX 1.5 image-to-video only
    "ofs_embedding_linear_2": "ofs_embedding.linear_2",
    "norm_out.linear": "norm_out.linear",
    "proj_out": "proj_out",
}

# family -> (ComfyUI block prefix, diffusers block prefix, block names, other names)
FAMILY_MAPS = {
    "ltx": ("transformer_blocks", "transformer_blocks", LTX_BLOCK_NAMES, LTX_OTHER_NAMES),
    "cogvideox": ("blocks", "transformer_blocks", COGVIDEOX_BLOCK_NAMES, COGVIDEOX_OTHER_NAMES),
}


def to_diffusers(family: str, name: str) -> str | None:
    """ComfyUI module name -> diffusers module name for `family`, or None when it has none."""
    comfy_blocks, diffusers_blocks, block_names, other_names = FAMILY_MAPS[family]
    m = re.fullmatch(rf"{comfy_blocks}\.(\d+)\.(.+)", name)
    if m:
        to = block_names.get(m[2])
        return f"{diffusers_blocks}.{m[1]}.{to}" if to else None
    return other_names.get(name)


def to_comfy(family: str, name: str) -> str | None:
    """diffusers module name -> ComfyUI module name for `family`, or None."""
    comfy_blocks, diffusers_blocks, block_names, other_names = FAMILY_MAPS[family]
    m = re.fullmatch(rf"{diffusers_blocks}\.(\d+)\.(.+)", name)
    if m:
        back = {v: k for k, v in block_names.items()}.get(m[2])
        return f"{comfy_blocks}.{m[1]}.{back}" if back else None
    return {v: k for k, v in other_names.items()}.get(name)


# family -> (diffusers name -> ComfyUI name, ComfyUI name -> diffusers name); each returns None for no name.
COMFY_MAPS = {
    "wan": (wan_to_original, wan_to_diffusers),
    **{family: (partial(to_comfy, family), partial(to_diffusers, family)) for family in FAMILY_MAPS},
}


# --- HunyuanVideo: diffusers -> ComfyUI, where one ComfyUI layer may hold several diffusers layers -----------
# ComfyUI reads HunyuanVideo LoRAs in the original checkpoint's names (diffusion-pipe's format; comfy/lora.py,
# the HunyuanVideo branch of model_lora_keys_unet: `diffusion_model.double_blocks.N.img_attn_qkv`, ...). There
# q, k and v are one linear (`img_attn_qkv`, `txt_attn_qkv`), and a single-stream block's q, k, v and MLP input
# are one (`linear1`), where diffusers has a linear each. Names and row orders as diffusers' own converter reads
# them back (lora_conversion_utils._convert_hunyuan_video_lora_to_diffusers), checked in
# tests/integration/test_family_hunyuan.py. Only this direction exists: reading a fused file back would give
# each diffusers layer the whole fused rank.
HUNYUAN_DUAL_NAMES = {  # inside transformer_blocks.N -> inside double_blocks.N
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
}
HUNYUAN_SINGLE_NAMES = {"proj_out": "linear2", "norm.linear": "modulation.linear"}  # in single_..._blocks.N
HUNYUAN_DUAL_FUSED = {  # fused original layer -> its diffusers parts, in row order
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
HUNYUAN_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
HUNYUAN_MLP_RATIO = 4  # every HunyuanVideo checkpoint: proj_mlp has 4 x hidden rows (sizes a missing part)
_HUNYUAN_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def hunyuan_to_comfy_layers(layers: dict) -> dict[str, tuple]:
    """diffusers LoRA layers (name -> object with `down`, `up`, `alpha`) -> ComfyUI name -> (down, up, alpha).

    A fused layer gets one LoRA whose down matrix stacks the parts' (rank = the sum of theirs) and whose up matrix
    places each part's up block-diagonally at the part's rows, zero elsewhere: B @ A is then exactly the parts'
    B_i @ A_i stacked, and a part that was not trained contributes zero rows. ComfyUI scales by alpha / rank, so
    alpha is the parts' common scale times the fused rank; parts with different scales have theirs folded into
    their rows of B (alpha = rank)."""
    from finetune.errors import UserError

    groups: dict[str, dict[str, object]] = {}
    singles: dict[str, object] = {}
    for name, layer in layers.items():
        m = _HUNYUAN_BLOCK.fullmatch(name)
        dual = m is not None and m[1] == "transformer_blocks"
        names = HUNYUAN_DUAL_NAMES if dual else HUNYUAN_SINGLE_NAMES
        fused = HUNYUAN_DUAL_FUSED if dual else HUNYUAN_SINGLE_FUSED
        prefix = f"{'double' if dual else 'single'}_blocks.{m[2]}." if m else ""
        target = next((f for f, parts in fused.items() if m and m[3] in parts), None)
        if target:
            groups.setdefault(prefix + target, {})[m[3]] = layer
        elif m and m[3] in names:
            singles[prefix + names[m[3]]] = layer
        else:
            raise UserError(
                f"ComfyUI layout: layer '{name}' has no name in ComfyUI's hunyuan model; nothing was written"
            )
    out = {name: (x.down, x.up, x.alpha) for name, x in singles.items()}
    for target, present in groups.items():
        parts = (HUNYUAN_DUAL_FUSED | HUNYUAN_SINGLE_FUSED)[target.split(".")[-1]]
        some = next(iter(present.values()))
        hidden = some.down.shape[1]
        rows = [present[p].up.shape[0] if p in present else hidden * (HUNYUAN_MLP_RATIO if p == "proj_mlp" else 1)
                for p in parts]  # fmt: skip
        scales = {x.alpha / x.down.shape[0] for x in present.values()}
        down = torch.cat([present[p].down for p in parts if p in present])
        up = torch.zeros(sum(rows), down.shape[0], dtype=some.up.dtype)
        row, col = 0, 0
        for part, n in zip(parts, rows, strict=True):
            if part in present:
                x = present[part]
                block = x.up if len(scales) == 1 else x.up * (x.alpha / x.down.shape[0])
                up[row : row + n, col : col + x.down.shape[0]] = block
                col += x.down.shape[0]
            row += n
        out[target] = (down, up, (scales.pop() if len(scales) == 1 else 1.0) * down.shape[0])
    return dict(sorted(out.items()))


# Families whose ComfyUI names are not one per diffusers layer: the function that builds their ComfyUI layers.
COMFY_FUSED = {"hunyuan": hunyuan_to_comfy_layers}
