"""`finetune estimate`: peak GPU memory for caching, training and generation, predicted on the CPU in seconds.

How: the real-size model is built from its shipped config (finetune/models/configs, no weights downloaded) on
fake tensors (torch FakeTensorMode: shapes and dtypes, no storage, no compute), the recipe's memory plan is
applied through the same code that training uses (fp8 casting, gradient checkpointing, LoRA in the compute
dtype), and one whole training step is run. A small dispatch mode adds each new tensor storage's bytes and
subtracts them when the storage dies (weakref finalizers), so its peak is what the CUDA caching allocator would
have had allocated. What the trace cannot see is added analytically and named in `assumptions`: bitsandbytes
nf4/int8 layers (traced as fp8, then re-priced), blocks in host memory (block swap), the CUDA context and an
allocator/workspace margin.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch

from finetune.config import Recipe
from finetune.memory import drop_decoder
from finetune.real_models import (
    diffusers_class,
    fake_extras,
    family_of,
    kwargs_of,
    latent_shape,
    model_configs,
    model_extras,
    text_encoder_model,
)
from finetune.tracing import (  # noqa: F401 (LiveBytes, keep_in_fp32: used by tests and tools/bench.py)
    LiveBytes,
    fake_mode,
    fake_module_to,
    keep_in_fp32,
    no_grad_peak,
    offload_hooks,
)

GiB = 2**30
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS/cuDNN handles: outside PyTorch's allocator, inside the card
MARGIN = (
    0.08  # allocator slack (reserved above allocated) and kernel workspaces, as a share of the traced peak
)
# Bytes per weight of a bitsandbytes layer: nf4 packs two weights per byte plus its block scales (64 weights
# per 8-bit absmax, double-quantized); int8 stores one byte plus one fp32 scale per output row.
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


def plan_recipe(recipe: Recipe, **memory) -> Recipe:
    tree = recipe.model_dump()
    tree["memory"].update(memory)
    return Recipe.model_validate(tree)


@dataclass
class TrainTrace:
    peak: int  # bytes on the GPU at the peak, after the analytic adjustments
    at_peak: dict[str, int]
    host_offloaded: int  # peak bytes of activations waiting in host memory
    swapped: int  # bytes of frozen block weights kept in host memory
    weights_full: int  # all frozen weights at their storage dtype after the plan
    loaded: int  # the model as loaded (compute dtype) on the host, before the plan
    assumptions: list[str] = field(default_factory=list)


def trace_training(
    recipe: Recipe, transformer_config: dict, latent: tuple[int, ...], exact: bool = False
) -> TrainTrace:
    """Peak training memory of the transformer under the recipe's plan.

    Every block is the same, so each byte count is affine in the number of blocks N: the step is traced with 2
    and 3 blocks at the full sequence length and extended to N (tests check this against a whole-model trace).
    That is ~10x faster than tracing all 30-40 blocks. `exact=True` traces the whole model."""
    layers = transformer_config["num_layers"]
    if exact or layers <= 3:
        raw = _trace_raw(recipe, transformer_config, latent)
    else:
        two = _trace_raw(recipe, {**transformer_config, "num_layers": 2}, latent)
        three = _trace_raw(recipe, {**transformer_config, "num_layers": 3}, latent)
        raw = {k: two[k] + (layers - 2) * (three[k] - two[k]) for k in two}
        # One block of each list (its weights and size, not a sum), and the lists' lengths; only the first
        # list's length varies between the two traces and is set to the real model's below.
        raw.update({k: v for k, v in three.items() if k.startswith("block.")})
    mem = recipe.memory
    notes = (
        []
        if exact or layers <= 3
        else [
            f"traced with 2 and 3 blocks, extended to {layers} (each byte count is affine in the block count)"
        ]
    )
    peak, weights_full = raw["peak"], raw["weights_full"]
    block_lists = [k.split(".", 2)[2] for k in raw if k.startswith("block.frozen.")]  # in execution order
    block_frozen = {name: raw[f"block.frozen.{name}"] for name in block_lists}
    counts = {name: int(raw[f"block.count.{name}"]) for name in block_lists}
    counts[block_lists[0]] = layers  # the traces vary the first list (num_layers) only
    at_peak = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("at_peak.")}
    if mem.base_dtype in QUANT_BYTES:
        delta = int(raw["linear_params"] * (QUANT_BYTES[mem.base_dtype] - 1.0))
        peak += delta
        at_peak["weights"] += delta
        weights_full += delta
        for name in block_lists:  # one block's linears re-priced the same way
            block_frozen[name] += int(
                raw[f"block.linear_params.{name}"] * (QUANT_BYTES[mem.base_dtype] - 1.0)
            )
        notes.append(
            f"{mem.base_dtype}: traced as fp8 (bitsandbytes has no fake-tensor kernels), block linear weights "
            f"re-priced at {QUANT_BYTES[mem.base_dtype]:.3f} bytes each"
        )
    swapped = 0
    if mem.blocks_to_swap:
        # The last N blocks in execution order are swapped (HunyuanVideo: single-stream ones first, then
        # dual-stream). At most two are on the GPU at once (the one computing, the one being copied in): the
        # estimate keeps the largest two of the swapped set resident.
        order = [name for name in block_lists for _ in range(counts[name])]
        n = min(mem.blocks_to_swap, len(order))
        taken = order[len(order) - n :]
        sizes = sorted((block_frozen[name] for name in taken), reverse=True)
        swapped = sum(sizes)
        saving = swapped - sum(sizes[:2])
        peak -= saving
        at_peak["weights"] -= saving
        if len(block_lists) == 1:
            notes.append(
                f"block swap: {n} blocks x {sizes[0] / GiB:.2f} GiB in pinned host memory, 2 in flight on the GPU"
            )
        else:
            parts = ", ".join(
                f"{taken.count(name)} {name} x {block_frozen[name] / GiB:.2f} GiB"
                for name in reversed(block_lists)
                if name in taken
            )
            notes.append(f"block swap: {n} blocks ({parts}) in pinned host memory, the largest 2 on the GPU")
    if mem.activation_offload:
        notes.append(
            "activation offload: saved tensors copied to host in the trace, brought back for backward"
        )
    return TrainTrace(
        int(peak),
        {k: int(v) for k, v in at_peak.items()},
        int(raw["host_peak"]),
        int(swapped),
        int(weights_full),
        int(raw["loaded"]),
        notes,
    )


def _trace_raw(recipe: Recipe, transformer_config: dict, latent: tuple[int, ...]) -> dict[str, float]:
    """One training step (forward + backward, optimizer state live) on fake tensors, with the recipe's plan
    applied by memory.apply_memory_plan / lora.add_lora. Byte counts, before the analytic adjustments."""
    from finetune import flow, objectives
    from finetune.lora import add_lora, target_modules
    from finetune.memory import all_blocks, apply_memory_plan, blocks_of

    family = family_of(recipe)
    mem = recipe.memory
    quantized = mem.base_dtype in QUANT_BYTES
    # The trace itself runs the fp8 path for nf4/int8 (bitsandbytes kernels have no fake-tensor support):
    # same 1-byte-class storage and per-layer upcast; the weight bytes are re-priced below.
    traced = plan_recipe(
        recipe, base_dtype="fp8" if quantized else mem.base_dtype, blocks_to_swap=0, activation_offload=False
    )
    with fake_mode(torch.bfloat16), fake_module_to():
        transformer = diffusers_class(transformer_config)(**kwargs_of(transformer_config))
        keep_in_fp32(transformer)
        # What `finetune train` holds on the host after loading, before the plan casts or places anything.
        loaded = sum(
            t.untyped_storage().nbytes() for t in [*transformer.parameters(), *transformer.buffers()]
        )
        apply_memory_plan(transformer, traced, torch.device("cpu"), family)
        add_lora(transformer, recipe.lora, target_modules(family, transformer, recipe.lora.targets))
        for module in transformer.modules():  # as MemoryPlan.finish does for a bf16 compute dtype
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
        transformer.train()
        lora = [p for p in transformer.parameters() if p.requires_grad]
        block_linears = [  # what nf4/int8 quantize: the linears of every block list
            m.weight for b in all_blocks(transformer, family) for m in b.modules()
            if type(m) is torch.nn.Linear and not m.weight.requires_grad
        ]  # fmt: skip
        # One block of each list: its frozen bytes (what a swap moves), its frozen linear weights (what
        # nf4/int8 re-price) and the list's length (HunyuanVideo: dual-stream blocks are larger than single).
        per_block = {}
        for name in family.block_lists:
            blocks = blocks_of(transformer, name)
            per_block[f"block.frozen.{name}"] = sum(
                p.untyped_storage().nbytes() for p in blocks[0].parameters() if not p.requires_grad
            )
            per_block[f"block.linear_params.{name}"] = sum(
                m.weight.numel() for m in blocks[0].modules()
                if type(m) is torch.nn.Linear and not m.weight.requires_grad
            )  # fmt: skip
            per_block[f"block.count.{name}"] = len(blocks)

        tracker = LiveBytes()
        with tracker:
            for p in list(transformer.parameters()) + list(transformer.buffers()):
                tracker.add(p, "lora" if p.requires_grad else "weights")
            weights_full = tracker.live["weights"]
            # Optimizer state lives through every step after the first: count it from the start.
            states = []
            for p in lora:
                if recipe.train.optimizer == "adamw":
                    states.append(torch.empty(2 * p.numel(), dtype=torch.float32))
                else:  # two uint8 moments + one fp32 absmax per 256 values each (bitsandbytes blockwise)
                    states.append(
                        torch.empty(2 * p.numel() + 8 * math.ceil(p.numel() / 256), dtype=torch.uint8)
                    )
                tracker.retag(states[-1], "optimizer")
            for p in lora:
                p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "grads"))

            x0 = torch.randn(latent, dtype=torch.bfloat16)
            text_len = recipe.cache.max_sequence_length
            text = torch.randn(latent[0], text_len, transformer_config[family.text_dim_key])
            extras = fake_extras(family, transformer_config, latent, text_len)
            noise = torch.randn_like(x0)
            sigmas = torch.full((latent[0],), 0.5)
            offload = offload_hooks(tracker) if mem.activation_offload else contextlib.nullcontext()
            # CPU autocast stands in for CUDA autocast (accelerate's bf16 mixed precision): matmuls in bf16.
            with torch.autocast("cpu", dtype=torch.bfloat16), offload:
                noisy = flow.add_noise(x0, noise, sigmas)
                # Wan TI2V-5B: per-token timesteps (per-token modulation: (B, tokens, 6, dim) fp32 per block).
                noisy, timesteps, keep = objectives.condition(
                    family, x0, noisy, flow.timesteps_from_sigmas(sigmas), extras
                )
                prediction = family.predict(transformer, noisy, timesteps, text, extras)
                del noisy
            loss = objectives.loss(prediction, flow.velocity_target(x0, noise), keep)
            del prediction
            loss.backward()
            # The optimizer step comes after backward freed the activations: weights + LoRA + grads + state
            # + one fp32 temporary per LoRA weight (torch's foreach AdamW).
            step = tracker.device_bytes() + tracker.live["lora"]
        peak, at_peak = tracker.peak, dict(tracker.at_peak)
        if step > peak:
            peak, at_peak = (
                step,
                {**tracker.live, "activations": tracker.live["activations"] + tracker.live["lora"]},
            )
    # fp8 layers re-store their weights after each upcast, so the traced storages of frozen weights migrate
    # between tags; at rest they are always `weights_full`: everything else at the peak is activations.
    at_peak["activations"] = (
        peak - weights_full - sum(v for k, v in at_peak.items() if k not in ("weights", "activations"))
    )
    at_peak["weights"] = weights_full

    return {
        "peak": peak,
        **{f"at_peak.{k}": v for k, v in at_peak.items()},
        "host_peak": tracker.host_peak,
        "weights_full": weights_full,
        **per_block,
        "linear_params": sum(w.numel() for w in block_linears),
        "loaded": loaded,
    }


def _by_layers(measure, config: dict, *args) -> tuple[int, int]:
    """(weights, peak) of a stack of identical layers, measured with 2 and 3 layers and extended to all of
    them: weights grow by one layer each, a no-grad peak by one layer's weights (activations are freed)."""
    key = "num_layers" if "num_layers" in config else "num_hidden_layers"  # diffusers/T5 | Llama/CLIP
    two = measure({**config, key: 2}, *args)
    three = measure({**config, key: 3}, *args)
    n = config[key]
    return tuple(a + (n - 2) * (b - a) for a, b in zip(two, three, strict=True))


