"""The training loop: one function, read top to bottom.

cache (encoders loaded, used, freed) -> transformer + LoRA -> flow-matching steps -> adapter + card + recipe.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from finetune import flow
from finetune.cache import build_cache
from finetune.config import Recipe, save_recipe
from finetune.data.batches import CachedItems, bucket_batches, collate
from finetune.errors import UserError
from finetune.hub import model_card
from finetune.io import atomic_dir, atomic_write_text
from finetune.lora import add_lora, save_adapter, target_modules
from finetune.models import family_for, resolve_source
from finetune.ui import progress, say, warn


def compute_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    if device.type == "cpu" or recipe.memory.base_dtype == "fp32":
        if device.type == "cpu" and recipe.memory.base_dtype != "fp32":
            say(
                f"note: no GPU, training in fp32 on the CPU (memory.base_dtype={recipe.memory.base_dtype} applies on CUDA)"
            )
        return torch.float32
    return torch.bfloat16


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            # 8-bit moments: 2 bytes per LoRA parameter instead of 8 (~66 MB saved at rank 32 on Wan 1.3B).
            return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
        except Exception as exc:  # not installed, or no build for this platform
            warn(f"train.optimizer=adamw8bit needs bitsandbytes ({type(exc).__name__}: {exc}); using adamw")
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup, then constant or cosine down to zero at the last step."""
    t = recipe.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress_ = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
    return 1.0


