"""GPU benchmark of the recipe tiers: measured peak VRAM and speed beside `finetune estimate`'s figure.

    python tools/bench.py                      # every tier recipe + the unconstrained baselines -> docs/benchmarks.md
    python tools/bench.py --recipes recipes/wan/wan2.1-t2v-1.3b_8gb.yaml --steps 3 --out /tmp/bench.md

For each recipe it builds the real-size transformer from the shipped config with random weights (no
download, no network), applies the recipe's memory plan with the same code as `finetune train`
(finetune.memory), caps the process at the recipe's card size with torch.cuda.set_per_process_memory_fraction
(an 8/12/16/24 GB card on a bigger GPU), and runs a few LoRA training steps on random latents at the recipe's
size. It records peak allocated and reserved memory, seconds per step, tokens per second and MFU, and, in the
same run, the unconstrained baseline (bf16 base, whole-block gradient checkpointing, no cap) of each model.
Each row runs in its own process, so peaks and caps never leak between rows. A row that runs out of memory
is reported as such. Meant to finish within ~20 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every tier recipe (`<model>_<N>gb.yaml`) of every family, each model's largest card first.
TIERS = sorted(
    (str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*/*_*gb.yaml")),
    key=lambda r: (
        Path(r).parent.name,
        Path(r).stem.rsplit("_", 1)[0],
        -float(Path(r).stem.rsplit("_", 1)[1][:-2]),
    ),
)
# The plan of the unconstrained baseline each tier's speed is compared with.
BASELINE = [
    "memory.base_dtype=bf16", "memory.activation_offload=false", "memory.blocks_to_swap=0", "memory.ffn_chunks=0",
    "train.gradient_checkpointing=true",
]  # fmt: skip
# Dense bf16 tensor-core peaks (TFLOPS) for MFU; --peak-tflops overrides, unknown GPUs report no MFU.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


@dataclass
class Row:
    name: str
    recipe: str
    overrides: list[str]
    cap_gb: float | None  # None: unconstrained
    status: str = "ok"  # ok | out of memory | error: ...
    peak_allocated_gb: float | None = None
    peak_reserved_gb: float | None = None
    estimated_gb: float | None = None  # finetune estimate's training figure (allocated + margin + context)
    estimated_allocated_gb: float | None = None  # the traced allocated peak alone, comparable to allocated
    s_per_step: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    baseline_s_per_step: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=TIERS, help="recipes to run (default: the tiers)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per row (the first is warm-up)")
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown file to write")
    parser.add_argument("--no-cap", action="store_true", help="do not cap memory at the recipe's card size")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unconstrained baselines")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row (JSON) in this process
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    return args


def card_gb(recipe: str) -> float | None:
    """The card size a tier recipe is named for: `..._8gb.yaml` -> 8."""
    stem = Path(recipe).stem
    tail = stem.rsplit("_", 1)[-1]
    return float(tail[:-2]) if tail.endswith("gb") and tail[:-2].isdigit() else None


def plan_rows(args: argparse.Namespace) -> list[Row]:
    rows, baselines = [], {}
    for recipe in args.recipes:
        cap = None if args.no_cap else card_gb(recipe)
        rows.append(Row(Path(recipe).stem, recipe, [], cap))
        model = model_of(recipe)
        if not args.no_baseline and model not in baselines:
            baselines[model] = Row(
                f"{model} baseline (bf16, checkpointing, no cap)", recipe, list(BASELINE), None
            )
    return list(baselines.values()) + rows


def model_of(recipe: str) -> str:
    """The model a tier recipe trains (its file name before `_<N>gb`): one baseline per model."""
    return Path(recipe).stem.rsplit("_", 1)[0]


def cpu_attention_flops() -> dict:
    """torch's FLOP formulas cover the CUDA attention kernels; the trace runs on the CPU's flash kernel."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)
        ),
    }