def _text_encoder(config: dict, tokens: int) -> tuple[int, int]:
    tokens = min(tokens, config.get("max_position_embeddings", tokens))  # CLIP-L (HunyuanVideo) reads 77

    def run(model):
        model(
            torch.zeros(1, tokens, dtype=torch.long), attention_mask=torch.ones(1, tokens, dtype=torch.long)
        )

    return no_grad_peak(lambda: text_encoder_model(config), run)


def _vae(config: dict, stride: tuple[int, int], video: tuple[int, ...], tiling: bool, decode: bool, dtype):
    def build():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            vae = diffusers_class(config)(**kwargs_of(config)).eval()
        finally:
            torch.set_default_dtype(previous)
        if tiling:
            vae.enable_tiling()
        if not decode:
            drop_decoder(vae)  # as the cache stage does
        return vae

    def run(vae):
        b, _, f, h, w = video
        channels = config.get("z_dim") or config["latent_channels"]
        if decode:
            latent = (b, channels, (f - 1) // stride[0] + 1, h // stride[1], w // stride[1])
            kwargs = (
                {"temb": torch.tensor([0.05], dtype=dtype)} if config.get("timestep_conditioning") else {}
            )
            vae.decode(torch.randn(latent, dtype=dtype), **kwargs)
        else:
            vae.encode(torch.randn(video, dtype=dtype))

    return no_grad_peak(build, run)


def _transformer_forward(config: dict, family, latent: tuple[int, ...], text_len: int) -> tuple[int, int]:
    def run(model):
        text = torch.randn(latent[0], text_len, config[family.text_dim_key])
        extras = fake_extras(family, config, latent, text_len)
        family.predict(model, torch.randn(latent), torch.tensor([500.0]), text, extras)

    def build():
        model = diffusers_class(config)(**kwargs_of(config)).eval()
        keep_in_fp32(model)
        return model

    return no_grad_peak(build, run)


@dataclass
class Estimate:
    model: str
    width: int
    height: int
    frames: int
    tokens: int
    train_peak_gb: float
    cache_peak_gb: float
    generate_peak_gb: float
    generate_offload_peak_gb: (
        float  # `generate --offload model`: text encoder on the CPU, the rest take turns
    )
    host_train_gb: float
    breakdown: dict[str, dict[str, float]]
    assumptions: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _gb(n: float) -> float:
    return round(n / GiB, 2)


def _with_overheads(allocated: int) -> tuple[float, dict[str, float]]:
    margin = allocated * MARGIN
    total = allocated + margin + CUDA_CONTEXT_GIB * GiB
    return _gb(total), {"workspace_margin": _gb(margin), "cuda_context": CUDA_CONTEXT_GIB}


def estimate(recipe: Recipe) -> Estimate:
    family = family_of(recipe)
    label, tcfg, text_cfgs, vae_cfg = model_configs(recipe)
    frames = family.valid_frames(recipe.data.frames)
    width, height = recipe.data.width, recipe.data.height
    latent = latent_shape(recipe, family, tcfg, recipe.train.batch_size)
    pt, ph, pw = family.patch
    tokens = latent[2] // pt * (latent[3] // ph) * (latent[4] // pw)
    text_len = recipe.cache.max_sequence_length
    mem = recipe.memory
    video = (1, 3, frames, height, width)

    # Training: the transformer only (the cache stage has freed the encoders before it loads).
    tr = trace_training(recipe, tcfg, latent)
    train_gb, train_over = _with_overheads(tr.peak)
    train = {**{k: _gb(v) for k, v in tr.at_peak.items()}, **train_over, "total": train_gb}

    # Caching: the text encoder(s) and the VAE are resident together (cache.py loads them all), one runs at a
    # time.
    encoders = [_by_layers(_text_encoder, cfg, text_len) for cfg in text_cfgs]
    te_weights = sum(w for w, _ in encoders)
    te_act = max(peak - w for w, peak in encoders)
    if mem.text_encoder == "cpu":
        te_gpu, te_act = 0, 0
    elif mem.text_encoder == "int8":
        te_gpu = sum(_int8_weights(cfg) for cfg in text_cfgs)
    else:
        te_gpu = te_weights
    vae_w, vae_peak = _vae(vae_cfg, family.vae_stride, video, mem.vae_tiling, False, torch.float32)
    # Wan I2V's CLIP image encoder comes with the text encoder: on the GPU only when the text encoder is.
    extras = model_extras(recipe)
    image_w = _bf16_weights(extras.image_encoder) if extras.image_encoder else 0
    image_gpu = image_w if mem.text_encoder == "gpu" else 0
    cache_alloc = te_gpu + image_gpu + vae_w + max(te_act, vae_peak - vae_w)
    cache_gb, cache_over = _with_overheads(cache_alloc)
    cache = {
        "text_encoder_weights": _gb(te_gpu),
        "image_encoder_weights": _gb(image_gpu),
        "text_encoder_activations": _gb(te_act),
        "vae_weights": _gb(vae_w),
        "vae_encode_activations": _gb(vae_peak - vae_w),
        **cache_over,
        "total": cache_gb,
    }

    # Generation (`finetune generate`), bf16: the whole pipeline on the GPU with one component running at a time,
    # or (--offload model) each component moved to the GPU only while it runs.
    tf_w, tf_peak = _by_layers(_transformer_forward, tcfg, family, (1, *latent[1:]), text_len)
    dvae_w, dvae_peak = _vae(vae_cfg, family.vae_stride, video, False, True, torch.bfloat16)
    # Wan 2.2 A14B: both experts are resident when nothing is offloaded.
    resident = te_weights + image_w + extras.experts * tf_w + dvae_w
    gen_alloc = resident + max(te_act, tf_peak - tf_w, dvae_peak - dvae_w)
    gen_gb, gen_over = _with_overheads(gen_alloc)
    # --offload model: the text encoder runs on the CPU; the VAE decodes in tiles.
    _, tiled_peak = _vae(vae_cfg, family.vae_stride, video, True, True, torch.bfloat16)
    offload_gb, _ = _with_overheads(max(tf_peak, tiled_peak))
    # --offload blocks: besides, the transformer's blocks stream in one at a time (two resident while copying).
    layers = tcfg.get("num_layers") or tcfg["num_hidden_layers"]
    streamed_gb, _ = _with_overheads(max(tf_peak - tf_w + 2 * tf_w // layers, tiled_peak))
    generate = {
        "text_encoder_weights": _gb(te_weights),
        "image_encoder_weights": _gb(image_w),
        "transformer_weights": _gb(extras.experts * tf_w),
        "vae_weights": _gb(dvae_w),
        "denoise_activations": _gb(tf_peak - tf_w),
        "vae_decode_activations": _gb(dvae_peak - dvae_w),
        **gen_over,
        "total": gen_gb,
        "total_with_offload": offload_gb,
        "total_with_block_offload": streamed_gb,
    }
    # The cache stage has freed the encoders before training loads the transformer.
    host = max(tr.loaded, tr.swapped + tr.host_offloaded)
    assumptions = [
        "fake-tensor trace of one real training step (forward + backward) at the recipe's size; GiB = 2^30 bytes",
        f"CUDA context {CUDA_CONTEXT_GIB} GiB and a {MARGIN:.0%} allocator/workspace margin added to each peak",
        "CPU autocast stands in for CUDA autocast; attention traced with PyTorch's flash kernel (no T x T scores)",
        *tr.assumptions,
    ]
    if mem.text_encoder == "int8":
        assumptions.append("text encoder int8: linear weights 1 byte + row scales, the rest bf16")
    if mem.text_encoder == "cpu":
        assumptions.append(
            f"text encoder on the CPU while caching: ~{_gb(te_weights):.1f} GiB of host RAM instead of GPU memory"
        )
    return Estimate(
        model=label,
        width=width,
        height=height,
        frames=frames,
        tokens=tokens,
        train_peak_gb=train_gb,
        cache_peak_gb=cache_gb,
        generate_peak_gb=gen_gb,
        generate_offload_peak_gb=offload_gb,
        host_train_gb=_gb(host),
        breakdown={"train": train, "cache": cache, "generate": generate},
        assumptions=assumptions,
    )


def estimate_training(recipe: Recipe) -> tuple[float, float]:
    """(GPU GiB with overheads, host GiB) of training alone: the quick estimate `finetune train` prints."""
    family = family_of(recipe)
    tcfg = model_configs(recipe).transformer
    trace = trace_training(recipe, tcfg, latent_shape(recipe, family, tcfg, recipe.train.batch_size))
    host = max(trace.loaded, trace.swapped + trace.host_offloaded)
    return _with_overheads(trace.peak)[0], host / GiB


def _bf16_weights(config: dict) -> int:
    """A transformers model's weights in bf16, counted on the meta device."""
    with torch.device("meta"):
        model = text_encoder_model(config)
    return 2 * sum(p.numel() for p in model.parameters())


def _int8_weights(config: dict) -> int:
    """A text encoder with its linears in int8 (1 byte + an fp32 scale per output row), everything else bf16.
    Counted on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = text_encoder_model(config)
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = {id(w) for w in linear}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in ids)
    return sum(w.numel() + 4 * w.shape[0] for w in linear) + 2 * rest


def format_table(est: Estimate) -> str:
    lines = [
        f"{est.model} at {est.width}x{est.height}x{est.frames} ({est.tokens:,} tokens): estimated peak GPU memory",
    ]
    for stage, key in (
        ("train", "train_peak_gb"),
        ("cache", "cache_peak_gb"),
        ("generate", "generate_peak_gb"),
    ):
        parts = {k: v for k, v in est.breakdown[stage].items() if not k.startswith("total")}
        detail = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v)
        lines.append(f"  {stage:<9}{getattr(est, key):>7.2f} GiB   ({detail})")
    lines.append(
        f"  generate {est.generate_offload_peak_gb:>7.2f} GiB   with --offload model (text encoder on the CPU, transformer and VAE take turns)"
    )
    blocks = est.breakdown["generate"]["total_with_block_offload"]
    lines.append(
        f"  generate {blocks:>7.2f} GiB   with --offload blocks (transformer blocks streamed from host RAM)"
    )
    lines.append(f"  host RAM for training ~{est.host_train_gb:.1f} GiB")
    lines += [f"  - {a}" for a in est.assumptions]
    return "\n".join(lines)
