"""Wan 2.2 A14B's two experts, driven as a new user would on a tiny two-expert WanPipeline (transformer +
transformer_2 + boundary_ratio, real diffusers classes, save_pretrained): `finetune train` with lora.experts=both
-> both adapter files load into diffusers' WanPipeline (a LoRA on every block linear of each expert, nothing
missing) -> `finetune merge` at 0.7 equals base + adapter for both experts -> `finetune generate` writes the
requested frames; each expert saw only its own timesteps, and only one expert was ever in memory; resume across
the phase boundary is exact; experts=high / low train only that expert."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import av
import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.cli import main
from finetune.config import load_recipe
from finetune.models import common
from finetune.train import train
from tests.clips import write_video
from tests.tiny import build_tiny_wan, rel, transformer_output

BOUNDARY = 0.875
HIGH_FILE = "pytorch_lora_weights.safetensors"
LOW_FILE = "pytorch_lora_weights_transformer_2.safetensors"
BLOCK_LINEARS = sorted(
    f"blocks.{b}.{name}"
    for b in range(2)
    for name in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
        "ffn.net.0.proj", "ffn.net.2",
    )
)  # fmt: skip


class LoadRecorder:
    """Wraps the transformer loader: which component each load was, how many earlier transformers were still
    alive at that moment (one expert resident means 0), and the timesteps each component was trained at."""

    def __init__(self):
        self.loads: list[str] = []
        self.alive_at_load: list[int] = []
        self.timesteps: dict[str, list[float]] = {}
        self._refs: list[weakref.ref] = []
        self._real = common.load_transformer

    def __call__(self, cls, source, dtype, probe):
        gc.collect()
        self.alive_at_load.append(sum(ref() is not None for ref in self._refs))
        model = self._real(cls, source, dtype, probe)
        self.loads.append(source.component)
        self._refs.append(weakref.ref(model))
        seen = self.timesteps.setdefault(source.component, [])
        model.register_forward_pre_hook(
            lambda _m, _args, kwargs: seen.extend(kwargs["timestep"].flatten().tolist()), with_kwargs=True
        )
        return model


def train_recorded(recipe: Path, *overrides: str) -> LoadRecorder:
    recorder = LoadRecorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "load_transformer", recorder)
        train(load_recipe(recipe, list(overrides)))
    return recorder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("a14b")
    base = build_tiny_wan(root / "base", boundary_ratio=BOUNDARY)
    data = root / "clips"
    for i, (color, word) in enumerate([((255, 0, 0), "red"), ((0, 200, 0), "green"), ((0, 0, 255), "blue")]):
        write_video(data / f"clip{i}.mp4", frames=12, width=40, height=32, color=color)
        (data / f"clip{i}.txt").write_text(f"a {word} square moving right")
    recipe = {
        "model": {"path": str(base)},  # family inferred: WanPipeline
        "data": {"path": str(data), "width": 32, "height": 32, "frames": 5},
        "cache": {"dir": str(root / "cache"), "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8},  # experts: both is the default
        "train": {"steps": 4, "lr": 1e-2, "optimizer": "adamw", "seed": 3, "gradient_checkpointing": False},
        "output": {"dir": str(root / "adapter"), "save_every": 1, "keep_last": 0, "formats": ["comfy"]},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["cache", str(path)]) == 0
    recorder = train_recorded(path)
    return {"root": root, "base": base, "recipe": path, "adapter": root / "adapter", "recorder": recorder}


def test_each_expert_is_loaded_alone_and_trained_only_on_its_own_timesteps(world):
    rec = world["recorder"]
    assert rec.loads == ["transformer", "transformer_2"]  # high first, then low
    assert rec.alive_at_load == [0, 0]  # the high expert was freed before the low one loaded
    high, low = rec.timesteps["transformer"], rec.timesteps["transformer_2"]
    assert len(high) == len(low) == 2  # 4 steps, half each, batch 1
    assert all(BOUNDARY * 1000 <= t < 1000 for t in high), high
    assert all(0 < t < BOUNDARY * 1000 for t in low), low


def test_both_adapter_files_checkpoints_and_card(world):
    adapter = world["adapter"]
    names = {p.name for p in adapter.iterdir()}
    assert {HIGH_FILE, LOW_FILE, "README.md", "recipe.yaml"} <= names
    # One ComfyUI file per expert (ComfyUI loads each on its own model).
    assert {
        "pytorch_lora_weights_comfy.safetensors",
        "pytorch_lora_weights_transformer_2_comfy.safetensors",
    } <= names
    high, low = load_file(str(adapter / HIGH_FILE)), load_file(str(adapter / LOW_FILE))
    assert high.keys() == low.keys() and all(k.startswith("transformer.") for k in high)
    assert any(not torch.equal(high[k], low[k]) for k in high)  # two trained adapters, not one copied
    checkpoints = adapter / "checkpoints"
    experts = {
        int(p.name.split("-")[1]): json.loads((p / "training_state.json").read_text())["progress"]["expert"]
        for p in checkpoints.iterdir()
    }
    assert experts == {1: "high", 2: "high", 3: "low", 4: "low"}
    assert not (checkpoints / "step-2" / LOW_FILE).exists()
    # A low-phase checkpoint is a complete two-expert adapter: it carries the finished high expert.
    step3 = load_file(str(checkpoints / "step-3" / HIGH_FILE))
    assert all(torch.equal(step3[k], high[k]) for k in high)
    card = (adapter / "README.md").read_text()
    assert HIGH_FILE in card and LOW_FILE in card and "load_into_transformer_2=True" in card
    from finetune.lora import inspect_adapter

    facts = inspect_adapter(adapter)
    assert facts["layers"] == len(BLOCK_LINEARS) and facts["second_expert"].startswith(
        f"{LOW_FILE}: 20 layers"
    )


def test_both_adapters_load_into_diffusers_on_every_block_linear(world, caplog):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(world["base"])
    before = [transformer_output(pipe.transformer), transformer_output(pipe.transformer_2)]
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(world["adapter"], adapter_name="style")
        pipe.load_lora_weights(world["adapter"], weight_name=LOW_FILE, adapter_name="style",
                               load_into_transformer_2=True)  # fmt: skip
    messages = [r.getMessage().lower() for r in caplog.records]
    assert not [m for m in messages if "unexpected" in m or "missing" in m], messages
    for model, old in zip((pipe.transformer, pipe.transformer_2), before, strict=True):
        wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and "style" in m.lora_A)
        assert wrapped == BLOCK_LINEARS
        assert model.blocks[0].attn1.to_q.scaling["style"] == pytest.approx(2.0)  # alpha 8 / rank 4
        assert rel(transformer_output(model), old) > 1e-3, "the trained adapter does not change the output"


def test_merge_at_0_7_matches_base_plus_adapter_for_both_experts(world):
    from diffusers import WanPipeline

    out = world["root"] / "merged"
    assert (
        main(["merge", "--model", str(world["base"]), "--lora", f"{world['adapter']}:0.7", "--out", str(out)])
        == 0
    )
    merged = WanPipeline.from_pretrained(out)
    reference = WanPipeline.from_pretrained(world["base"])
    base_out = [transformer_output(reference.transformer), transformer_output(reference.transformer_2)]
    reference.load_lora_weights(world["adapter"], adapter_name="style")
    reference.load_lora_weights(world["adapter"], weight_name=LOW_FILE, adapter_name="style",
                                load_into_transformer_2=True)  # fmt: skip
    reference.set_adapters(["style"], adapter_weights=[0.7])
    for name, base in zip(("transformer", "transformer_2"), base_out, strict=True):
        expected = transformer_output(getattr(reference, name))
        assert rel(transformer_output(getattr(merged, name)), expected) < 1e-4, name
        assert rel(expected, base) > 1e-3, name  # the comparison above is not trivially true
    assert merged.config.boundary_ratio == BOUNDARY


def test_generate_writes_the_requested_frames_with_both_experts(world, capsys):
    out = world["root"] / "gen" / "sample.gif"
    args = ["generate", "--model", str(world["base"]), "--lora", f"{world['adapter']}:0.8", "--prompt",
            "a red square moving left", "--width", "48", "--height", "32", "--frames", "5", "--steps", "2",
            "--max-sequence-length", "16", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"{LOW_FILE} into transformer_2): 20/20 layers matched" in err
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)


@pytest.mark.parametrize("kept", [1, 2, 3], ids=["mid-high", "high-finished", "mid-low"])
def test_resume_across_the_phase_boundary_is_exact(world, tmp_path, kept):
    """A copy of the run cut back to checkpoint `kept` (final files gone) and resumed with train.resume=latest
    ends with the same two adapters, bit for bit."""
    whole = world["adapter"]
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for p in (cut / "checkpoints").iterdir():
        if int(p.name.split("-")[1]) > kept:
            shutil.rmtree(p)
    for name in (HIGH_FILE, LOW_FILE):
        (cut / name).unlink()
    rec = train_recorded(world["recipe"], f"output.dir={cut}", "train.resume=latest")
    assert rec.loads == (["transformer", "transformer_2"] if kept < 2 else ["transformer_2"])
    for name in (HIGH_FILE, LOW_FILE):
        a, b = load_file(str(whole / name)), load_file(str(cut / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (kept, name)


@pytest.mark.parametrize("choice,component,written,absent", [
    ("high", "transformer", HIGH_FILE, LOW_FILE),
    ("low", "transformer_2", LOW_FILE, HIGH_FILE),
])  # fmt: skip
def test_one_expert_trains_only_that_expert_and_writes_only_its_file(world, tmp_path, choice, component,
                                                                      written, absent):  # fmt: skip
    out = tmp_path / choice
    rec = train_recorded(world["recipe"], f"output.dir={out}", f"lora.experts={choice}", "train.steps=2",
                         "output.save_every=0", "output.formats=[diffusers]")  # fmt: skip
    assert rec.loads == [component]
    ts = rec.timesteps[component]
    assert len(ts) == 2 and all((t >= 875) == (choice == "high") for t in ts), ts
    assert (out / written).is_file() and not (out / absent).exists()
    # generate and merge take a one-expert folder too: its file goes into its own expert only.
    from diffusers import WanPipeline

    from finetune.lora import load_adapters

    pipe = WanPipeline.from_pretrained(world["base"])
    load_adapters(pipe, [(str(out), 1.0)])
    other = "transformer_2" if component == "transformer" else "transformer"
    assert not any(hasattr(m, "lora_A") for m in getattr(pipe, other).modules())
    wrapped = sorted(n for n, m in getattr(pipe, component).named_modules() if hasattr(m, "lora_A"))
    assert wrapped == BLOCK_LINEARS


def test_high_or_low_on_a_one_transformer_model_is_one_line(tmp_path, capsys):
    base = build_tiny_wan(tmp_path / "wan21")
    data = tmp_path / "clips"
    write_video(data / "a.mp4", frames=6, width=32, height=32)
    (data / "a.txt").write_text("a square")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(base)}, "data": {"path": str(data)},
                                      "cache": {"dir": str(tmp_path / "cache")},
                                      "lora": {"experts": "low"}}))  # fmt: skip
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora.experts: 'low'" in err and "lora.experts=both" in err
    assert "Traceback" not in err
    assert not Path(tmp_path / "cache").exists()  # refused before anything was cached or loaded
