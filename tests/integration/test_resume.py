"""Training left alone overnight: exact resume, Ctrl-C / SIGTERM, kills during checkpoint writes, diverging runs,
validation samples. Tiny Wan on CPU in fp32, where a resumed run must equal an uninterrupted one bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.checkpoint import checkpoint_dirs, load_checkpoint
from finetune.cli import main
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.train import train
from tests.clips import write_video
from tests.tiny import build_tiny_wan

WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    base = build_tiny_wan(root / "base")
    data = root / "clips"
    for i, color in enumerate([(255, 0, 0), (0, 200, 0), (0, 0, 255)]):
        write_video(data / f"clip{i}.mp4", frames=12, width=40, height=32, color=color)
        (data / f"clip{i}.txt").write_text("a square moving right")
    recipe = {
        "model": {"path": str(base)},
        "data": {"path": str(data), "width": 32, "height": 32, "frames": 5},
        "cache": {"dir": str(root / "cache"), "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},  # dropout: the global torch RNG must resume too
        "train": {
            "steps": 6,
            "lr": 1e-2,
            "optimizer": "adamw",
            "grad_accum": 2,
            "seed": 5,
            "gradient_checkpointing": False,
        },
        "output": {"dir": str(root / "unused"), "save_every": 3},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["cache", str(path)]) == 0
    return {"root": root, "recipe": path, "base": base}


def run(world, out: Path, *overrides: str) -> Path:
    return train(load_recipe(world["recipe"], [f"output.dir={out}", *overrides]))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path if path.suffix else path / WEIGHTS))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:2]}"


def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(world, tmp_path):
    whole = run(world, tmp_path / "whole")
    run(world, tmp_path / "parts", "train.steps=4", "output.save_every=4")
    assert [s for s, _ in checkpoint_dirs(tmp_path / "parts" / "checkpoints")] == [4]
    first_part = tensors(tmp_path / "parts")
    resumed = run(world, tmp_path / "parts", "train.steps=6", "train.resume=latest")
    assert_identical(tensors(whole), tensors(resumed))
    assert not all(torch.equal(first_part[k], tensors(whole)[k]) for k in first_part)  # not trivially equal
    # The checkpoints of both runs at step 8 hold the same optimizer state as well.
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-6")
    b = load_checkpoint(tmp_path / "parts" / "checkpoints" / "step-6")
    for pid, state in a.optimizer["state"].items():
        assert all(torch.equal(v, b.optimizer["state"][pid][k]) for k, v in state.items())
    assert a.progress["losses"] == b.progress["losses"] and len(a.progress["losses"]) == 6
    rows = (tmp_path / "parts" / "logs" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 7)]


def test_resume_refuses_a_changed_rank_and_accepts_a_changed_step_count(world, tmp_path, capsys):
    run(world, tmp_path / "out", "train.steps=2", "output.save_every=2")
    with pytest.raises(
        UserError, match=r"lora.rank was 4, now 8 \(the saved LoRA weights have another shape\)"
    ):
        run(world, tmp_path / "out", "train.steps=3", "train.resume=latest", "lora.rank=8")
    with pytest.raises(UserError, match="is at step 2 and train.steps=2"):
        run(world, tmp_path / "out", "train.resume=latest", "train.steps=2")
    capsys.readouterr()
    run(world, tmp_path / "out", "train.steps=3", "train.resume=latest")
    err = capsys.readouterr().err
    assert "resuming with a changed recipe: train.steps 2 -> 3" in err and "resuming from" in err
    from finetune.lora import adapter_info

    assert adapter_info(tmp_path / "out")["steps"] == 3
    with pytest.raises(UserError, match="no checkpoint under"):
        run(world, tmp_path / "empty", "train.resume=latest")


def test_sigint_mid_run_saves_a_checkpoint_that_resumes(world, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "train", str(world["recipe"]), f"output.dir={out}", "train.steps=10000",
         "output.save_every=0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    log = out / "logs" / "loss.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # header + 2 steps
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "train.resume=latest" in err and "Traceback" not in err
    found = checkpoint_dirs(out / "checkpoints")
    assert len(found) == 1
    stopped = found[0][0]
    assert stopped >= 2 and f"stopped at step {stopped} of 10000 (SIGINT)" in err
    rows = log.read_text().splitlines()
    assert len(rows) == stopped + 1
    run(world, out, "train.resume=latest", f"train.steps={stopped + 1}")
    from finetune.lora import adapter_info

    assert adapter_info(out)["steps"] == stopped + 1
    assert len(log.read_text().splitlines()) == stopped + 2


def test_diverging_run_stops_after_max_bad_steps_and_keeps_a_loadable_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        run(world, out, "train.lr=1e30", "train.steps=20", "output.save_every=1", "train.max_bad_steps=3")
    message = str(caught.value)
    assert "not finite for 3 steps in a row" in message and "lower train.lr (now 1e+30)" in message
    found = checkpoint_dirs(out / "checkpoints")
    assert found, "no checkpoint kept"
    last = load_checkpoint(found[-1][1])
    assert str(found[-1][1]) in message
    rows = [r.split(",") for r in (out / "logs" / "loss.csv").read_text().splitlines()[1:]]
    assert [r[-1] for r in rows][-3:] == ["1", "1", "1"]  # the last three steps were skipped
    assert last.step == len(rows) - 3  # no checkpoint was written during the bad streak


WRITER = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from finetune.checkpoint import capture_rng, checkpoint_dirs, write_checkpoint

root = Path(sys.argv[1])
weights = torch.nn.Parameter(torch.randn(1024, 512))  # 2 MiB adapter + 4 MiB of moments per checkpoint
optimizer = torch.optim.AdamW([weights])
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
weights.grad = torch.ones_like(weights)
optimizer.step()

def write_adapter(folder, step):
    save_file({"transformer.w.lora_A.weight": weights.detach() * step}, str(folder / "pytorch_lora_weights.safetensors"))
    (folder / "recipe.yaml").write_text("lora: {rank: 4}\\n")

found = checkpoint_dirs(root)
step = first = found[-1][0] if found else 0
while True:
    step += 1
    write_checkpoint(root, step, write_adapter, optimizer, scheduler, capture_rng(), {"losses": [1.0] * step},
                     keep_last=2, needed_bytes=1)
    if step == first + 1:
        print("ready", flush=True)
"""


