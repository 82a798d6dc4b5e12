"""Training logs: `logs/loss.csv` and `logs/validation.csv` always, tensorboard and Weights & Biases when chosen
(`train.log`). A resumed run cuts the logs back to its checkpoint's step, so no step appears twice."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from finetune.ui import say, warn

LOSS_COLUMNS = ["step", "loss", "lr", "grad_norm", "seconds", "skipped"]
VALIDATION_COLUMNS = ["step", "val_loss"]


def _open_csv(path: Path, columns: list[str], resume_step: int):
    """A fresh CSV, or on resume the old one without the rows after `resume_step` (logged, then lost)."""
    kept: list[list[str]] = []
    if resume_step and path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= resume_step]
    file = open(path, "w", newline="")  # noqa: SIM115 (closed in TrainingLog.__exit__)
    writer = csv.writer(file)
    writer.writerow(columns)
    writer.writerows(kept)
    file.flush()
    return file, writer


class TrainingLog:
    """Per-step numbers. Every row is flushed: `tail -f logs/loss.csv` works during an overnight run."""

    def __init__(
        self,
        folder: Path,
        trackers: list[str],
        resume_step: int = 0,
        config: dict | None = None,
        enabled: bool = True,  # False on all but the main process: every method is then a no-op
    ):
        self.enabled = enabled
        self.board = None
        self.wandb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.loss_file, self.loss_rows = _open_csv(folder / "loss.csv", LOSS_COLUMNS, resume_step)
        self.val_file, self.val_rows = _open_csv(folder / "validation.csv", VALIDATION_COLUMNS, resume_step)
        if "tensorboard" in trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events past the checkpoint that an interrupted run had already written.
                self.board = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                warn("tensorboard is not installed; logging to CSV only (pip install tensorboard)")
        if "wandb" in trackers:
            try:
                import wandb

                self.wandb = wandb.init(
                    project="finetune", name=folder.parent.resolve().name, config=config, dir=str(folder)
                )
            except ImportError:
                say("note: train.log has wandb, but wandb is not installed (pip install wandb); skipping it")

    def record(
        self, step: int, loss: float, lr: float, grad_norm: float, seconds: float, skipped: bool
    ) -> None:
        if not self.enabled:
            return
        self.loss_rows.writerow(
            [step, f"{loss:.6f}", f"{lr:.3e}", f"{grad_norm:.4f}", f"{seconds:.3f}", int(skipped)]
        )
        self.loss_file.flush()
        numbers = {"train/lr": lr, "train/seconds_per_step": seconds, "train/skipped": int(skipped)}
        if math.isfinite(loss):
            numbers["train/loss"] = loss
        if math.isfinite(grad_norm):
            numbers["train/grad_norm"] = grad_norm
        self._scalars(numbers, step)

    def record_validation(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        self.val_rows.writerow([step, f"{val_loss:.6f}"])
        self.val_file.flush()
        self._scalars({"validation/loss": val_loss}, step)

    def record_video(self, tag: str, frames: np.ndarray, step: int, fps: int = 16) -> None:
        """(frames, H, W, 3) uint8. Tensorboard's add_video needs moviepy; without it, a strip of the first,
        middle and last frames as one image shows the motion well enough."""
        if self.board:
            try:
                import moviepy  # noqa: F401

                video = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))[None]  # (1, T, C, H, W)
                self.board.add_video(tag, video, step, fps=fps)
            except ImportError:
                self.board.add_image(tag, frame_strip(frames), step, dataformats="HWC")
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Video(frames.transpose(0, 3, 1, 2), fps=fps)}, step=step)

    def _scalars(self, numbers: dict[str, float], step: int) -> None:
        if self.board:
            for tag, value in numbers.items():
                self.board.add_scalar(tag, value, step)
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self.loss_file.close()
        self.val_file.close()
        if self.board:
            self.board.close()
        if self.wandb:
            self.wandb.finish()


def frame_strip(frames: np.ndarray) -> np.ndarray:
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    return np.concatenate([frames[i] for i in picks], axis=1)


def summary(
    steps: int, seconds: float, skipped: int, val_losses: dict[int, float], places: dict[str, Any]
) -> str:
    lines = [
        f"done: {steps} steps in {seconds / 60:.1f} min"
        + (f", {skipped} skipped (not finite)" if skipped else "")
    ]
    if val_losses:
        best = min(val_losses, key=val_losses.get)
        lines.append(f"  best validation loss {val_losses[best]:.4f} at step {best}")
    lines += [f"  {name}: {where}" for name, where in places.items() if where]
    return "\n".join(lines)
