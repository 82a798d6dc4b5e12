"""The ComfyUI layout of LTX-Video and CogVideoX checked against ComfyUI's own key map, re-implemented here as
data from its source (ComfyUI is not installed; the files read are named in /work/notes/4.md):

- comfy/lora.py `model_lora_keys_unet` (Comfy-Org/ComfyUI @ ec93dcacb96b): for every weight `k` of the model's
  state dict that starts with `diffusion_model.` and ends with `.weight`, the LoRA names `lora_unet_<k's middle
  with dots as underscores>` and `<k without .weight>` map to `k`; the LTXV/LTXAV branch adds the bare middle.
  No branch maps diffusers' `transformer.*` names for LTXV or CogVideoX (comfy/lora_convert.py neither).
- comfy/lora.py `load_lora` reads `<name>.alpha`; comfy/weight_adapter/lora.py reads `<name>.lora_B.weight` /
  `<name>.lora_A.weight`.
- the model's state-dict names: comfy/ldm/lightricks/model.py (LTXV: the original LTX checkpoint's names) and
  comfy/ldm/cogvideo/model.py (CogVideoX: ComfyUI's own port).

For each family: every key we write is one ComfyUI maps, onto the weight of the module the layer belongs to; the
round trip diffusers -> comfy -> diffusers is identical; an unmappable key is an error naming it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.errors import UserError
from finetune.formats import Adapter, LoraLayer, comfy_state_dict, convert, read_adapter, write_diffusers
from tests.family_tiny import tiny_cogvideox_transformer, tiny_ltx_transformer

LTX_LAYERS, COG_LAYERS = 2, 2


def comfy_lora_key_map(model_weight_keys: list[str], family: str) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_unet` for these models (see the module docstring): LoRA name -> weight key."""
    key_map = {}
    for k in model_weight_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            middle = k[len("diffusion_model.") : -len(".weight")]
            key_map["lora_unet_" + middle.replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k  # "generic lora format without any weird key names"
            if family == "ltx":
                key_map[middle] = k
    return key_map


def comfy_targets(written: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, str]:
    """Each written key -> the ComfyUI weight it patches (load_lora's suffixes); fails on a key ComfyUI drops."""
    targets = {}
    for key in written:
        suffix = next(s for s in (".lora_A.weight", ".lora_B.weight", ".alpha") if key.endswith(s))
        name = key[: -len(suffix)]
        assert name in key_map, f"ComfyUI would not load {key} ('lora key not loaded')"
        targets[key] = key_map[name]
    return targets


# --- ComfyUI's models' weights, for the tiny models of tests/family_tiny.py ----------------------------------


def ltx_comfy_weights(layers: int) -> list[str]:
    """LTXVModel's Linear weights (comfy/ldm/lightricks/model.py): patchify_proj, adaln_single (an
    AdaLayerNormSingle: emb.timestep_embedder.linear_1/2 and linear), caption_projection.linear_1/2, per block
    attn1/attn2 (CrossAttention: to_q, to_k, to_v, to_out.0) and ff (FeedForward: net.0.proj, net.2), proj_out."""
    names = ["patchify_proj", "adaln_single.emb.timestep_embedder.linear_1"]
    names += ["adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear"]
    names += ["caption_projection.linear_1", "caption_projection.linear_2", "proj_out"]
    for i in range(layers):
        for attn in ("attn1", "attn2"):
            names += [f"transformer_blocks.{i}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"transformer_blocks.{i}.ff.net.0.proj", f"transformer_blocks.{i}.ff.net.2"]
    return [f"diffusion_model.{n}.weight" for n in names]


# CogVideoXTransformer3DModel / CogVideoXBlock (comfy/ldm/cogvideo/model.py): which of ComfyUI's modules does
# the work of which diffusers module (read from the forward passes), and its Linear's (out, in) from ComfyUI's
# constructor, for dim = heads * head_dim, time_embed_dim, text_embed_dim, patch p, out_channels.
COG_BLOCK = {  # diffusers (inside transformer_blocks.N) -> ComfyUI (inside blocks.N), (out, in)
    "attn1.to_q": ("q", lambda c: (c["dim"], c["dim"])),
    "attn1.to_k": ("k", lambda c: (c["dim"], c["dim"])),
    "attn1.to_v": ("v", lambda c: (c["dim"], c["dim"])),
    "attn1.to_out.0": ("attn_out", lambda c: (c["dim"], c["dim"])),
    "ff.net.0.proj": ("ff_proj", lambda c: (4 * c["dim"], c["dim"])),
    "ff.net.2": ("ff_out", lambda c: (c["dim"], 4 * c["dim"])),
    "norm1.linear": ("norm1.linear", lambda c: (6 * c["dim"], c["time"])),  # CogVideoXLayerNormZero
    "norm2.linear": ("norm2.linear", lambda c: (6 * c["dim"], c["time"])),
}
COG_OTHER = {
    "patch_embed.text_proj": ("patch_embed.text_proj", lambda c: (c["dim"], c["text"])),
    "time_embedding.linear_1": ("time_embedding_linear_1", lambda c: (c["time"], c["dim"])),
    "time_embedding.linear_2": ("time_embedding_linear_2", lambda c: (c["time"], c["time"])),
    "norm_out.linear": ("norm_out.linear", lambda c: (2 * c["dim"], c["time"])),  # CogVideoXAdaLayerNorm
    "proj_out": ("proj_out", lambda c: (c["p"] * c["p"] * c["out"], c["dim"])),
}


def cog_comfy_weights(layers: int, config: dict) -> dict[str, tuple[str, tuple[int, int]]]:
    """diffusers module name -> (ComfyUI weight key, its (out, in))."""
    out = {d: (f"diffusion_model.{c}.weight", shape(config)) for d, (c, shape) in COG_OTHER.items()}
    for i in range(layers):
        for d, (c, shape) in COG_BLOCK.items():
            out[f"transformer_blocks.{i}.{d}"] = (f"diffusion_model.blocks.{i}.{c}.weight", shape(config))
    return out


# --- tiny models and adapters on every Linear ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ltx_model():
    return tiny_ltx_transformer(LTX_LAYERS)


COG_CONFIG = {"dim": 32, "time": 8, "text": 24, "p": 2, "out": 4}


@pytest.fixture(scope="module")
def cog_model():
    return tiny_cogvideox_transformer(COG_LAYERS)


def linears(model) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if type(m) is torch.nn.Linear}


def adapter_on(shapes: dict[str, tuple[int, int]], family: str, rank=3, alpha=6.0, seed=0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        n: LoraLayer(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha + k)
        for k, (n, (o, i)) in enumerate(sorted(shapes.items()))
    }  # a different alpha per layer, so a mixed-up layer would show
    return Adapter(layers=layers, info_json=json.dumps({"family": family, "base_model": "o/base"}))


def _file(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


# --- every key we write is one ComfyUI maps, onto the right module -------------------------------------------


def test_ltx_comfy_weights_are_the_checkpoint_names_diffusers_converts_to_the_tiny_model(ltx_model):
    # ComfyUI's LTXV loads the original LTX checkpoint, whose names diffusers converts to its own: so the names
    # above are checked by diffusers' converter landing exactly on the tiny model's Linear weights.
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

    ours = ltx_comfy_weights(LTX_LAYERS)
    converted = convert_ltx_transformer_checkpoint_to_diffusers({f"model.{k}": torch.zeros(1) for k in ours})
    assert sorted(converted) == sorted(f"{n}.weight" for n in linears(ltx_model))


def test_ltx_every_written_key_is_mapped_by_comfyui_onto_its_module(ltx_model):
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

    shapes = linears(ltx_model)
    adapter = adapter_on(shapes, "ltx")
    written = comfy_state_dict(adapter)
    targets = comfy_targets(written, comfy_lora_key_map(ltx_comfy_weights(LTX_LAYERS), "ltx"))

    assert len(written) == 3 * len(shapes) == 3 * 27
    for name, layer in adapter.layers.items():
        target = targets[f"diffusion_model.{_comfy(written, layer)}.lora_A.weight"]
        # the ComfyUI weight it patches is the one diffusers' converter calls `name`
        back = convert_ltx_transformer_checkpoint_to_diffusers({f"model.{target}": torch.zeros(1)})
        assert list(back) == [f"{name}.weight"]
    assert targets["diffusion_model.patchify_proj.lora_B.weight"] == "diffusion_model.patchify_proj.weight"
    assert "diffusion_model.adaln_single.linear.alpha" in written
    assert "diffusion_model.transformer_blocks.1.attn2.to_out.0.lora_A.weight" in written


def test_cog_every_written_key_is_mapped_by_comfyui_onto_its_module(cog_model):
    shapes = linears(cog_model)
    comfy_weights = cog_comfy_weights(COG_LAYERS, COG_CONFIG)
    # ComfyUI's constructor shapes agree with the tiny model's: the table is about this model
    assert sorted(shapes) == sorted(comfy_weights)
    assert all(shapes[n] == comfy_weights[n][1] for n in shapes)
    adapter = adapter_on(shapes, "cogvideox")
    written = comfy_state_dict(adapter)
    key_map = comfy_lora_key_map([k for k, _ in comfy_weights.values()], "cogvideox")
    targets = comfy_targets(written, key_map)

    assert len(written) == 3 * len(shapes) == 3 * 21
    for name, layer in adapter.layers.items():
        weight_key, (out_features, in_features) = comfy_weights[name]
        prefix = f"diffusion_model.{_comfy(written, layer)}"
        assert targets[f"{prefix}.lora_A.weight"] == targets[f"{prefix}.lora_B.weight"] == weight_key
        assert targets[f"{prefix}.alpha"] == weight_key
        assert torch.equal(written[f"{prefix}.lora_A.weight"], layer.down)  # (rank, in): ComfyUI's down
        assert written[f"{prefix}.lora_B.weight"].shape == (out_features, layer.rank)
        assert layer.down.shape[1] == in_features
        assert written[f"{prefix}.alpha"].item() == layer.alpha
    assert "diffusion_model.blocks.1.attn_out.lora_A.weight" in written
    assert "diffusion_model.time_embedding_linear_1.alpha" in written


def _comfy(written: dict[str, torch.Tensor], layer: LoraLayer) -> str:
    """The ComfyUI module name a layer was written under, found by its A tensor (written as is, no copy), so the
    test does not use the kit's own name map to find it."""
    keys = [k for k in written if k.endswith(".lora_A.weight") and written[k] is layer.down]
    assert len(keys) == 1
    return keys[0][len("diffusion_model.") : -len(".lora_A.weight")]


# --- round trip, reading ComfyUI files, and what cannot be mapped -------------------------------------------


@pytest.mark.parametrize("family", ["ltx", "cogvideox"])
def test_diffusers_to_comfy_to_diffusers_is_identical(family, ltx_model, cog_model, tmp_path):
    model = ltx_model if family == "ltx" else cog_model
    source = write_diffusers(adapter_on(linears(model), family), tmp_path / "a.safetensors")

    comfy = convert(source, "comfy", tmp_path / "c.safetensors")
    back = convert(comfy, "diffusers", tmp_path / "b.safetensors")

    tensors, meta = _file(back)
    original, original_meta = _file(source)
    assert meta == original_meta and sorted(tensors) == sorted(original)
    assert all(
        torch.equal(tensors[k], original[k]) and tensors[k].dtype == original[k].dtype for k in tensors
    )


@pytest.mark.parametrize("family", ["ltx", "cogvideox"])
def test_a_comfyui_file_without_our_metadata_reads_as_its_family(family, ltx_model, cog_model, tmp_path):
    model = ltx_model if family == "ltx" else cog_model
    adapter = adapter_on(linears(model), family)
    save_file(comfy_state_dict(adapter), str(tmp_path / "theirs.safetensors"))  # no header: a foreign file

    read = read_adapter(tmp_path / "theirs.safetensors")

    assert read.format == "comfy" and read.extra["family"] == family and read.info == {}
    assert sorted(read.layers) == sorted(adapter.layers)
    for name, layer in adapter.layers.items():
        assert torch.equal(read.layers[name].up, layer.up) and read.layers[name].alpha == layer.alpha
    # and written back to ComfyUI's names without being told the family
    assert sorted(comfy_state_dict(read)) == sorted(comfy_state_dict(adapter))


@pytest.mark.parametrize(
    "bad_key",
    [
        "diffusion_model.transformer_blocks.0.attn1.q_norm.lora_A.weight",  # LTX: an RMSNorm, no Linear
        "diffusion_model.transformer_blocks.0.scale_shift_table.lora_A.weight",
        "diffusion_model.blocks.0.norm_q.lora_A.weight",  # CogVideoX: a LayerNorm
        "diffusion_model.blocks.0.attn_out.dora_scale",
    ],
)
def test_a_key_that_cannot_be_mapped_is_an_error_naming_it(bad_key, tmp_path):
    family = "ltx" if "transformer_blocks" in bad_key else "cogvideox"
    good_name = "transformer_blocks.0.attn1.to_q"
    good = comfy_state_dict(adapter_on({good_name: (16, 16)}, family))
    save_file({**good, bad_key: torch.zeros(3, 16)}, str(tmp_path / "in.safetensors"))

    with pytest.raises(UserError) as info:
        convert(tmp_path / "in.safetensors", "diffusers", tmp_path / "out")

    assert bad_key in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_layer_comfyui_has_no_name_for_is_an_error_and_nothing_is_written(tmp_path):
    adapter = adapter_on({"transformer_blocks.0.attn1.norm_q": (16, 16)}, "cogvideox")
    write_diffusers(adapter, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="transformer_blocks.0.attn1.norm_q.*ComfyUI's cogvideox model"):
        convert(tmp_path / "a.safetensors", "comfy", tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_comfyui_keys_of_two_families_in_one_file_are_an_error(tmp_path):
    ltx = comfy_state_dict(adapter_on({"proj_in": (16, 8)}, "ltx"))
    cog = comfy_state_dict(adapter_on({"transformer_blocks.0.attn1.to_q": (32, 32)}, "cogvideox"))
    save_file({**ltx, **cog}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(UserError, match="different families") as info:
        read_adapter(tmp_path / "mixed.safetensors")
    assert "patchify_proj" in str(info.value) and "blocks.0.q" in str(info.value)


def test_only_proj_out_needs_the_metadata_family(tmp_path):
    # `proj_out` is the one name LTX and CogVideoX share; alone, only the file's metadata can tell them apart
    tensors = comfy_state_dict(adapter_on({"proj_out": (16, 32)}, "cogvideox"))
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(UserError, match="cogvideox and ltx alike"):
        read_adapter(tmp_path / "bare.safetensors")
    save_file(tensors, str(tmp_path / "named.safetensors"), {"finetune": json.dumps({"family": "ltx"})})
    assert read_adapter(tmp_path / "named.safetensors").extra["family"] == "ltx"


def test_without_a_family_the_layer_names_decide_or_it_is_an_error():
    cog_only = adapter_on({"transformer_blocks.0.norm1.linear": (48, 8)}, "x")
    cog_only.info_json = None
    assert "diffusion_model.blocks.0.norm1.linear.alpha" in comfy_state_dict(cog_only)
    both = adapter_on({"transformer_blocks.0.attn1.to_q": (16, 16)}, "x")
    both.info_json = None  # attention only: LTX and CogVideoX name it differently, nothing says which
    with pytest.raises(UserError, match="ltx and cogvideox alike"):
        comfy_state_dict(both)