def test_sigkill_while_writing_checkpoints_never_leaves_a_broken_step_folder(tmp_path):
    import random

    root = tmp_path / "checkpoints"
    moments = random.Random(0)
    seen = set()
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(moments.uniform(0.05, 0.6))
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
        found = checkpoint_dirs(root)
        assert 1 <= len(found) <= 3  # keep_last=2, plus the new one between its rename and the prune
        for step, folder in found:
            loaded = load_checkpoint(folder)
            assert loaded.step == step and len(loaded.progress["losses"]) == step
            assert loaded.lora["transformer.w.lora_A.weight"].shape == (1024, 512)
            assert loaded.optimizer["state"][0]["exp_avg_sq"].shape == (1024, 512)
            seen.add(step)
    assert len(seen) >= 3  # the writer got somewhere between kills


def test_validation_writes_samples_and_a_held_out_loss_each_time(world, tmp_path):
    out = tmp_path / "out"
    run(world, out, "train.steps=4", "output.save_every=0", "train.validation.every=2",
        "train.validation.prompts=[a red square, a blue square]", "train.validation.width=32",
        "train.validation.height=32", "train.validation.frames=5", "train.validation.steps=2",
        "train.validation.holdout=1", "train.ema=0.5")  # fmt: skip
    for folder in ("base", "step-2", "step-4"):
        names = sorted(p.name for p in (out / "samples" / folder).iterdir())
        assert names == ["00-a-red-square.mp4", "01-a-blue-square.mp4"], folder
        import av

        with av.open(str(out / "samples" / folder / names[0])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    assert not (out / "samples" / "step-1").exists() and not (out / "samples" / "step-3").exists()
    rows = [r.split(",") for r in (out / "logs" / "validation.csv").read_text().splitlines()]
    assert [r[0] for r in rows] == ["step", "2", "4"]
    assert float(rows[1][1]) != float(rows[2][1])  # the adapter changed between the two
    assert list((out / "logs").glob("events.out.tfevents.*"))
    from finetune.lora import adapter_info

    assert adapter_info(out)["items"] == 2  # 3 clips, 1 held out
    ema, final = tensors(out / "pytorch_lora_weights_ema.safetensors"), tensors(out)
    assert ema.keys() == final.keys()
    b = [k for k in final if "lora_B" in k]
    assert all(0 < ema[k].abs().sum() < final[k].abs().sum() for k in b)  # lags behind the weights from B = 0


def test_validation_frees_its_pipeline_and_leaves_the_transformer_training(world, tmp_path):
    import gc

    from finetune.lora import add_lora, target_modules
    from finetune.models import family_for, resolve_source
    from finetune.validation import Validation

    recipe = load_recipe(world["recipe"], ["train.validation.prompts=[a red square]", "train.validation.width=32",
                                           "train.validation.height=32", "train.validation.frames=1",
                                           "train.validation.steps=1"])  # fmt: skip
    source = resolve_source(recipe.model)
    family = family_for(recipe.model, source)
    transformer = family.load_transformer(source, torch.float32)
    add_lora(transformer, recipe.lora, target_modules(family, transformer, "blocks"))
    transformer.train()
    validation = Validation(recipe, family, source, [], torch.device("cpu"), torch.float32)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    validation.samples(transformer, tmp_path / "warmup")  # first call: lazy imports and caches settle
    before = live_tensors()
    paths = validation.samples(transformer, tmp_path / "s")
    assert [p.name for p in paths] == ["00-a-red-square.mp4"]
    assert validation.last_pipeline is not None and validation.last_pipeline() is None  # the pipeline is gone
    assert live_tensors() <= before
    assert transformer.training and next(validation.vae.parameters()).device.type == "cpu"
