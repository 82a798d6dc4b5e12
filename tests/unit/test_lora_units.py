"""LoRA without a download: --lora parsing, target presets, wrapping, and the saved file's layout and header."""

import json

import pytest
import torch

from finetune.config import LoraConfig
from finetune.errors import UserError
from finetune.lora import (
    WEIGHTS_NAME,
    adapter_file,
    adapter_info,
    add_lora,
    parse_lora_arg,
    save_adapter,
    target_modules,
)
from finetune.models import get_family


def tiny_transformer(num_layers: int = 2, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, 2, 4, 4, generator=g),  # latents: batch, channels, frames, height, width
        torch.tensor([500.0]),
        torch.randn(1, 6, 16, generator=g),  # text embeddings: batch, tokens, text_dim
    )


def _forward(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def wan():
    return get_family("wan")


# --- --lora PATH[:SCALE] -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a/b:0.7", ("a/b", 0.7)),
        ("a/b", ("a/b", 1.0)),
        ("a/b:-1", ("a/b", -1.0)),
        ("a/b:1e-1", ("a/b", 0.1)),
        ("C:\\x\\y", ("C:\\x\\y", 1.0)),  # a Windows drive, not a scale
        ("C:/x/y", ("C:/x/y", 1.0)),
        ("C:\\x\\y:0.5", ("C:\\x\\y", 0.5)),
        ("a:b", ("a:b", 1.0)),  # not a number: all of it is the path
        (":0.5", (":0.5", 1.0)),  # no path before the colon
    ],
)
def test_parse_lora_arg(text, expected):
    assert parse_lora_arg(text) == expected


# --- target presets ------------------------------------------------------------------------------


def test_blocks_preset_wraps_every_block_linear(wan):
    names = target_modules(wan, tiny_transformer(), "blocks")

    assert len(names) == 20  # 2 blocks x (4 self-attention + 4 cross-attention + 2 feed-forward)
    assert all(n.startswith("blocks.") for n in names)
    assert names == sorted(set(names))
    assert "blocks.1.ffn.net.0.proj" in names and "blocks.0.attn2.to_out.0" in names
    assert not any("condition_embedder" in n or n == "proj_out" for n in names)


def test_attention_and_ffn_presets(wan):
    model = tiny_transformer()

    attention = target_modules(wan, model, "attention")
    ffn = target_modules(wan, model, "ffn")

    assert len(attention) == 16 and all(".attn1." in n or ".attn2." in n for n in attention)
    assert ffn == [
        "blocks.0.ffn.net.0.proj",
        "blocks.0.ffn.net.2",
        "blocks.1.ffn.net.0.proj",
        "blocks.1.ffn.net.2",
    ]
    assert sorted(attention + ffn) == target_modules(wan, model, "blocks")


def test_list_of_module_names_matches_in_every_block(wan):
    assert target_modules(wan, tiny_transformer(), ["attn1.to_q"]) == [
        "blocks.0.attn1.to_q",
        "blocks.1.attn1.to_q",
    ]


def test_unknown_preset_is_a_user_error_listing_presets(wan):
    with pytest.raises(UserError) as info:
        target_modules(wan, tiny_transformer(), "everything")

    assert "everything" in str(info.value) and "blocks" in str(info.value) and "ffn" in str(info.value)


def test_module_name_that_matches_nothing_is_a_user_error(wan):
    with pytest.raises(UserError) as info:
        target_modules(wan, tiny_transformer(), ["attn1.to_q", "attn9.to_zz"])

    assert "attn9.to_zz" in str(info.value)


def test_linear_outside_the_blocks_is_not_a_target(wan):
    with pytest.raises(UserError):
        target_modules(wan, tiny_transformer(), ["proj_out"])


# --- wrapping ------------------------------------------------------------------------------------


