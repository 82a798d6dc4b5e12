"""Checkpoint pieces: state round trips, pruning, the recipe check, disk space, signals, messages, log cutting."""

from __future__ import annotations

import itertools
import os
import random
import signal
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from finetune import checkpoint as ck
from finetune.config import build_recipe
from finetune.errors import UserError
from finetune.guards import StopOnSignal, out_of_memory_message
from finetune.logs import TrainingLog


def optimizer_after_two_steps():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        w.grad = torch.randn(4, 3)
        optimizer.step()
        scheduler.step()
    return w, optimizer, scheduler


def fake_adapter(folder: Path, step: int) -> None:
    save_file({"transformer.x.lora_A.weight": torch.full((2, 2), float(step))}, str(folder / ck.WEIGHTS_NAME))
    (folder / "recipe.yaml").write_text("lora: {rank: 4}\n")


def write(root: Path, step: int, keep_last: int = 3) -> Path:
    _, optimizer, scheduler = optimizer_after_two_steps()
    return ck.write_checkpoint(root, step, fake_adapter, optimizer, scheduler, ck.capture_rng(),
                               {"losses": [0.5, float("nan")]}, keep_last, needed_bytes=1)  # fmt: skip


def test_optimizer_scheduler_and_rng_round_trip_exactly(tmp_path):
    w, optimizer, scheduler = optimizer_after_two_steps()
    rng = ck.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    folder = ck.write_checkpoint(
        tmp_path, 7, fake_adapter, optimizer, scheduler, rng, {"losses": [1.0]}, 3, 1
    )
    loaded = ck.load_checkpoint(folder)
    assert loaded.step == 7 and loaded.recipe == {"lora": {"rank": 4}}
    ck.restore_rng(loaded.rng)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])

    w2, optimizer2, scheduler2 = optimizer_after_two_steps()
    with torch.no_grad():
        w2.zero_()  # restore must bring the moments and the schedule back, not the weights
    ck.restore_schedule(loaded, optimizer2, scheduler2, lr=0.1)
    for a, b in zip(optimizer.state[w].values(), optimizer2.state[w2].values(), strict=True):
        assert torch.equal(a, b)
    assert scheduler2.last_epoch == 2 and optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    ck.restore_schedule(loaded, optimizer2, scheduler2, lr=0.3)  # a changed train.lr applies from here
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(0.3 / 3)


def test_keep_last_and_latest_ignore_temp_and_half_deleted_folders(tmp_path):
    for step in (1, 2, 3, 4):
        write(tmp_path, step, keep_last=2)
    assert [s for s, _ in ck.checkpoint_dirs(tmp_path)] == [3, 4]
    (tmp_path / ".step-9.abc.tmp").mkdir()  # what a kill during a write leaves
    (tmp_path / "step-10").mkdir()  # not ours, incomplete: load refuses it with the reason
    with pytest.raises(UserError, match="is not a training checkpoint"):
        ck.load_checkpoint(tmp_path / "step-10")
    write(tmp_path, 5, keep_last=0)  # 0 keeps everything; leftovers are cleaned
    assert [s for s, _ in ck.checkpoint_dirs(tmp_path)] == [3, 4, 5, 10]
    assert not (tmp_path / ".step-9.abc.tmp").exists()


def test_find_latest_and_missing(tmp_path):
    with pytest.raises(UserError, match="no checkpoint under"):
        ck.find_checkpoint("latest", tmp_path)
    write(tmp_path / "checkpoints", 2)
    write(tmp_path / "checkpoints", 11)
    assert ck.find_checkpoint("latest", tmp_path) == tmp_path / "checkpoints" / "step-11"  # numeric, not text
    with pytest.raises(UserError, match="is not a folder"):
        ck.find_checkpoint(str(tmp_path / "nope"), tmp_path)


def recipe_dict(*overrides):
    return build_recipe({"model": {"path": "m"}, "data": {"path": "d"}}, list(overrides)).model_dump(
        mode="json"
    )


def test_recipe_check_refuses_what_changes_the_state_and_notes_the_rest(tmp_path):
    saved = recipe_dict("lora.rank=16")
    with pytest.raises(UserError) as caught:
        ck.check_compatible(saved, recipe_dict("lora.rank=32", "data.width=480"), tmp_path)
    message = str(caught.value)
    assert "lora.rank was 16, now 32" in message and "data.width was 832, now 480" in message
    notes = ck.check_compatible(saved, recipe_dict("lora.rank=16", "train.steps=9", "train.resume=latest",
                                                   "train.validation.every=5"), tmp_path)  # fmt: skip
    assert notes == [
        "note: resuming with a changed recipe: train.steps 2000 -> 9",
        "note: resuming with a changed recipe: train.validation.every 0 -> 5",
    ]


