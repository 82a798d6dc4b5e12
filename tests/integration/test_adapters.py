"""Adapters on a tiny real WanPipeline: every layout loads to the same output (in diffusers and in the kit),
merges match diffusers' set_adapters, resize keeps the energy it reports, loads report what they matched,
inspect/push/convert on the command line, training writes the ComfyUI copy, hub ids resolve offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.cli import main
from finetune.formats import COMFY_NAME, WEIGHTS_NAME, read_adapter
from tests.tiny import build_tiny_wan, rel, transformer_output


def make_adapter(base: Path, out: Path, rank: int, alpha: float, seed: int, targets="blocks") -> Path:
    """A LoRA with random (non-zero) B on the base's transformer, saved as training saves it."""
    from diffusers import WanTransformer3DModel

    from finetune.config import LoraConfig
    from finetune.lora import add_lora, save_adapter, target_modules
    from finetune.models import get_family

    model = WanTransformer3DModel.from_pretrained(base, subfolder="transformer")
    add_lora(model, LoraConfig(rank=rank, alpha=alpha), target_modules(get_family("wan"), model, targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    info = {"family": "wan", "base_model": str(base), "steps": 7, "items": 3, "trigger": "ohwx",
            "recipe_hash": "abc123", "name": out.name, "targets": targets, "rank": rank, "alpha": alpha}  # fmt: skip
    save_adapter(model, out, info)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = build_tiny_wan(root / "base")
    a = make_adapter(base, root / "a", rank=4, alpha=8, seed=1)
    b = make_adapter(base, root / "b", rank=2, alpha=2, seed=2, targets="attention")
    return {"root": root, "base": base, "a": a, "b": b}


def pipe_with(base, *loras):
    """diffusers' own loading, as the reference."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(base)
    names = []
    for i, (path, scale) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"r{i}")
        names.append((f"r{i}", scale))
    if names:
        pipe.set_adapters([n for n, _ in names], adapter_weights=[s for _, s in names])
    return pipe


def test_comfy_file_loads_in_diffusers_like_the_diffusers_file(world, tmp_path):
    from diffusers import WanPipeline

    assert main(["convert", str(world["a"]), "--to", "comfy", "--out", str(tmp_path)]) == 0
    expected = transformer_output(pipe_with(world["base"], (world["a"], 1.0)).transformer)
    pipe = WanPipeline.from_pretrained(world["base"])
    # diffusers converts a ComfyUI Wan LoRA itself (alpha folded into the tensors)
    pipe.load_lora_weights(str(tmp_path), weight_name=COMFY_NAME)
    got = transformer_output(pipe.transformer)
    assert rel(got, expected) < 1e-5
    assert rel(expected, transformer_output(pipe_with(world["base"]).transformer)) > 1e-3


@pytest.mark.parametrize("layout", ["comfy", "peft", "kohya"])
def test_the_kit_loads_every_layout_to_the_same_output_and_says_what_matched(world, tmp_path, layout, capsys):
    from safetensors.torch import save_file

    from finetune.formats import comfy_state_dict, convert
    from finetune.lora import load_adapters

    if layout == "kohya":  # musubi-tuner's names, written here from the ComfyUI layout
        comfy = comfy_state_dict(read_adapter(world["a"]))
        kohya = {}
        for key, value in comfy.items():
            module, _, kind = key.removeprefix("diffusion_model.").rpartition(".lora_")
            if not module:
                module, kind = key.removeprefix("diffusion_model.").removesuffix(".alpha"), "alpha"
            kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(kind, kind)
            kohya["lora_unet_" + module.replace(".", "_") + "." + kind] = value
        save_file(kohya, str(tmp_path / "musubi.safetensors"))
        source = tmp_path / "musubi.safetensors"
    else:
        source = convert(world["a"], layout, tmp_path / layout)
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(world["base"])
    load_adapters(pipe, [(str(source), 0.7)])

    expected = transformer_output(pipe_with(world["base"], (world["a"], 0.7)).transformer)
    assert rel(transformer_output(pipe.transformer), expected) < 1e-5
    err = capsys.readouterr().err
    assert (
        f"20/20 layers matched ({layout} layout, rank 4), 0 missing, 0 unexpected, 0 shape mismatches" in err
    )


def test_an_adapter_for_another_shape_fails_naming_its_base(world, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    from finetune.errors import UserError
    from finetune.lora import load_adapters

    config = dict(WanTransformer3DModel.load_config(world["base"], subfolder="transformer"))
    wider = WanTransformer3DModel.from_config({**config, "ffn_dim": 48})  # the FFN is 48 wide, not 40
    pipe = WanPipeline.from_pretrained(world["base"], transformer=wider)
    with pytest.raises(UserError) as info:
        load_adapters(pipe, [(str(world["a"]), 1.0)])
    message = str(info.value)
    assert "4 of 20 LoRA layers found no match" in message and "4 with another shape" in message
    assert (
        "blocks.0.ffn.net.0.proj: adapter 40x16, model 48x16" in message
        and str(world["base"]) in message
        and "\n" not in message
    )


def test_a_pickled_adapter_is_refused_when_loading(world, tmp_path):
    from diffusers import WanPipeline

    from finetune.errors import UserError
    from finetune.lora import load_adapters

    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter.pt")
    with pytest.raises(UserError, match="--allow-pickle"):
        load_adapters(WanPipeline.from_pretrained(world["base"]), [(str(tmp_path / "adapter.pt"), 1.0)])


def test_merge_into_the_base_at_0_6_0_4_equals_set_adapters(world):
    from diffusers import WanPipeline

    out = world["root"] / "merged"
    assert main(["merge", "--model", str(world["base"]), "--lora", f"{world['a']}:0.6", "--lora",
                 f"{world['b']}:0.4", "--out", str(out)]) == 0  # fmt: skip
    expected = transformer_output(pipe_with(world["base"], (world["a"], 0.6), (world["b"], 0.4)).transformer)
    assert rel(transformer_output(WanPipeline.from_pretrained(out).transformer), expected) < 1e-4
    only_a = transformer_output(pipe_with(world["base"], (world["a"], 0.6)).transformer)
    assert rel(only_a, expected) > 1e-3  # b counts: the comparison is not trivially true


def test_merge_into_one_lora_exact_equals_set_adapters_and_svd_reports_energy(world, capsys):
    out = world["root"] / "one"
    assert main(["merge", "--lora", f"{world['a']}:0.6", "--lora", f"{world['b']}:0.4", "--into-lora",
                 "--out", str(out)]) == 0  # fmt: skip
    merged = read_adapter(out)
    assert merged.ranks() == [4, 6]  # FFN only in a (rank 4); attention in both (4 + 2)
    expected = transformer_output(pipe_with(world["base"], (world["a"], 0.6), (world["b"], 0.4)).transformer)
    assert rel(transformer_output(pipe_with(world["base"], (out, 1.0)).transformer), expected) < 1e-4

    low = world["root"] / "one-r2"
    assert main(["merge", "--lora", f"{world['a']}:0.6", "--lora", f"{world['b']}:0.4", "--into-lora",
                 "--rank", "2", "--out", str(low)]) == 0  # fmt: skip
    assert "of the energy retained" in capsys.readouterr().err
    info = json.loads(json.dumps(read_adapter(low).info))
    assert info["rank"] == 2 and info["alpha"] == 2.0 and len(info["derived_from"]) == 2


def test_resize_to_half_rank_keeps_the_energy_it_reports(world, capsys):
    from finetune.lora_math import delta

    out = world["root"] / "half"
    assert main(["resize", str(world["a"]), "--rank", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    reported = {ln.split()[0]: float(ln.split()[1].rstrip("%")) / 100 for ln in lines}
    original, resized = read_adapter(world["a"]), read_adapter(out)
    kept = total = 0.0
    for name, layer in original.layers.items():
        full = delta(layer)
        residual = float(((full - delta(resized.layers[name])) ** 2).sum())
        energy = float((full**2).sum())
        assert 1 - residual / energy == pytest.approx(reported[name], abs=1e-5)
        kept, total = kept + energy - residual, total + energy
    assert kept / total == pytest.approx(reported["overall"], abs=1e-5)
    assert 0.3 < reported["overall"] < 1.0
    assert resized.ranks() == [2] and resized.params == original.params // 2


def test_inspect_json_reports_what_the_adapter_is(world, capsys):
    assert main(["inspect", str(world["a"]), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"] == "wan" and facts["base_model"] == str(world["base"])
    assert (facts["rank"], facts["alpha"], facts["format"]) == (4, 8.0, "diffusers")
    assert facts["targets"] == sorted(["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                       "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"])  # fmt: skip
    # 2 blocks x 4 x (8 attention linears 16->16 + ffn 16->40 + 40->16)
    assert facts["params"] == 2 * 4 * (8 * 32 + 2 * 56)
    assert facts["file_size"] == (world["a"] / WEIGHTS_NAME).stat().st_size
    assert (facts["trigger"], facts["steps"], facts["items"], facts["recipe_hash"]) == (
        "ohwx",
        7,
        3,
        "abc123",
    )


def test_push_dry_run_lists_files_and_writes_no_token(world, tmp_path):
    from finetune.hub import model_card

    folder = shutil.copytree(world["a"], tmp_path / "adapter")
    info = read_adapter(folder).info
    (folder / "README.md").write_text(model_card({**info, "base_model": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}))
    (folder / "checkpoints" / "step-5").mkdir(parents=True)
    (folder / "checkpoints" / "step-5" / WEIGHTS_NAME).write_bytes(b"x")
    token = "hf_notARealTokenButSecret123"
    home = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "push", str(folder), "--repo", "me/style", "--dry-run"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_TOKEN": token, "HF_HOME": str(home)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == ["README.md", WEIGHTS_NAME]  # checkpoints stay local
    assert "would upload 2 files to https://huggingface.co/me/style" in result.stderr
    assert token not in result.stdout + result.stderr
    for path in [*folder.rglob("*"), *(home.rglob("*") if home.exists() else [])]:
        assert not path.is_file() or token.encode() not in path.read_bytes(), path


def test_training_writes_the_comfy_copy_when_asked(world, tmp_path):
    from tests.integration.test_wan_end_to_end import make_clips, write_recipe

    data = make_clips(tmp_path / "clips")
    recipe = write_recipe(tmp_path / "r.yaml", world["base"], data, tmp_path, train={"steps": 2},
                          output={"save_every": 0, "formats": ["diffusers", "comfy"]})  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    adapter = tmp_path / "adapter"
    assert (adapter / COMFY_NAME).is_file()
    trained, comfy = read_adapter(adapter / WEIGHTS_NAME), read_adapter(adapter / COMFY_NAME)
    assert comfy.format == "comfy" and sorted(comfy.layers) == sorted(trained.layers)
    assert all(torch.equal(comfy.layers[n].up, trained.layers[n].up) for n in trained.layers)
    assert yaml.safe_load((adapter / "recipe.yaml").read_text())["output"]["formats"] == [
        "diffusers",
        "comfy",
    ]


def test_lora_hub_id_resolves_through_the_local_cache_offline(world, tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-lora"
    commit = "1" * 40
    snapshot = repo / "snapshots" / commit
    shutil.copytree(world["a"], snapshot)
    shutil.copy(snapshot / WEIGHTS_NAME, tmp_path / "x.safetensors")
    from finetune.formats import convert

    convert(tmp_path / "x.safetensors", "comfy", snapshot / "comfy" / "style.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for ref, layout in [
        ("tiny-org/tiny-lora", "diffusers"),
        ("tiny-org/tiny-lora/comfy/style.safetensors", "comfy"),
    ]:
        result = subprocess.run([sys.executable, "-m", "finetune", "inspect", ref, "--json"], capture_output=True,
                                text=True, timeout=120, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr
        facts = json.loads(result.stdout)
        assert (facts["format"], facts["rank"], facts["base_model"]) == (layout, 4, str(world["base"]))
        assert facts["path"].startswith(str(snapshot))
    missing = subprocess.run([sys.executable, "-m", "finetune", "inspect", "tiny-org/absent"], capture_output=True,
                             text=True, timeout=120, env=env)  # fmt: skip
    assert missing.returncode == 2 and "hf download tiny-org/absent" in missing.stderr