def test_add_lora_trains_only_lora_weights_in_fp32_and_starts_as_the_base(wan):
    model = tiny_transformer()
    inputs = _inputs()
    before = _forward(model, inputs)
    base_names = {n for n, _ in model.named_parameters()}

    count = add_lora(model, LoraConfig(rank=4, alpha=4), target_modules(wan, model, "blocks"))

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 40  # A and B for each of the 20 layers
    assert not any(n in base_names for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # rank x (in + out) per layer: 8 attention linears 16->16, ffn 16->32 and 32->16, two blocks
    assert count == 2 * 4 * (8 * (16 + 16) + 2 * (16 + 32))
    assert count == sum(p.numel() for p in trainable.values())
    assert all(torch.count_nonzero(p) == 0 for n, p in trainable.items() if ".lora_B." in n)
    assert torch.equal(_forward(model, inputs), before)

    # The LoRA layers are on the output's path: a non-zero B changes it.
    with torch.no_grad():
        for n, p in trainable.items():
            if ".lora_B." in n:
                p.fill_(0.05)
    assert not torch.allclose(_forward(model, inputs), before, atol=1e-4)


def test_add_lora_makes_lora_weights_fp32_on_a_bf16_base(wan):
    model = tiny_transformer().to(torch.bfloat16)

    add_lora(model, LoraConfig(rank=2, alpha=2), target_modules(wan, model, ["ffn.net.2"]))

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4
    assert all(p.dtype == torch.float32 for p in trainable)
    assert model.blocks[0].ffn.net[2].base_layer.weight.dtype == torch.bfloat16


def test_add_lora_wraps_exactly_the_named_modules_not_look_alikes(wan):
    model = tiny_transformer(num_layers=12)

    add_lora(model, LoraConfig(rank=2, alpha=2), ["blocks.1.attn1.to_q"])

    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == {"blocks.1.attn1.to_q"}  # not blocks.11.attn1.to_q


# --- saving --------------------------------------------------------------------------------------


def _saved(tmp_path, wan, rank=4, alpha=8.0, targets="blocks"):
    model = tiny_transformer()
    add_lora(model, LoraConfig(rank=rank, alpha=alpha), target_modules(wan, model, targets))
    info = {"base_model": "owner/name", "steps": 12, "trigger": "ohwx"}
    path = save_adapter(model, tmp_path, info)
    return model, info, path


def test_save_adapter_then_adapter_info_round_trips(tmp_path, wan):
    import finetune

    _, info, path = _saved(tmp_path, wan)

    assert path == tmp_path / WEIGHTS_NAME and path.is_file()
    assert adapter_info(tmp_path) == {**info, "kit_version": finetune.__version__}
    assert adapter_info(path) == adapter_info(tmp_path)  # the folder or the file itself
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHTS_NAME]  # no temp file left


def test_saved_file_has_diffusers_key_layout_and_peft_config(tmp_path, wan):
    from safetensors import safe_open

    model, _, path = _saved(tmp_path, wan, rank=4, alpha=8.0)

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert len(keys) == 40
    assert all(k.startswith("transformer.blocks.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert not any(".default." in k for k in keys)  # peft's adapter name is stripped, as diffusers expects
    assert tensors["transformer.blocks.0.ffn.net.0.proj.lora_A.weight"].shape == (4, 16)
    assert tensors["transformer.blocks.0.ffn.net.0.proj.lora_B.weight"].shape == (32, 4)
    assert torch.equal(
        tensors["transformer.blocks.1.attn2.to_k.lora_A.weight"],
        model.blocks[1].attn2.to_k.lora_A["default"].weight.detach(),
    )
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4
    assert config["transformer.lora_alpha"] == 8.0


def test_diffusers_loads_the_saved_adapter_at_its_alpha(tmp_path, wan):
    from diffusers import WanPipeline

    _, _, path = _saved(tmp_path, wan, rank=4, alpha=2.0, targets="ffn")

    state, meta = WanPipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    fresh = tiny_transformer(seed=1)
    fresh.load_lora_adapter(state, prefix="transformer", metadata=meta, adapter_name="x")

    assert (fresh.peft_config["x"].r, fresh.peft_config["x"].lora_alpha) == (4, 2.0)
    assert fresh.blocks[0].ffn.net[2].scaling["x"] == pytest.approx(0.5)
    assert not hasattr(fresh.blocks[0].attn1.to_q, "lora_A")


def test_adapter_file_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as info:
        adapter_file(tmp_path / "nothing")

    assert "nothing" in str(info.value)


# --- the model card (finetune.hub) ---------------------------------------------------------------


def _card_info(**changes):
    info = {
        "name": "my-style",
        "family": "wan",
        "base_model": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "rank": 32,
        "alpha": 16.0,
        "targets": ["attn1.to_q", "ffn.net.2"],
        "lora_layers": 60,
        "steps": 500,
        "lr": 1e-4,
        "items": 12,
        "width": 832,
        "height": 480,
        "frames": 81,
        "trigger": "ohwx",
        "final_loss": 0.123456,
        "recipe_hash": "abcdef123456",
    }
    return {**info, **changes}


def _front_matter(card: str) -> dict:
    import yaml

    empty, front, _ = card.split("---", 2)
    assert empty == ""  # the card starts with its front matter
    return yaml.safe_load(front)


def test_model_card_front_matter_parses():
    from finetune.hub import model_card

    card = model_card(_card_info())
    front = _front_matter(card)

    assert front["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert front["instance_prompt"] == "ohwx"
    assert front["library_name"] == "diffusers"
    assert "lora" in front["tags"] and "wan" in front["tags"]
    assert "# my-style" in card
    assert "attn1.to_q, ffn.net.2 (60 layers)" in card
    assert "| 0.1235 |" in card  # final loss to 4 places
    assert "ohwx a cat walking through a garden" in card


def test_model_card_without_trigger_has_no_instance_prompt():
    from finetune.hub import model_card

    card = model_card(_card_info(trigger="", targets="blocks"))
    front = _front_matter(card)

    assert "instance_prompt" not in front
    assert "No trigger word." in card
    assert "| targets | blocks (60 layers) |" in card


def test_model_card_front_matter_survives_yaml_special_characters():
    from finetune.hub import model_card

    front = _front_matter(model_card(_card_info(trigger="sks: #style")))

    assert front["instance_prompt"] == "sks: #style"
