"""The training loop: one function, read top to bottom.

cache (encoders loaded, used, freed) -> transformer + LoRA -> flow-matching steps -> adapter + card + recipe.

Built to be left alone overnight: full-state checkpoints (finetune.checkpoint) every output.save_every steps and
on Ctrl-C/SIGTERM, exact resume with train.resume, non-finite steps skipped (finetune.guards), validation samples
and a held-out loss (finetune.validation), CSV/tensorboard/W&B logs (finetune.logs).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from pathlib import Path

import torch

from finetune import experts, objectives
from finetune.cache import build_cache, encode_device
from finetune.checkpoint import (
    batch_generator,
    batch_stream,
    capture_rng,
    check_compatible,
    check_disk_space,
    checkpoint_dirs,
    data_signature,
    find_checkpoint,
    load_checkpoint,
    restore_lora,
    restore_rng,
    restore_schedule,
    state_bytes,
    write_checkpoint,
)
from finetune.config import Recipe, save_recipe
from finetune.data.batches import CachedItems, collate, extras_of
from finetune.ema import EMA_NAME, LoraEMA
from finetune.errors import UserError
from finetune.guards import StopOnSignal, bad_steps_message, gradient_norm, out_of_memory_message
from finetune.hub import model_card
from finetune.io import atomic_write_text
from finetune.logs import TrainingLog, summary
from finetune.lora import add_lora, save_adapter, target_modules, write_extra_formats
from finetune.memory import apply_memory_plan
from finetune.models import family_for, resolve_source
from finetune.ui import progress, say
from finetune.validation import Validation, fixed_noise_loss, free_memory, split_holdout

__all__ = ["compute_dtype", "fixed_noise_loss", "lr_factor", "train", "train_expert"]


def compute_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    if device.type == "cpu" or recipe.memory.base_dtype == "fp32":
        if device.type == "cpu" and recipe.memory.base_dtype != "fp32":
            say(
                "note: no GPU, computing in fp32 on the CPU "
                f"(memory.base_dtype={recipe.memory.base_dtype} still sets how the base weights are stored)"
            )
        return torch.float32
    return torch.bfloat16


def lr_factor(step: int, recipe: Recipe, total_steps: int | None = None) -> float:
    """Linear warmup, then constant or cosine down to zero at the last step (of the phase: `total_steps`)."""
    t = recipe.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress_ = (step - t.warmup_steps) / max(1, (total_steps or t.steps) - t.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
    return 1.0


def train(recipe: Recipe) -> Path:
    """One phase for a one-transformer model; Wan 2.2 A14B's experts one after the other, each loaded alone
    and freed before the next (finetune.experts)."""
    for phase_recipe, expert in experts.phases(recipe):
        path = train_expert(phase_recipe, expert)
        free_memory()  # the finished expert's weights, before the next one loads
    return path


def train_expert(recipe: Recipe, expert: experts.Expert) -> Path:
    """Trains `expert.component` on its noise levels for the steps [expert.first_step, expert.last_step)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    source = resolve_source(recipe.model)
    family = family_for(recipe.model, source)
    out_dir = Path(recipe.output.dir)
    checkpoints = out_dir / "checkpoints"
    t = recipe.train
    began = time.perf_counter()

    # 0. Resuming: read the checkpoint and check the recipe against it before anything heavy is loaded.
    resumed = None
    if t.resume:
        resumed = load_checkpoint(find_checkpoint(t.resume, out_dir))
        for note in check_compatible(resumed.recipe, recipe.model_dump(mode="json"), resumed.folder):
            say(note)
        if resumed.step >= t.steps:
            raise UserError(
                f"train.resume: {resumed.folder} is at step {resumed.step} and train.steps={t.steps}; "
                "raise train.steps to train further"
            )
        say(f"resuming from {resumed.folder} (step {resumed.step} of {t.steps})")

    # 1. The cache stage runs first (it encodes only what is missing) and frees the VAE and text encoder, so
    #    they are never on the GPU together with the transformer.
    #    Under `accelerate launch` the processes take turns: the main process encodes what is missing, the
    #    others then find every shard cached (the cache lock admits one process at a time).
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    for turn in range(accelerator.num_processes):
        if turn == accelerator.process_index:
            cache = build_cache(recipe, family, source)
        accelerator.wait_for_everyone()
    train_files, holdout_files = split_holdout(cache.files, t.validation.holdout, t.seed)

    # 2. The transformer, frozen, with LoRA on every targeted block linear. Under `accelerate launch` every
    #    process holds a copy (DDP); only the main process writes files.
    device, main = accelerator.device, accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    dtype = compute_dtype(recipe, device)
    set_seed(t.seed)
    # Validation encodes its prompts now, while the text encoder can still have the GPU to itself.
    validation = None
    if t.validation.every and main:
        validation = Validation(recipe, family, source, holdout_files, device, encode_device()[1],
                                clip_for_images=(holdout_files or train_files or [None])[0])  # fmt: skip
    say(f"loading the {family.name} transformer from {source.transformer}")
    transformer = family.load_transformer(expert.source(source), dtype)
    # The memory plan (base dtype, checkpointing, ...; memory.plan=auto picks one) and the estimate: memory.py.
    plan = apply_memory_plan(transformer, recipe, device, family)
    modules = target_modules(family, transformer, recipe.lora.targets)
    trainable = add_lora(transformer, recipe.lora, modules)
    say(f"LoRA rank {recipe.lora.rank} on {len(modules)} layers: {trainable:,} trainable parameters")
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = plan.finish(transformer, params)  # places the model on the GPU (or swaps blocks), optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe, expert.steps))
    ema = LoraEMA(transformer, t.ema) if t.ema else None
    transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[False, False])
    model = accelerator.unwrap_model(transformer)  # the module itself, for saving and sampling
    # Flow matching (on the expert's own noise levels), or the family's own objective (CogVideoX).
    objective = objectives.for_family(family, source, t, expert.sigma_range)

    # 3. Where the run stands: fresh, or the checkpoint's weights, moments, schedule, losses and data position.
    step0, batches, losses, skipped, val_losses = expert.first_step, 0, [], 0, {}
    signature = data_signature(train_files, t.batch_size, t.seed)
    stream = {"seed": t.seed, "offset": 0}  # the batch stream in use and the batch count where it started
    if resumed:
        restore_lora(model, resumed.lora, resumed.folder)
        restore_schedule(resumed, optimizer, scheduler, t.lr)
        done = resumed.progress
        step0, batches, losses, skipped = resumed.step, done["batches"], done["losses"], done["skipped"]
        val_losses = {int(k): v for k, v in done["val_losses"].items()}
        stream = done["stream"]
        if done["data"] != signature:  # other clips, captions, batch size or seed: a new order from here
            say(
                "note: the cached data or batch size changed since the checkpoint; the data order starts anew"
            )
            stream = {"seed": t.seed + step0, "offset": batches}
        if ema and (resumed.folder / EMA_NAME).is_file():
            from safetensors.torch import load_file

            ema.load(load_file(str(resumed.folder / EMA_NAME)))

    # 4. Data: cached latents and text, batched by shape, in a seeded order that resumes where it stopped. Each
    #    process takes every world-th batch, so 2 processes see what 1 process with twice the grad_accum sees.
    sampler = batch_stream(train_files, t.batch_size, stream["seed"], batches - stream["offset"])
    loader = torch.utils.data.DataLoader(
        CachedItems(train_files, cache.text_choice),  # caption variant per load; data.caption_dropout
        batch_sampler=itertools.islice(sampler, rank, None, world),
        collate_fn=lambda items: collate(items, recipe.cache.max_sequence_length),
        num_workers=t.num_workers,
    )
    batch_iter = iter(loader)
    if resumed:
        restore_rng(resumed.rng)  # after iter(loader), which draws its base seed from the torch RNG

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
            "items": len(train_files),
            "width": cache.shape.width,
            "height": cache.shape.height,
            "frames": cache.shape.frames,
            "trigger": recipe.data.trigger,
            "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "recipe_hash": recipe.digest(),
            "expert": expert.name,  # Wan 2.2 A14B: high | low (None: a one-transformer model)
        }
        adapter = save_adapter(model, folder, info, expert.weights_name)
        # The ComfyUI / peft copies, when asked for; a low-phase checkpoint also gets the finished high adapter.
        write_extra_formats(folder, recipe.output.formats, expert.weights_name)
        experts.copy_finished(out_dir, folder, expert)
        info["experts"] = experts.present(folder)  # the card names both files of a two-expert adapter
        if ema:
            ema.save(folder)
        atomic_write_text(folder / "README.md", model_card(info))
        save_recipe(recipe, folder / "recipe.yaml")
        return adapter

    def save_checkpoint(steps_done: int, rng: dict) -> Path:
        """Only the main process writes (the optimizer state is the same on every process under DDP)."""
        progress_now = {
            "batches": batches,
            "stream": stream,
            "data": signature,
            "losses": losses,
            "skipped": skipped,
            "val_losses": val_losses,
            "expert": expert.name,  # which expert this checkpoint trains (None: a one-transformer model)
        }
        if main:
            write_checkpoint(checkpoints, steps_done, write_adapter, optimizer, scheduler, rng, progress_now,
                             recipe.output.keep_last, state_bytes(params, optimizer))  # fmt: skip
        accelerator.wait_for_everyone()
        return checkpoints / f"step-{steps_done}"

    def validate(folder: Path, steps_done: int, tag: str) -> None:
        """Samples (and the held-out loss) with the training's random state set aside and put back."""
        rng = capture_rng()
        try:
            if tag == "base":  # the same prompts without the adapter, once, for comparison
                model.disable_adapters()
                try:
                    validation.samples(model, folder, log, steps_done, tag)
                finally:
                    model.enable_adapters()
                return
            val_loss = validation.loss(model)
            if val_loss is not None:
                val_losses[steps_done] = val_loss
                log.record_validation(steps_done, val_loss)
            validation.samples(model, folder, log, steps_done, tag)
        finally:
            restore_rng(rng)

    if main and recipe.output.save_every:
        check_disk_space(checkpoints, state_bytes(params, optimizer))  # fail now, not at step 250 overnight
    last_checkpoint = (
        checkpoint_dirs(checkpoints)[-1][1] if resumed and checkpoint_dirs(checkpoints) else None
    )

    # 5. The loop. One step = grad_accum micro-batches on each process, then one optimizer update. A non-finite
    #    loss or gradient skips the update; SIGINT/SIGTERM stop after the step with a checkpoint.
    bad_in_a_row, smoothed = 0, None
    with TrainingLog(out_dir / "logs", t.log, step0, recipe.model_dump(mode="json"), enabled=main) as log, \
            StopOnSignal() as stop:  # fmt: skip
        if validation and not (out_dir / "samples" / "base").is_dir():
            validate(out_dir / "samples" / "base", 0, "base")
        bar = progress(range(step0, expert.last_step), initial=step0, total=t.steps, unit="step",
                       desc="training" if expert.name is None else f"training the {expert.label}",
                       disable=not main)  # fmt: skip
        for step in bar:
            started = time.perf_counter()
            rng_before = capture_rng()  # an out-of-memory checkpoint is the state before this step
            try:
                step_loss = 0.0
                for micro in range(t.grad_accum):
                    index = batches + micro * world + rank  # this batch's place in the whole run's stream
                    batch = next(batch_iter)
                    x0 = batch["latents"].to(device, dtype)
                    text = batch["text"].to(device, dtype)
                    extras = extras_of(
                        batch, device, dtype
                    )  # conditioning, pooled text: what else was cached
                    noise_rng = batch_generator(t.seed, index, device)
                    noise = torch.randn(x0.shape, generator=noise_rng, device=device, dtype=dtype)
                    # Gradients are averaged across processes only on the last micro-batch.
                    last = micro == t.grad_accum - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(transformer):
                        # Sigmas, then which clips are image-conditioned: one seeded stream per batch.
                        draws = batch_generator(t.seed, index)
                        noisy, timesteps, target = objective.noise(x0, noise, draws)
                        # Wan TI2V-5B, LTX: a clean first frame is given (timestep 0 on its tokens), not scored.
                        share = t.first_frame_conditioning
                        noisy, timesteps, keep = objectives.condition(
                            family, x0, noisy, timesteps.to(device), extras, share, draws
                        )
                        prediction = family.predict(transformer, noisy, timesteps, text, extras)
                        loss = objectives.loss(prediction, target, keep)
                        accelerator.backward(loss / t.grad_accum)
                    step_loss += loss.item() / t.grad_accum
                grad_norm = gradient_norm(params, t.max_grad_norm, accelerator)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                free_memory()
                saved = save_checkpoint(step, rng_before) if step > step0 else last_checkpoint
                raise UserError(out_of_memory_message(recipe, step + 1, saved)) from None
            # Every process must agree on skipping and stopping: average the loss (NaN anywhere is NaN here).
            shared = torch.tensor([step_loss, float(stop.requested is not None)], device=device)
            if world > 1:
                shared = accelerator.reduce(shared, "mean")
            step_loss, stopping = shared[0].item(), shared[1].item() > 0
            good = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if good:
                optimizer.step()
                if ema:
                    ema.update()
                losses.append(step_loss)
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                skipped += 1
            with warnings.catch_warnings():  # after a skipped first update torch warns about the order
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            batches += t.grad_accum * world
            done = step + 1

            seconds = time.perf_counter() - started
            lr = scheduler.get_last_lr()[0]
            log.record(done, step_loss, lr, grad_norm, seconds, skipped=not good)
            if good:
                smoothed = step_loss if smoothed is None else 0.9 * smoothed + 0.1 * step_loss
            postfix = {
                "loss": f"{smoothed or float('nan'):.4f}",
                "lr": f"{lr:.1e}",
                "s/step": f"{seconds:.2f}",
            }
            if device.type == "cuda":
                postfix["peak"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}GiB"
            if skipped:
                postfix["skipped"] = skipped
            bar.set_postfix(postfix)
            if bad_in_a_row >= t.max_bad_steps:
                raise UserError(bad_steps_message(recipe, done, step_loss, grad_norm, last_checkpoint))
            if validation and done % t.validation.every == 0:
                validate(out_dir / "samples" / f"step-{done}", done, "samples")
            if world > 1 and t.validation.every and done % t.validation.every == 0:
                accelerator.wait_for_everyone()
            periodic = recipe.output.save_every and (
                done % recipe.output.save_every == 0 or done == expert.last_step
            )
            if stopping or (
                periodic and bad_in_a_row == 0
            ):  # a checkpoint in a bad streak would be no better
                last_checkpoint = save_checkpoint(done, capture_rng())
            if stopping:
                say(
                    f"stopped at step {done} of {t.steps} ({stop.requested}); checkpoint: {last_checkpoint}\n"
                    "continue with the same `finetune train` command plus train.resume=latest"
                )
                raise KeyboardInterrupt

    # 6. The adapter, its card and the resolved recipe.
    path = out_dir / expert.weights_name
    if main:
        path = write_adapter(out_dir, expert.last_step)
        places = {
            "adapter": path.parent,
            "checkpoints": checkpoints if checkpoint_dirs(checkpoints) else None,
            "samples": out_dir / "samples" if validation else None,
            "logs": f"{out_dir / 'logs'} (tensorboard --logdir {out_dir / 'logs'})",
        }
        say(summary(t.steps, time.perf_counter() - began, skipped, val_losses, places))
        if losses:
            tail = losses[-max(1, len(losses) // 10) :]
            say(f"loss {losses[0]:.4f} at the first step -> {sum(tail) / len(tail):.4f} over the last steps")
    accelerator.wait_for_everyone()
    return path
