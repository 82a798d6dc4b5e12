"""Module names of Wan, LTX-Video and CogVideoX in ComfyUI's own models, and the diffusers names they stand for.

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

Checked against ComfyUI's source (Comfy-Org/ComfyUI; files and commits in /work/notes/4.md) in
tests/unit/test_formats.py (Wan) and tests/unit/test_formats_families.py (LTX-Video, CogVideoX).
"""

from __future__ import annotations

import re
from functools import partial

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