class TrainingLog:
    """Per-step numbers to `logs/loss.csv` (always) and tensorboard (when installed)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / "loss.csv", "w", newline="")  # noqa: SIM115 (closed in __exit__)
        self.rows = csv.writer(self.file)
        self.rows.writerow(["step", "loss", "lr", "grad_norm", "seconds"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(folder))
        except ImportError:
            self.board = None
            warn("tensorboard is not installed; logging to CSV only")

    def record(self, step: int, loss: float, lr: float, grad_norm, seconds: float) -> None:
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        self.rows.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{norm:.4f}", f"{seconds:.3f}"])
        if self.board:
            self.board.add_scalar("train/loss", loss, step)
            self.board.add_scalar("train/lr", lr, step)

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if self.board:
            self.board.close()


def train(recipe: Recipe) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    source = resolve_source(recipe.model)
    family = family_for(recipe.model, source)
    out_dir = Path(recipe.output.dir)
    t = recipe.train

    # 1. The cache stage runs first (it encodes only what is missing) and frees the VAE and text encoder, so
    #    they are never on the GPU together with the transformer.
    cache = build_cache(recipe, family, source)

    # 2. The transformer, frozen, with LoRA on every targeted block linear.
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    dtype = compute_dtype(recipe, device)
    set_seed(t.seed)
    say(f"loading the {family.name} transformer from {source.transformer}")
    transformer = family.load_transformer(source, dtype)
    if recipe.memory.base_dtype == "fp8" and device.type == "cuda":
        # float8 storage halves the base weights (1.3B: 2.6 -> 1.3 GB); each layer is upcast to bf16 as it runs.
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    if t.gradient_checkpointing:
        # Keeps only each block's input for backward and recomputes the rest: at 832x480x81 on Wan 1.3B this is
        # the difference between ~155 GB and ~13 GB of activations, for ~30% more compute.
        transformer.enable_gradient_checkpointing()
    modules = target_modules(family, transformer, recipe.lora.targets)
    trainable = add_lora(transformer, recipe.lora, modules)
    say(f"LoRA rank {recipe.lora.rank} on {len(modules)} layers: {trainable:,} trainable parameters")
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe))
    transformer, optimizer = accelerator.prepare(transformer, optimizer)

    # 3. Data: cached latents and text, batched by shape, in a seeded order.
    loader = torch.utils.data.DataLoader(
        CachedItems(cache.files),
        batch_sampler=bucket_batches(cache.files, t.batch_size, t.seed),
        collate_fn=lambda items: collate(items, recipe.cache.max_sequence_length),
        num_workers=t.num_workers,
    )
    batches = iter(loader)
    shift = t.flow_shift or family.flow_shift
    sigma_rng = torch.Generator().manual_seed(t.seed)
    noise_rng = torch.Generator(device).manual_seed(t.seed)

    def write_adapter(folder: Path, steps_done: int) -> Path:
        """Adapter + model card + resolved recipe: a checkpoint is as usable as the final adapter."""
        tail = losses[-max(1, len(losses) // 10) :]
        info = {
            "name": out_dir.resolve().name,
            "family": family.name,
            "base_model": recipe.model.base or recipe.model.path,
            "rank": recipe.lora.rank,
            "alpha": recipe.lora.alpha,
            "targets": recipe.lora.targets,
            "lora_layers": len(modules),
            "steps": steps_done,
            "lr": t.lr,
            "items": len(cache.files),
            "width": cache.shape.width,
            "height": cache.shape.height,
            "frames": cache.shape.frames,
            "trigger": recipe.data.trigger,
            "final_loss": sum(tail) / len(tail),
            "recipe_hash": recipe.digest(),
        }
        adapter = save_adapter(accelerator.unwrap_model(transformer), folder, info)
        atomic_write_text(folder / "README.md", model_card(info))
        save_recipe(recipe, folder / "recipe.yaml")
        return adapter

    # 4. The loop. One step = grad_accum micro-batches, then one optimizer update.
    losses: list[float] = []
    smoothed = None
    with TrainingLog(out_dir / "logs") as log:
        bar = progress(range(t.steps), desc="training", unit="step")
        for step in bar:
            started = time.perf_counter()
            step_loss = 0.0
            for _ in range(t.grad_accum):
                batch = next(batches)
                x0 = batch["latents"].to(device, dtype)
                text = batch["text"].to(device, dtype)
                noise = torch.randn(x0.shape, generator=noise_rng, device=device, dtype=dtype)
                sigmas = flow.sample_sigmas(len(x0), t.timestep_sampling, shift, sigma_rng)
                noisy = flow.add_noise(x0, noise, sigmas)
                timesteps = flow.timesteps_from_sigmas(sigmas).to(device)
                prediction = family.predict(transformer, noisy, timesteps, text)
                loss = flow.flow_loss(prediction, flow.velocity_target(x0, noise))
                accelerator.backward(loss / t.grad_accum)
                step_loss += loss.item() / t.grad_accum
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - started
            losses.append(step_loss)
            smoothed = step_loss if smoothed is None else 0.9 * smoothed + 0.1 * step_loss
            lr = scheduler.get_last_lr()[0]
            log.record(step + 1, step_loss, lr, grad_norm, seconds)
            postfix = {"loss": f"{smoothed:.4f}", "lr": f"{lr:.1e}", "s/step": f"{seconds:.2f}"}
            if device.type == "cuda":
                postfix["peak"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}GiB"
            bar.set_postfix(postfix)
            if not math.isfinite(step_loss):
                raise UserError(f"training diverged at step {step + 1} (loss {step_loss}); lower train.lr")
            if recipe.output.save_every and (step + 1) % recipe.output.save_every == 0 and step + 1 < t.steps:
                with atomic_dir(out_dir / "checkpoints" / f"step-{step + 1}") as folder:
                    write_adapter(folder, step + 1)

    # 5. The adapter, its card and the resolved recipe.
    path = write_adapter(out_dir, t.steps)
    tail = losses[-max(1, len(losses) // 10) :]
    say(
        f"adapter: {path}  (loss {losses[0]:.4f} at step 1 -> {sum(tail) / len(tail):.4f} over the last steps)"
    )
    return path


@torch.no_grad()
def fixed_noise_loss(
    transformer, family, files: list[Path], text_length: int, seed: int = 0, sigmas=(0.25, 0.5, 0.75)
):
    """Flow loss on cached items at fixed sigmas and fixed noise: a learning signal without sampling noise
    (the training loss jumps with each step's random sigma and noise)."""
    from safetensors.torch import load_file

    param = next(transformer.parameters())
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for path in files:
        batch = collate([load_file(str(path))], text_length)
        x0 = batch["latents"].to(param.device, torch.float32)
        text = batch["text"].to(param.device, torch.float32)
        for sigma in sigmas:
            s = torch.tensor([sigma])
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            prediction = family.predict(
                transformer, flow.add_noise(x0, noise, s), flow.timesteps_from_sigmas(s), text
            )
            total += flow.flow_loss(prediction, flow.velocity_target(x0, noise)).item()
            count += 1
    return total / count
