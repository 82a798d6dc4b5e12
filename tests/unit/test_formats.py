"""Adapter layouts: the Wan key map checked against diffusers' own converters, every layout written and read,
the bitwise round trip, every key accounted for, pickle refused, and the model card."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.errors import UserError
from finetune.formats import (
    COMFY_NAME,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    WAN_BLOCK_NAMES,
    WAN_OTHER_NAMES,
    WEIGHTS_NAME,
    Adapter,
    LoraLayer,
    comfy_state_dict,
    convert,
    read_adapter,
    wan_to_diffusers,
    wan_to_original,
    write_comfy,
    write_diffusers,
)

ORIGINAL_NAMES = [f"blocks.7.{n}" for n in WAN_BLOCK_NAMES] + list(WAN_OTHER_NAMES)


def _file(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _adapter(names, rank=4, alpha=8.0, dims=(16, 16), seed=0, info=None):
    g = torch.Generator().manual_seed(seed)
    layers = {
        n: LoraLayer(torch.randn(rank, dims[1], generator=g), torch.randn(dims[0], rank, generator=g), alpha)
        for n in names
    }
    return Adapter(layers=layers, info_json=json.dumps(info or {"family": "wan", "base_model": "o/base"}))


# --- the key map ---------------------------------------------------------------------------------------


def test_wan_names_match_diffusers_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    checkpoint = {f"{n}.weight": torch.zeros(1) for n in ORIGINAL_NAMES}
    converted = convert_wan_transformer_to_diffusers(dict(checkpoint))
    assert sorted(converted) == sorted(f"{wan_to_diffusers(n)}.weight" for n in ORIGINAL_NAMES)
    for name in ORIGINAL_NAMES:
        assert wan_to_original(wan_to_diffusers(name)) == name
    assert wan_to_diffusers("blocks.3.self_attn.o") == "blocks.3.attn1.to_out.0"
    assert wan_to_diffusers("blocks.3.cross_attn.k_img") == "blocks.3.attn2.add_k_proj"
    assert wan_to_diffusers("blocks.0.ffn.0") == "blocks.0.ffn.net.0.proj"
    assert wan_to_diffusers("blocks.0.norm3") is None


def test_comfy_layout_is_what_diffusers_converts_back_with_alpha_folded():
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    names = [f"blocks.{b}.{n}" for b in range(2) for n in WAN_BLOCK_NAMES.values()]
    adapter = _adapter(names, rank=4, alpha=2.0)
    comfy = comfy_state_dict(adapter)
    assert "diffusion_model.blocks.1.self_attn.q.lora_A.weight" in comfy
    assert comfy["diffusion_model.blocks.0.ffn.2.alpha"].item() == 2.0
    # clones: diffusers scales cross-attention and FFN tensors in place (`*=`), which would change ours too
    converted = _convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in comfy.items()})
    assert len(converted) == 2 * len(names)  # every A and B found a home; the alphas were consumed
    for name, layer in adapter.layers.items():
        a, b = converted[f"transformer.{name}.lora_A.weight"], converted[f"transformer.{name}.lora_B.weight"]
        assert torch.allclose(b @ a, layer.scale * layer.up @ layer.down, rtol=1e-6, atol=1e-6)


def test_kohya_musubi_file_reads_with_its_alpha(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for b in range(2):
        for original in WAN_BLOCK_NAMES:
            if "img" in original:
                continue
            key = f"lora_unet_blocks_{b}_{original.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, 16, generator=g)
            tensors[f"{key}.lora_up.weight"] = torch.randn(16, 2, generator=g)
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "musubi.safetensors"))

    adapter = read_adapter(tmp_path / "musubi.safetensors")

    assert adapter.format == "kohya" and len(adapter.layers) == 20
    layer = adapter.layers["blocks.1.attn2.to_out.0"]
    assert layer.alpha == 1.0 and layer.rank == 2
    assert torch.equal(layer.down, tensors["lora_unet_blocks_1_cross_attn_o.lora_down.weight"])
    theirs = _convert_musubi_wan_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})
    for name, layer in adapter.layers.items():
        a, b = theirs[f"transformer.{name}.lora_A.weight"], theirs[f"transformer.{name}.lora_B.weight"]
        assert torch.allclose(b @ a, layer.scale * layer.up @ layer.down, rtol=1e-6, atol=1e-6)


# --- writing and reading every layout ----------------------------------------------------------------


@pytest.fixture
def diffusers_file(tmp_path):
    from finetune.config import LoraConfig
    from finetune.lora import add_lora, save_adapter, target_modules
    from finetune.models import get_family
    from tests.unit.test_lora_units import tiny_transformer

    model = tiny_transformer()
    add_lora(model, LoraConfig(rank=4, alpha=8), target_modules(get_family("wan"), model, "blocks"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    folder = tmp_path / "adapter"
    save_adapter(model, folder, {"family": "wan", "base_model": "o/base", "steps": 3, "trigger": "ohwx"})
    return folder / WEIGHTS_NAME


def test_diffusers_to_comfy_to_diffusers_is_bitwise(diffusers_file, tmp_path):
    comfy = convert(diffusers_file, "comfy", tmp_path / "c")
    assert comfy == tmp_path / "c" / COMFY_NAME
    back = convert(comfy, "diffusers", tmp_path / "d")

    # (not the file bytes: safetensors writes header metadata in hash-map order, which varies run to run)
    tensors, meta = _file(back)
    original, original_meta = _file(diffusers_file)
    assert meta == original_meta and sorted(tensors) == sorted(original)
    assert all(
        torch.equal(tensors[k], original[k]) and tensors[k].dtype == original[k].dtype for k in tensors
    )


def test_comfy_file_has_one_alpha_per_layer_and_no_diffusers_config(diffusers_file, tmp_path):
    tensors, meta = _file(convert(diffusers_file, "comfy", tmp_path / "x.safetensors"))

    assert len(tensors) == 20 * 3 and all(k.startswith("diffusion_model.blocks.") for k in tensors)
    assert tensors["diffusion_model.blocks.1.cross_attn.o.alpha"].item() == 8.0
    # diffusers would apply a header alpha on top of the alpha it folds in from the tensors: none here
    assert "lora_adapter_metadata" not in meta
    assert json.loads(meta["finetune"])["trigger"] == "ohwx"


def test_every_layout_reads_back_to_the_same_layers(diffusers_file, tmp_path):
    reference = read_adapter(diffusers_file)
    convert(diffusers_file, "peft", tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [PEFT_CONFIG, PEFT_WEIGHTS]
    for source in (convert(diffusers_file, "comfy", tmp_path / "c"), tmp_path / "peft"):
        adapter = read_adapter(source)
        assert sorted(adapter.layers) == sorted(reference.layers)
        for name, layer in reference.layers.items():
            assert torch.equal(adapter.layers[name].down, layer.down)
            assert torch.equal(adapter.layers[name].up, layer.up)
            assert adapter.layers[name].alpha == layer.alpha == 8.0
        assert adapter.info == reference.info


def test_peft_folder_loads_in_peft_with_the_same_output(diffusers_file, tmp_path):
    from diffusers import WanPipeline
    from peft import PeftModel

    from tests.unit.test_lora_units import _forward, _inputs, tiny_transformer

    convert(diffusers_file, "peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")

    inputs = _inputs()
    base_out = _forward(tiny_transformer(seed=5), inputs)
    peft_model = PeftModel.from_pretrained(tiny_transformer(seed=5), str(tmp_path / "peft"))
    state, meta = WanPipeline.lora_state_dict(str(diffusers_file.parent), return_lora_metadata=True)
    reference = tiny_transformer(seed=5)
    reference.load_lora_adapter(state, prefix="transformer", metadata=meta, adapter_name="x")

    expected = _forward(reference, inputs)
    got = _forward(peft_model.base_model.model, inputs)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    assert float((expected - base_out).norm() / base_out.norm()) > 1e-3


def test_non_uniform_ranks_and_alphas_survive_the_diffusers_header(tmp_path):
    from diffusers import WanPipeline

    from tests.unit.test_lora_units import tiny_transformer

    adapter = _adapter(["blocks.0.attn1.to_q", "blocks.1.attn1.to_q"], rank=4, alpha=4.0)
    adapter.layers["blocks.1.attn1.to_q"] = LoraLayer(torch.ones(2, 16), torch.ones(16, 2), 6.0)
    write_diffusers(adapter, tmp_path / WEIGHTS_NAME)

    state, meta = WanPipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    model = tiny_transformer()
    model.load_lora_adapter(state, prefix="transformer", metadata=meta, adapter_name="x")
    assert model.blocks[0].attn1.to_q.scaling["x"] == pytest.approx(1.0)
    assert model.blocks[1].attn1.to_q.scaling["x"] == pytest.approx(3.0)  # alpha 6 / rank 2
    assert read_adapter(tmp_path).layers["blocks.1.attn1.to_q"].alpha == 6.0


# --- every key accounted for ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_key",
    [
        "diffusion_model.blocks.0.norm3.lora_A.weight",  # a layer with no diffusers name
        "diffusion_model.blocks.0.self_attn.q.dora_scale",  # DoRA
        "diffusion_model.blocks.0.self_attn.q.diff_b",  # bias diff
        "text_encoder.encoder.block.0.lora_A.weight",  # another component
    ],
)
def test_a_key_that_cannot_be_mapped_is_an_error_naming_it(tmp_path, bad_key):
    good = comfy_state_dict(_adapter(["blocks.0.attn1.to_q"]))
    save_file({**good, bad_key: torch.zeros(4, 16)}, str(tmp_path / "in.safetensors"))

    with pytest.raises(UserError) as info:
        convert(tmp_path / "in.safetensors", "diffusers", tmp_path / "out")

    assert bad_key in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_layer_without_its_b_matrix_is_an_error(tmp_path):
    save_file(
        {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 16)}, str(tmp_path / "a.safetensors")
    )
    with pytest.raises(UserError, match="blocks.0.attn1.to_q has no up weight"):
        read_adapter(tmp_path / "a.safetensors")


def test_comfy_for_a_layer_without_an_original_name_is_an_error(tmp_path):
    with pytest.raises(UserError, match="blocks.0.norm2"):
        write_comfy(_adapter(["blocks.0.norm2"]), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --- pickle --------------------------------------------------------------------------------------------


def test_pickle_is_refused_with_the_way_to_convert_it_and_converts_with_allow_pickle(
    tmp_path, diffusers_file
):
    tensors, _ = _file(diffusers_file)
    torch.save(tensors, tmp_path / "old.pt")

    with pytest.raises(UserError) as info:
        read_adapter(tmp_path / "old.pt")
    assert "finetune convert" in str(info.value) and "--allow-pickle" in str(info.value)

    out = convert(tmp_path / "old.pt", "diffusers", tmp_path / "new", allow_pickle=True)
    converted, _ = _file(out)
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)


def test_pickle_with_code_is_rejected_even_with_allow_pickle(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(UserError, match="cannot read tensors"):
        read_adapter(tmp_path / "evil.bin", allow_pickle=True)


# --- the model card --------------------------------------------------------------------------------------


def test_card_parses_with_model_card_and_carries_base_model_and_license():
    from finetune.hub import check_card, model_card
    from tests.unit.test_lora_units import _card_info

    card = check_card(model_card(_card_info(), sample="samples/step-500.gif"))

    assert card.data.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert card.data.license == "apache-2.0"  # Wan 2.1's license
    assert card.data.library_name == "diffusers" and "lora" in card.data.tags
    assert card.data.instance_prompt == "ohwx"
    assert "![sample](samples/step-500.gif)" in card.text and "ComfyUI" in card.text


def test_card_license_comes_from_a_local_base_card(tmp_path):
    from finetune.hub import base_license, model_card

    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    assert base_license(str(tmp_path)) == "mit"
    assert base_license(str(tmp_path / "nothing")) is None
    from tests.unit.test_lora_units import _card_info

    assert "license: mit" in model_card(_card_info(base_model=str(tmp_path)))