def test_disk_space_check_names_the_sizes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage(10 * 2**30, 0, 150 * 2**20))
    ck.check_disk_space(tmp_path / "not" / "yet", 70 * 2**20)  # 150 MiB >= 2 x 70 MiB
    with pytest.raises(UserError, match=r"only 150 MiB free on its disk, and a checkpoint needs ~80 MiB"):
        ck.check_disk_space(tmp_path, 80 * 2**20)


def test_state_bytes_counts_adapter_and_moments():
    w, optimizer, _ = optimizer_after_two_steps()
    assert ck.state_bytes([w], optimizer) == 48 + (48 + 48 + 4) + 2**20  # w, exp_avg, exp_avg_sq, step


def test_batch_stream_fast_forward_equals_the_uninterrupted_stream(tmp_path):
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.safetensors")
        save_file({"latents": torch.zeros(16, 1 + i % 2, 2, 2), "text": torch.zeros(1, 4)}, str(files[-1]))
    whole = list(itertools.islice(ck.batch_stream(files, 2, 3, 0), 12))
    assert list(itertools.islice(ck.batch_stream(files, 2, 3, 7), 5)) == whole[7:12]
    a = torch.rand(3, generator=ck.batch_generator(3, 41))
    assert torch.equal(a, torch.rand(3, generator=ck.batch_generator(3, 41)))
    assert not torch.equal(a, torch.rand(3, generator=ck.batch_generator(3, 42)))


def test_first_signal_is_a_request_second_ctrl_c_quits_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_out_of_memory_message_offers_resumable_settings_first():
    recipe = build_recipe({"model": {"path": "m"}, "data": {"path": "d"}},
                          ["train.gradient_checkpointing=false", "train.batch_size=2"])  # fmt: skip
    message = out_of_memory_message(recipe, 12, Path("out/checkpoints/step-11"))
    assert message.startswith("out of GPU memory at step 12; the state before this step is saved in out/")
    assert "train.gradient_checkpointing=true" in message and "memory.base_dtype=fp8" in message
    assert "train.batch_size=1 train.grad_accum=2" in message
    assert message.index("train.resume=latest") < message.index("data.frames=40")


def test_log_on_resume_drops_rows_after_the_checkpoint(tmp_path):
    with TrainingLog(tmp_path, [], 0) as log:
        for step in range(1, 6):
            log.record(step, 1.0 / step, 1e-4, 0.5, 0.1, skipped=False)
        log.record_validation(4, 0.7)
    with TrainingLog(tmp_path, [], 3) as log:
        log.record(4, 9.0, 1e-4, 0.5, 0.1, skipped=True)
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3", "4"] and rows[-1].endswith(",1")
    assert (tmp_path / "validation.csv").read_text().splitlines() == ["step,val_loss"]


def test_ema_is_a_moving_average_saved_with_the_adapter_header(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from finetune.ema import EMA_NAME, LoraEMA

    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(2)))  # named like "w" -> key "transformer.w"
    ema = LoraEMA(model, decay=0.75)
    with torch.no_grad():
        model.w.fill_(4.0)
    ema.update()
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((2,), 4.0 * (1 - 0.75**2)))
    save_file(
        {"transformer.w": model.w.detach()}, str(tmp_path / ck.WEIGHTS_NAME), metadata={"finetune": "{}"}
    )
    ema.save(tmp_path)
    assert torch.equal(load_file(str(tmp_path / EMA_NAME))["transformer.w"], ema.shadow[0])
    with safe_open(str(tmp_path / EMA_NAME), framework="pt") as f:
        assert f.metadata()["finetune"] == "{}"


def test_holdout_never_leaves_a_repeated_item_in_training():
    from pathlib import Path

    from finetune.validation import split_holdout

    files = [Path(f"{name}.safetensors") for name in "abc"] * 3  # data repeats: each shard three times
    for seed in range(10):
        train, held = split_holdout(files, 1, seed)
        assert len(held) == 1 and held[0] not in train and len(train) == 6