def step_flops(recipe) -> float:
    """Model FLOPs of one LoRA training step at the recipe's size, as PyTorch dispatches them: forward and
    backward counted by torch's FlopCounterMode on fake tensors (no weights, no compute), without the
    recomputation of gradient checkpointing (MFU counts model work, not the memory plan's extra work); frozen
    weights get no weight gradients, so a block linear costs 2 (forward) + 2 (input gradient) FLOPs per weight
    and token. Traced with 2 and 3 blocks and extended to all of them, like `finetune estimate`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finetune import flow
    from finetune.estimate import plan_recipe
    from finetune.lora import add_lora, target_modules
    from finetune.real_models import (
        diffusers_class,
        fake_extras,
        family_of,
        kwargs_of,
        latent_shape,
        model_configs,
    )
    from finetune.tracing import fake_mode, fake_module_to, keep_in_fp32

    family, config = family_of(recipe), model_configs(recipe).transformer
    plain = plan_recipe(recipe, base_dtype="bf16", blocks_to_swap=0, activation_offload=False, ffn_chunks=0)

    def count(layers: int) -> int:
        with fake_mode(torch.bfloat16), fake_module_to():
            model = diffusers_class(config)(**kwargs_of({**config, "num_layers": layers}))
            keep_in_fp32(model)
            add_lora(model, plain.lora, target_modules(family, model, plain.lora.targets))
            latent = latent_shape(plain, family, config, 1)
            x0 = torch.randn(latent)
            text_len = plain.cache.max_sequence_length
            text = torch.randn(1, text_len, config[family.text_dim_key])
            extras = fake_extras(family, config, latent, text_len)
            sigmas = torch.full((1,), 0.5)
            counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
            with counter, torch.autocast("cpu", dtype=torch.bfloat16):
                noisy = flow.add_noise(x0, torch.randn_like(x0), sigmas)
                out = family.predict(model, noisy, flow.timesteps_from_sigmas(sigmas), text, extras)
                out.float().square().mean().backward()
            return counter.get_total_flops()

    two, three = count(2), count(3)
    return float(two + (config["num_layers"] - 2) * (three - two))


def gpu_peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _fmt(value, spec: str = ".2f", empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def markdown(rows: list[Row], info: dict) -> str:
    """docs/benchmarks.md: the measured table with the estimate beside each row."""
    lines = [
        GPU_START,
        "## GPU: memory and speed per recipe",
        "",
        f"GPU: {info.get('gpu', '?')} · torch {info.get('torch', '?')} · diffusers {info.get('diffusers', '?')} · "
        f"bitsandbytes {info.get('bitsandbytes', '?')} · {info.get('date', '?')}",
        "",
        f"Command: `{info.get('command', 'python tools/bench.py')}`",
        "",
        "Random-weight real-size transformers, LoRA rank 32 on every block linear, batch 1, one training step at the "
        "recipe's size (832x480x81 = 32,760 tokens unless the recipe says otherwise). Memory is PyTorch's peak "
        "(GiB); the card cap is `torch.cuda.set_per_process_memory_fraction` at the card size less 0.5 GiB for the "
        "CUDA context. *Estimated* is `finetune estimate`'s "
        "training figure (traced allocated peak + 8% margin + 0.5 GiB CUDA context); *error* compares the traced "
        "allocated peak with the measured allocated peak. Speed is relative to the model's unconstrained baseline.",
        "",
        "| row | cap GiB | status | peak allocated | peak reserved | estimated (allocated) | error | s/step | "
        "× baseline | tokens/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = None
        if r.peak_allocated_gb and r.estimated_allocated_gb:
            error = 100 * (r.estimated_allocated_gb - r.peak_allocated_gb) / r.peak_allocated_gb
        slowdown = r.s_per_step / r.baseline_s_per_step if r.s_per_step and r.baseline_s_per_step else None
        estimated = (
            f"{_fmt(r.estimated_gb)} ({_fmt(r.estimated_allocated_gb)})"
            if r.estimated_gb is not None
            else "–"
        )
        lines.append(
            f"| {r.name} | {_fmt(r.cap_gb, '.0f', 'none')} | {r.status} | {_fmt(r.peak_allocated_gb)} | "
            f"{_fmt(r.peak_reserved_gb)} | {estimated} | {_fmt(error, '+.1f')}{'%' if error is not None else ''} | "
            f"{_fmt(r.s_per_step)} | {_fmt(slowdown)} | {_fmt(r.tokens_per_s, ',.0f')} | "
            f"{_fmt(None if r.mfu is None else 100 * r.mfu, '.1f')}{'%' if r.mfu is not None else ''} |"
        )
    return "\n".join(lines + [GPU_END]) + "\n"


GPU_START, GPU_END = "<!-- tools/bench.py: GPU section -->", "<!-- end of GPU section -->"


def merge_section(existing: str, section: str) -> str:
    """The benchmarks page keeps its other sections (e.g. CPU caching throughput): only the GPU section, between
    its markers, is replaced; a page without one gets it after its title and intro."""
    if GPU_START in existing and GPU_END in existing:
        head, rest = existing.split(GPU_START, 1)
        return head + section.rstrip("\n") + rest.split(GPU_END, 1)[1]
    if not existing.strip():
        return "# Benchmarks\n\n" + section
    first_section = existing.find("\n## ")
    if first_section == -1:
        return existing.rstrip("\n") + "\n\n" + section
    return existing[: first_section + 1] + section + "\n" + existing[first_section + 1 :]


# --- one row, in its own process ----------------------------------------------------------------------------


def run_row(row: Row, steps: int, peak_tflops: float | None) -> Row:
    import torch

    from finetune import flow
    from finetune.config import load_recipe
    from finetune.estimate import CUDA_CONTEXT_GIB
    from finetune.lora import add_lora, target_modules
    from finetune.memory import apply_memory_plan
    from finetune.real_models import fake_extras, family_of, latent_shape, model_configs

    recipe = load_recipe(ROOT / row.recipe, row.overrides)
    family = family_of(recipe)
    config = model_configs(recipe).transformer
    flops = step_flops(recipe)  # on fake tensors, before anything is on the GPU
    device = torch.device("cuda")
    transformer = _random_transformer(config)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if row.cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        # A card of cap_gb also holds the CUDA context (outside PyTorch's allocator): leave it room.
        usable = (row.cap_gb - CUDA_CONTEXT_GIB) * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, usable / total), device)
    # The training path of finetune/train.py: plan, LoRA, placement + optimizer, autocast bf16.
    plan = apply_memory_plan(transformer, recipe, device, family)
    add_lora(transformer, recipe.lora, target_modules(family, transformer, recipe.lora.targets))
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = plan.finish(transformer, params)
    latent = latent_shape(recipe, family, config, 1)
    pt, ph, pw = family.patch
    tokens = latent[2] // pt * (latent[3] // ph) * (latent[4] // pw)
    text_len = recipe.cache.max_sequence_length
    text = torch.randn(1, text_len, config[family.text_dim_key], device=device, dtype=torch.bfloat16)
    extras = {k: v.to(device) for k, v in fake_extras(family, config, latent, text_len).items()}
    times = []
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            x0 = torch.randn(latent, device=device, dtype=torch.bfloat16)
            noise = torch.randn_like(x0)
            sigmas = torch.rand(1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                prediction = family.predict(
                    transformer,
                    flow.add_noise(x0, noise, sigmas),
                    flow.timesteps_from_sigmas(sigmas).to(device),
                    text,
                    extras,
                )
            loss = flow.flow_loss(prediction, flow.velocity_target(x0, noise))
            del prediction
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            if not torch.isfinite(loss):
                row.status = "error: non-finite loss"
    except torch.OutOfMemoryError:
        row.status = "out of memory"
    row.peak_allocated_gb = torch.cuda.max_memory_allocated() / 2**30
    row.peak_reserved_gb = torch.cuda.max_memory_reserved() / 2**30
    if len(times) >= 2:
        row.s_per_step = sum(times[1:]) / len(times[1:])
        row.tokens_per_s = tokens / row.s_per_step
        peak = gpu_peak_tflops(torch.cuda.get_device_name(device), peak_tflops)
        if peak:
            row.mfu = flops / row.s_per_step / (peak * 1e12)
    return row


def _random_transformer(config: dict):
    """Random bf16 weights, built on the GPU when it fits (fast init), then moved to the host, where
    `finetune train` has it after loading; on a smaller card built on the CPU directly."""
    import torch

    from finetune.real_models import diffusers_class, kwargs_of
    from finetune.tracing import keep_in_fp32

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        try:
            with torch.device("cuda"):
                model = diffusers_class(config)(**kwargs_of(config))
            model = model.cpu()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            model = diffusers_class(config)(**kwargs_of(config))
    finally:
        torch.set_default_dtype(previous)
    keep_in_fp32(model)
    return model


# --- the driver ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.row:
        row = run_row(Row(**json.loads(args.row)), args.steps, args.peak_tflops)
        print("ROW " + json.dumps(asdict(row)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("tools/bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from finetune.config import load_recipe
    from finetune.estimate import CUDA_CONTEXT_GIB, MARGIN, estimate_training

    rows = plan_rows(args)
    baseline_speed: dict[str, float] = {}
    for row in rows:
        estimated, _ = estimate_training(load_recipe(ROOT / row.recipe, row.overrides))
        row.estimated_gb = estimated
        row.estimated_allocated_gb = (estimated - CUDA_CONTEXT_GIB) / (1 + MARGIN)
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, __file__, "--row", json.dumps(asdict(row)), "--steps", str(args.steps)]
            + (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        lines = [x for x in result.stdout.splitlines() if x.startswith("ROW ")]
        if lines:
            measured = Row(**json.loads(lines[-1][4:]))
            measured.estimated_gb, measured.estimated_allocated_gb = (
                row.estimated_gb,
                row.estimated_allocated_gb,
            )
            row.__dict__.update(measured.__dict__)
        else:
            row.status = f"error: {(result.stderr.strip().splitlines() or ['?'])[-1][:120]}"
        if row.cap_gb is None and row.s_per_step:
            baseline_speed[model_of(row.recipe)] = row.s_per_step
        row.baseline_s_per_step = baseline_speed.get(model_of(row.recipe))
        print(f"{row.name}: {row.status}, peak {_fmt(row.peak_allocated_gb)} GiB allocated, "
              f"estimated {_fmt(row.estimated_gb)}, {_fmt(row.s_per_step)} s/step "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    info = _environment(" ".join(["python", "tools/bench.py", *(argv if argv is not None else sys.argv[1:])]))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    from finetune.io import atomic_write_text

    existing = out.read_text(encoding="utf-8") if out.is_file() else ""
    atomic_write_text(out, merge_section(existing, markdown(rows, info)))
    print(f"wrote {out}")
    return 0


def _environment(command: str) -> dict:
    import diffusers
    import torch

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "not installed"
    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "bitsandbytes": bnb,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
