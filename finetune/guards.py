"""What keeps an unattended run alive or stops it cleanly: Ctrl-C / SIGTERM, non-finite steps, out-of-memory."""

from __future__ import annotations

import signal
import threading

import torch

from finetune.config import Recipe


def gradient_norm(params: list[torch.nn.Parameter], max_norm: float, accelerator) -> float:
    """The total gradient norm, clipped to `max_norm` when it is > 0 (a non-finite norm is returned as is;
    the caller skips that step). One device sync per step."""
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


class StopOnSignal:
    """Turns the first SIGINT/SIGTERM into a request (`.requested` holds its name) that the loop honours at the
    end of the current step, after a checkpoint. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        from finetune.ui import say

        say(
            f"\n{self.requested}: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)"
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def bad_steps_message(recipe: Recipe, step: int, loss: float, grad_norm: float, last_checkpoint) -> str:
    t = recipe.train
    kept = (
        f"the last good checkpoint is {last_checkpoint} (continue from it with train.resume={last_checkpoint})"
        if last_checkpoint
        else "no checkpoint was written before (output.save_every)"
    )
    return (
        f"training stopped at step {step}: the loss ({loss:.4g}) or gradient norm ({grad_norm:.4g}) was not "
        f"finite for {t.max_bad_steps} steps in a row (train.max_bad_steps). The run diverged: lower train.lr "
        f"(now {t.lr:g}), add train.warmup_steps, or keep train.max_grad_norm > 0; {kept}"
    )


def out_of_memory_message(recipe: Recipe, step: int, checkpoint) -> str:
    """The settings that lower GPU memory, cheapest in quality first, as `key=value` overrides."""
    t, d, m = recipe.train, recipe.data, recipe.memory
    resumable: list[str] = []  # these can continue from the checkpoint
    if not t.gradient_checkpointing:
        resumable.append("train.gradient_checkpointing=true (keeps ~1/10 of the activations, ~30% slower)")
    if m.base_dtype in ("bf16", "fp32"):
        resumable.append("memory.base_dtype=fp8 (halves the base weights)")
    if t.batch_size > 1:
        resumable.append(
            f"train.batch_size=1 train.grad_accum={t.batch_size * t.grad_accum} (same effective batch)"
        )
    fresh = [  # these change what the saved state means: a new run
        f"data.frames={max(1, (d.frames - 1) // 2)} or data.width={d.width * 3 // 4} "
        f"data.height={d.height * 3 // 4} (activations scale with frames x width x height)"
    ]
    if t.optimizer != "adamw8bit":
        fresh.append("train.optimizer=adamw8bit")
    saved = f"; the state before this step is saved in {checkpoint}" if checkpoint else ""
    then = (
        f"with train.resume=latest: {'; '.join(resumable)}. Or start a new run with: {'; '.join(fresh)}"
        if resumable
        else f"a new run with: {'; '.join(fresh)}"
    )
    return (
        f"out of GPU memory at step {step}{saved}. Lower the memory use: rerun {then}. "
        "`finetune estimate RECIPE` shows what fits"
    )
