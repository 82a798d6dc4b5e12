"""Atomic writes: the old file or folder, or the new one whole; never half of one, never a temp left behind."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from finetune.io import atomic_dir, atomic_save_safetensors, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files ---------------------------------------------------------------------------------------


def test_atomic_write_text_creates_and_replaces(tmp_path):
    path = tmp_path / "sub" / "card.md"

    atomic_write_text(path, "first")
    assert path.read_text(encoding="utf-8") == "first"

    atomic_write_text(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in path.parent.iterdir()] == ["card.md"]  # no temp file left


def test_atomic_write_respects_umask_not_mkstemp_0600(tmp_path, umask_022):
    path = tmp_path / "recipe.yaml"

    atomic_write_text(path, "x")

    assert _mode(path) == 0o644


def test_atomic_write_with_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)

    assert _mode(tmp_path / "private.txt") == 0o600


def test_failed_replace_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text("old", encoding="utf-8")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")

    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("old", encoding="utf-8")

    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "half \ud800 written")  # a lone surrogate cannot be encoded

    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_atomic_save_safetensors_writes_tensors_and_metadata(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    weight = torch.arange(6.0).view(2, 3).t()  # not contiguous

    atomic_save_safetensors({"w": weight}, path, {"format": "pt", "k": "v"})

    assert torch.equal(load_file(str(path))["w"], weight)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["k"] == "v"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_save_safetensors_respects_umask(tmp_path, umask_022):
    path = tmp_path / "w.safetensors"

    atomic_save_safetensors({"w": torch.zeros(2)}, path, {"format": "pt"})

    assert _mode(path) == 0o644


def test_failed_safetensors_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")

    def boom(src, dst):
        raise OSError("no")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_save_safetensors({"w": torch.zeros(2)}, path, {})

    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# --- folders -------------------------------------------------------------------------------------


def _make_old(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("old a")
    (folder / "stale.txt").write_text("only in the old one")


def test_atomic_dir_creates_a_new_folder(tmp_path):
    target = tmp_path / "checkpoints" / "step-10"

    with atomic_dir(target) as tmp:
        assert tmp != target and tmp.parent == target.parent and tmp.is_dir()
        assert not target.exists()  # nothing at the real name until the block succeeds
        (tmp / "w.txt").write_text("new")

    assert (target / "w.txt").read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["step-10"]


def test_atomic_dir_replaces_an_existing_folder_whole(tmp_path):
    target = tmp_path / "adapter"
    _make_old(target)

    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new a")
        assert (target / "a.txt").read_text() == "old a"  # the old one stands while writing

    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # stale.txt went with the old folder
    assert (target / "a.txt").read_text() == "new a"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no .tmp and no .old beside it


def test_atomic_dir_error_inside_the_block_keeps_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    _make_old(target)

    with pytest.raises(RuntimeError, match="interrupted"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")

    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "stale.txt"]
    assert (target / "a.txt").read_text() == "old a"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_dir_error_with_no_old_folder_leaves_nothing(tmp_path):
    target = tmp_path / "adapter"

    with pytest.raises(KeyboardInterrupt), atomic_dir(target):
        raise KeyboardInterrupt

    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_clears_a_leftover_old_folder(tmp_path):
    target = tmp_path / "adapter"
    _make_old(target)
    (tmp_path / ".adapter.old").mkdir()  # from a run killed between its two renames
    (tmp_path / ".adapter.old" / "junk").write_text("x")

    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new a")

    assert (target / "a.txt").read_text() == "new a"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
