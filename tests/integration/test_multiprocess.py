"""Data-parallel training under `accelerate launch`: 2 CPU processes (gloo) with grad_accum 1 must train what
1 process with grad_accum 2 trains, start from an empty cache without the two processes colliding on it, and
leave only the main process's files. Tiny Wan on CPU in fp32.

accelerate's `--cpu` flag starts a single process unless mpirun is set up, so the 2 CPU processes come from
`--multi_gpu` (torchrun underneath) with ACCELERATE_USE_CPU=1, which makes accelerate pick DistributedType.MULTI_CPU
and the gloo backend."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.checkpoint import checkpoint_dirs
from finetune.config import load_recipe
from finetune.train import train
from tests.clips import write_video
from tests.tiny import build_tiny_wan

WEIGHTS = "pytorch_lora_weights.safetensors"
# AdamW divides each gradient by its running RMS: entries whose gradient is near its eps (1e-8) turn the float
# differences of a different reduction order (DDP's all-reduce vs one process adding two micro-batches) into
# visible weight differences, at most ~lr per step. Measured: 1.3e-4 after 4 steps at lr 1e-2, while the
# adapter moved ~4e-2 from where it started. Losses and gradient norms agree to the CSV's printed precision.
WEIGHT_TOLERANCE = 1e-3

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend, so 2 CPU processes cannot form a process group",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    base = build_tiny_wan(root / "base")
    data = root / "clips"
    for i, color in enumerate([(255, 0, 0), (0, 200, 0), (0, 0, 255), (200, 200, 0)]):
        write_video(data / f"clip{i}.mp4", frames=12, width=40, height=32, color=color)
        (data / f"clip{i}.txt").write_text("a square moving right")
    recipe = {
        "model": {"path": str(base)},
        "data": {"path": str(data), "width": 32, "height": 32, "frames": 5},
        "cache": {"dir": str(root / "cache"), "max_sequence_length": 16},  # empty: the launch builds it
        "lora": {"rank": 4, "alpha": 8},  # no dropout: its masks come from each process's own RNG
        "train": {
            "steps": 4,
            "lr": 1e-2,
            "optimizer": "adamw",
            "grad_accum": 1,
            "seed": 5,
            "gradient_checkpointing": False,
        },
        "output": {"dir": str(root / "unused"), "save_every": 2},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return {"root": root, "recipe": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "finetune", "train", str(recipe), f"output.dir={out}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",  # else accelerate sets threads per process itself, with a warning
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


def loss_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "logs" / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_train_what_one_process_with_twice_the_accumulation_trains(world, tmp_path):
    two = tmp_path / "two"
    done = launch_two_processes(world["recipe"], two)
    assert done.returncode == 0, done.stderr[-3000:]
    # Both processes took part (one encoded, the other found the shards), and they took turns on the cache.
    assert done.stderr.count("cache: 0 cached, 4 new") == 1, done.stderr[-3000:]
    assert done.stderr.count("cache: 4 cached, 0 new") == 1, done.stderr[-3000:]
    assert done.stderr.count("LoRA rank 4 on") == 2

    one = tmp_path / "one"
    train(load_recipe(world["recipe"], [f"output.dir={one}", "train.grad_accum=2"]))

    a, b = load_file(str(one / WEIGHTS)), load_file(str(two / WEIGHTS))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < WEIGHT_TOLERANCE, f"LoRA tensors differ by up to {worst:.2e}"
    # Not trivially equal: every lora_B started at zero and moved far more than the tolerance.
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 20 * WEIGHT_TOLERANCE

    # Each step's loss is the mean over both batches and the gradient norm that of the averaged gradient:
    # a process that saw other batches, or a loss scaled by the process count, would show here.
    rows_one, rows_two = loss_rows(one), loss_rows(two)
    assert [r["step"] for r in rows_two] == ["1", "2", "3", "4"]  # once each: one writer
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert float(r1["loss"]) == pytest.approx(float(r2["loss"]), abs=2e-6)
        assert float(r1["grad_norm"]) == pytest.approx(float(r2["grad_norm"]), abs=2e-4)

    # Only the main process wrote: one tensorboard events file (its name carries the writer's pid), and
    # complete checkpoints at the save_every steps.
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in checkpoint_dirs(two / "checkpoints")] == [2, 4]
    assert not [p for p in (two / "checkpoints").iterdir() if p.name.startswith(".")]
    checkpoint = load_file(str(two / "checkpoints" / "step-4" / WEIGHTS))
    assert all(torch.equal(checkpoint[k], b[k]) for k in b)
