"""The memory plan: what the recipe's `memory` and `train` keys do to the transformer before training.

Two calls, in this order, with the LoRA added between them:

    plan = apply_memory_plan(transformer, recipe, device, family)   # base dtype, checkpointing, attention
    ... add LoRA ...
    optimizer = plan.finish(transformer, params)                    # placement, block swap, offload, optimizer

The base weights must be cast or quantized before the LoRA wraps them (peft then wraps the fp8 / bitsandbytes
layer and keeps its own weights in fp32), and the model can only be placed on the GPU once the LoRA exists
(LoRA weights always live on the GPU, even in a swapped block). Every switch runs on the CPU through the same
code: there the swap copies are no-ops and the offloaded activations are copied within host memory.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch

from finetune.config import Recipe
from finetune.errors import UserError
from finetune.ui import say, warn


def blocks_of(transformer: torch.nn.Module, blocks_attr: str) -> torch.nn.ModuleList:
    return getattr(transformer, blocks_attr)


def all_blocks(transformer: torch.nn.Module, family) -> list[torch.nn.Module]:
    """Every transformer block, of each of the family's block lists (HunyuanVideo: dual- then single-stream)."""
    names = family.block_lists if family is not None else ("blocks",)
    return [block for name in names for block in getattr(transformer, name)]


# --- base weights: fp8 storage or bitsandbytes quantization -------------------------------------------------


def quantize_linears(
    root: torch.nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device
) -> int:
    """Replaces every nn.Linear under `root` with a bitsandbytes layer (nf4: 4-bit NormalFloat, ~0.56 byte per
    weight with its block scales; int8: LLM.int8, 1 byte + a row scale). Each layer is moved to `device` as it
    is replaced, which is when bitsandbytes quantizes it: the full-precision copy of only one layer is ever on
    the GPU. Returns the number of layers replaced."""
    import bitsandbytes as bnb

    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            weight = child.weight.data
            if kind == "nf4":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=compute_dtype, quant_type="nf4", device="meta",
                )  # fmt: skip
                layer.weight = bnb.nn.Params4bit(weight.float(), requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    has_fp16_weights=False, device="meta",
                )  # fmt: skip
                layer.weight = bnb.nn.Int8Params(weight.float(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, layer.to(device))
            count += 1
    return count


def _apply_base_dtype(transformer, recipe: Recipe, device: torch.device, blocks: list) -> None:
    base = recipe.memory.base_dtype
    compute = next(m.weight.dtype for m in blocks[0].modules() if isinstance(m, torch.nn.Linear))
    if base == "fp8":
        # float8 e4m3 storage: 1 byte per weight (1.3B: 2.8 -> ~1.5 GB); each layer is upcast just before it runs
        # and dropped after, so only one layer's full-precision copy exists at a time. Norms and embeddings stay.
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    elif base in ("nf4", "int8"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(
                f"memory.base_dtype={base} needs bitsandbytes (pip install bitsandbytes), or use fp8"
            ) from None
        # Only the block linears: embeddings, norms and the output head are small and sensitive.
        layers = sum(quantize_linears(block, base, compute, device) for block in blocks)
        say(f"memory: {layers} block linears quantized to {base} with bitsandbytes")


# --- finer recompute inside a checkpointed block --------------------------------------------------------------


def _checkpointed(forward, chunks: int = 1):
    """`forward` under its own (nested, non-reentrant) checkpoint; with chunks > 1 the tokens (dim 1) are cut
    into that many pieces, each checkpointed alone, so backward rebuilds one piece's intermediates at a time."""
    from torch.utils.checkpoint import checkpoint

    def run(x, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(x, *args, **kwargs)
        if chunks <= 1 or x.dim() < 3:
            return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
        pieces = x.chunk(chunks, dim=1)
        return torch.cat([checkpoint(forward, piece, use_reentrant=False) for piece in pieces], dim=1)

    return run


def split_block_recompute(blocks: torch.nn.ModuleList, ffn_chunks: int) -> None:
    """Gradient checkpointing keeps one block's input and recomputes the block in backward, where all of its
    intermediates are held at once (Wan 14B at 32,760 tokens: ~16 GB, the FFN's 13,824-wide activations the
    largest). Checkpointing the self-attention, cross-attention and FFN again inside the block, and the FFN per
    token chunk, holds only one of them (one chunk of the FFN) at a time, for one more forward of each."""
    for block in blocks:
        for name in ("attn1", "attn2", "attn"):  # Wan, LTX, CogVideoX: attn1/attn2; HunyuanVideo: attn
            module = getattr(block, name, None)
            if module is not None:
                module.forward = _checkpointed(module.forward)
        for name in ("ffn", "ff"):  # Wan: ffn; the others: ff
            module = getattr(block, name, None)
            if module is not None:
                module.forward = _checkpointed(module.forward, ffn_chunks)


# --- block swap ---------------------------------------------------------------------------------------------


class BlockSwapper:
    """Keeps the frozen weights of some blocks in pinned host memory and brings them to the GPU just in time.

    `blocks` are every block of the model in execution order, across its block lists (HunyuanVideo: the 20
    dual-stream blocks, then the 40 single-stream ones), so prefetching crosses from one list to the next.
    A block's forward pre-hook installs its GPU copy (waiting for a copy that was started on a side stream
    while the previous block computed) and starts copying the next block to be used (the next one in forward,
    the previous one during backward, when checkpointed blocks are recomputed in reverse order). Its forward
    hook points the parameters back at the host copy; the GPU copy is freed as soon as autograd no longer holds
    it (with gradient checkpointing: right away in forward, after the block's backward in backward). So at
    most two swapped blocks are on the GPU at once. LoRA weights (trainable) never move.

    On the CPU the same hooks run and the "copies" are the host tensors themselves.
    """

    def __init__(self, blocks: list[torch.nn.Module], swapped: list[int], device: torch.device):
        self.blocks, self.device, self.swapped = list(blocks), device, set(swapped)
        self.use_streams = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.use_streams else None
        self.host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # block -> [(param, host tensor)]
        self.in_flight: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.onloads = 0  # how many times a block was brought in (tests read it)
        # The latest onloads as (block index, whether its copy was already in flight): tests check the order
        # and the prefetching with it. Bounded: two passes over every block (forward, backward recompute).
        self.recent: collections.deque[tuple[int, bool]] = collections.deque(maxlen=2 * len(self.blocks))
        self.handles = []
        for i in sorted(self.swapped):
            block = self.blocks[i]
            pairs = []
            for tensor in list(block.parameters()) + list(block.buffers()):
                if tensor.requires_grad:  # LoRA: stays on the GPU, its grads and optimizer state with it
                    tensor.data = tensor.data.to(device)
                    continue
                host = tensor.data.to("cpu")
                if self.use_streams:
                    host = host.pin_memory()  # pinned: the copy can run asynchronously on the side stream
                tensor.data = host
                pairs.append((tensor, host))
            self.host[i] = pairs
            self.handles.append(block.register_forward_hook(self._make_post_hook(i), always_call=True))
        for i, block in enumerate(
            self.blocks
        ):  # every block prefetches its successor, swapped ones also onload
            self.handles.append(block.register_forward_pre_hook(self._make_pre_hook(i)))

    def _start_copy(self, i: int) -> None:
        if i not in self.swapped or i in self.in_flight:
            return
        if not self.use_streams:
            self.in_flight[i] = ([host.to(self.device) for _, host in self.host[i]], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [host.to(self.device, non_blocking=True) for _, host in self.host[i]]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.in_flight[i] = (copies, done)

    def _make_pre_hook(self, i: int):
        def onload(module, args):
            if i in self.swapped:
                self.recent.append((i, i in self.in_flight))
                self._start_copy(i)  # no-op when it was prefetched
                copies, done = self.in_flight.pop(i)
                if done is not None:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(done)
                    for t in copies:  # allocated on the side stream, used on the compute stream
                        t.record_stream(compute)
                for (param, _), copy in zip(self.host[i], copies, strict=True):
                    param.data = copy
                self.onloads += 1
            # recomputation inside backward runs the blocks in reverse (HunyuanVideo: single 39..0, dual 19..0)
            backward = torch._C._current_graph_task_id() != -1
            self._start_copy(i - 1 if backward else i + 1)

        return onload

    def _make_post_hook(self, i: int):
        def offload(module, args, output):
            for param, host in self.host[i]:
                param.data = host

        return offload

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --- activation offload -------------------------------------------------------------------------------------


def offload_activations(transformer: torch.nn.Module, device: torch.device) -> list:
    """Every tensor autograd saves outside a checkpointed block waits for backward in (pinned) host memory.
    With gradient checkpointing these are mostly the blocks' inputs (each block's checkpoint saves them through
    the outer hooks): 1.3B at 832x480x81 keeps 30 x ~0.1 GB there instead of on the GPU. Costs one host copy
    each way per block, overlapped by the copy engine when pinned."""
    state: dict[str, contextlib.AbstractContextManager] = {}

    def enter(module, args):
        state["ctx"] = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
        state["ctx"].__enter__()

    def leave(module, args, output):
        ctx = state.pop("ctx", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    return [
        transformer.register_forward_pre_hook(enter),
        transformer.register_forward_hook(leave, always_call=True),
    ]


# --- the caching stage's encoders ---------------------------------------------------------------------------


def load_encoders_for_plan(family, source, device: torch.device, dtype: torch.dtype, memory):
    """The family's encoders placed by `memory.text_encoder` and `memory.vae_tiling`:
    gpu: as the family loads them; int8: the text encoder's linears quantized with bitsandbytes one layer at a
    time on the way to the GPU (umT5-XXL ~12.5 -> ~6.5 GB); cpu: the text encoder stays in host memory and
    runs there (slow: seconds per caption for umT5-XXL, but 0 GB of GPU), its inputs and outputs moved for it.
    vae_tiling: the VAE encodes in overlapping spatial tiles, so its peak no longer grows with the frame size."""
    if memory is None or memory.text_encoder == "gpu":
        encoders = family.load_encoders(source, device, dtype)
    else:
        encoders = family.load_encoders(source, torch.device("cpu"), dtype)  # nothing on the GPU yet
        text_encoder = encoders.text_encoder
        if memory.text_encoder == "int8":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UserError("memory.text_encoder=int8 needs bitsandbytes (or use cpu)") from None
            layers = quantize_linears(text_encoder, "int8", dtype, device)
            text_encoder.to(device)
            say(f"memory: text encoder in int8 ({layers} linears)")
        else:
            run_on_cpu(text_encoder, device)
            say("memory: text encoder on the CPU")
        encoders.vae.to(device)
        encoders.device = device
    drop_decoder(encoders.vae)
    if memory is not None and memory.vae_tiling:
        encoders.vae.enable_tiling()
    return encoders


def run_on_cpu(module: torch.nn.Module, device: torch.device) -> None:
    """Keeps `module` in host memory and runs it there: its inputs are moved to the CPU and its outputs back to
    `device`, so a caller on the GPU never notices (a text encoder: 0 GB of GPU, seconds per caption)."""
    from accelerate.utils import send_to_device

    module.to("cpu")
    module.register_forward_pre_hook(
        lambda _, args, kwargs: (send_to_device(args, "cpu"), send_to_device(kwargs, "cpu")), with_kwargs=True
    )
    module.register_forward_hook(lambda _, __, output: send_to_device(output, device))


def drop_decoder(vae: torch.nn.Module) -> None:
    """Caching only encodes: the VAE's decoder half goes (LTX-Video 0.9.1's timestep-conditioned decoder is
    ~2/3 of its 0.9B parameters: ~2.4 GB of fp32 weights that would sit idle on the GPU)."""
    for name in ("decoder", "post_quant_conv"):
        if isinstance(getattr(vae, name, None), torch.nn.Module):
            setattr(vae, name, None)


# --- optimizers ---------------------------------------------------------------------------------------------


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """adamw: 8 bytes of state per LoRA weight. The 8-bit ones: ~2 bytes (1.3B rank 32: ~0.35 -> ~0.09 GB).
    paged_adamw8bit keeps its state in CUDA unified memory, which the driver can page out to host RAM under
    pressure. Without bitsandbytes, torchao's AdamW8bit stands in (it compiles its step on first use)."""
    t = recipe.train
    name = t.optimizer
    kwargs = dict(lr=t.lr, weight_decay=t.weight_decay)
    if name in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
            return cls(params, **kwargs)
        except Exception as exc:  # not installed, or no build for this platform
            warn(f"train.optimizer={name} needs bitsandbytes ({type(exc).__name__}: {exc}); trying torchao")
            name = "torchao_adamw8bit"
    if name == "torchao_adamw8bit":
        try:
            from torchao.optim import AdamW8bit

            return AdamW8bit(params, **kwargs)
        except Exception as exc:
            warn(f"torchao's AdamW8bit is unavailable ({type(exc).__name__}: {exc}); using adamw")
    return torch.optim.AdamW(params, **kwargs)


# --- the estimate before step 1, and memory.plan=auto -------------------------------------------------------

# From fastest to most frugal: auto takes the first that the estimate says fits (each step trades speed).
PLAN_LADDER = [
    ("bf16 base, whole-block checkpointing", dict(base_dtype="bf16", ffn_chunks=0)),
    ("bf16 base, attention and FFN recomputed in pieces", dict(base_dtype="bf16", ffn_chunks=4)),
    ("fp8 base, recompute in pieces", dict(base_dtype="fp8", ffn_chunks=4)),
    ("fp8 base, recompute in pieces, block inputs in host RAM", dict(base_dtype="fp8", ffn_chunks=8, activation_offload=True)),
    ("fp8 base, a quarter of the blocks swapped", dict(base_dtype="fp8", ffn_chunks=8, activation_offload=True, blocks_to_swap=0.25)),
    ("fp8 base, half of the blocks swapped", dict(base_dtype="fp8", ffn_chunks=8, activation_offload=True, blocks_to_swap=0.5)),
    ("nf4 base, half of the blocks swapped", dict(base_dtype="nf4", ffn_chunks=8, activation_offload=True, blocks_to_swap=0.5)),
    ("nf4 base, all but two blocks swapped", dict(base_dtype="nf4", ffn_chunks=8, activation_offload=True, blocks_to_swap=1.0)),
]  # fmt: skip


def _host_available_gib() -> float:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("inf")


def estimate_before_training(recipe: Recipe, device: torch.device) -> Recipe:
    """On a GPU: print the training estimate and warn when it will not fit. With memory.plan=auto (GPU only):
    return the recipe with the fastest plan of PLAN_LADDER that fits the free VRAM and the available RAM.
    The trace takes ~10-60 s on the CPU, so without a GPU it is skipped (`finetune estimate` shows it)."""
    if device.type != "cuda":
        if recipe.memory.plan == "auto":
            say("memory.plan=auto: no GPU, keeping the recipe's plan")
        return recipe
    from finetune.estimate import estimate_training, plan_recipe
    from finetune.real_models import model_configs

    free, total = (b / 2**30 for b in torch.cuda.mem_get_info(device))
    try:
        tcfg = model_configs(recipe)[1]  # every block list (HunyuanVideo: dual- + single-stream blocks)
        blocks = tcfg.get("num_layers", 0) + tcfg.get("num_single_layers", 0)
        needed, host = estimate_training(recipe)
    except UserError as exc:
        warn(f"no memory estimate for this model ({exc})")
        return recipe
    if recipe.memory.plan == "auto":
        ram = _host_available_gib()
        for why, plan in PLAN_LADDER:
            if "blocks_to_swap" in plan:
                plan = {
                    **plan,
                    "blocks_to_swap": max(1, min(blocks, round(plan["blocks_to_swap"] * blocks) or 1)),
                }
            candidate = plan_recipe(recipe, **plan)
            needed, host = estimate_training(candidate)
            if needed <= free and host <= ram:
                settings = " ".join(f"memory.{k}={v}" for k, v in plan.items())
                say(
                    f"memory.plan=auto: {why} ({settings}): estimated {needed:.1f} GiB of {free:.1f} GiB free"
                )
                return candidate
        warn(f"memory.plan=auto: no plan fits {free:.1f} GiB free (the most frugal needs ~{needed:.1f} GiB)")
        return candidate
    say(f"memory estimate: ~{needed:.1f} GiB peak for training (GPU: {free:.1f} of {total:.1f} GiB free)")
    if needed > free:
        warn(
            f"the estimate ({needed:.1f} GiB) is above the free GPU memory ({free:.1f} GiB): expect out-of-memory; "
            "try memory.plan=auto or a smaller tier recipe (finetune estimate RECIPE shows the breakdown)"
        )
    return recipe


# --- the plan -----------------------------------------------------------------------------------------------


def _place_except(module: torch.nn.Module, swapped: set[int], device: torch.device) -> None:
    """Moves every parameter and buffer under `module` to `device`, except those of the swapped blocks (by
    id): whole subtrees without a swapped block move at once, the others are walked down to the blocks."""
    if id(module) in swapped:
        return
    if not any(id(m) in swapped for m in module.modules()):
        module.to(device)
        return
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        tensor.data = tensor.data.to(device)
    for child in module.children():
        _place_except(child, swapped, device)


def _per_list(transformer: torch.nn.Module, block_lists: tuple[str, ...], n: int) -> str:
    """For a model with several block lists, how many of the last `n` blocks each list gives (last list first)."""
    if len(block_lists) == 1:
        return ""
    parts = []
    for name in reversed(block_lists):
        take = min(n, len(blocks_of(transformer, name)))
        if take:
            parts.append(f"{take} of {name}")
        n -= take
    return f" ({', '.join(parts)})"


@dataclass
class MemoryPlan:
    recipe: Recipe
    device: torch.device
    block_lists: tuple[str, ...]  # the transformer's block lists in execution order (family.block_lists)
    compute_dtype: torch.dtype
    swapper: BlockSwapper | None = None
    hooks: list = field(default_factory=list)

    def finish(self, transformer: torch.nn.Module, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """After the LoRA is added: LoRA in the compute dtype, placement (with block swap), offload, optimizer."""
        mem = self.recipe.memory
        if self.compute_dtype != torch.float32:
            # peft casts each LoRA layer's input to its fp32 weight and saves that copy for backward (~1.2 GB per
            # recomputed block at 832x480x81 on 1.3B). Under autocast the LoRA path runs in bf16 anyway, with
            # fp32 master weights, so the cast only costs memory.
            for module in transformer.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        if mem.blocks_to_swap:
            blocks = [block for name in self.block_lists for block in blocks_of(transformer, name)]
            if mem.blocks_to_swap > len(blocks):
                lists = " + ".join(f"{len(blocks_of(transformer, n))} {n}" for n in self.block_lists)
                counts = f" ({lists})" if len(self.block_lists) > 1 else ""
                raise UserError(
                    f"memory.blocks_to_swap={mem.blocks_to_swap}: this model has only {len(blocks)} blocks{counts}"
                )
            # The last N blocks in execution order (HunyuanVideo: single-stream ones first, then dual-stream).
            swapped = list(range(len(blocks) - mem.blocks_to_swap, len(blocks)))
            _place_except(transformer, {id(blocks[i]) for i in swapped}, self.device)
            self.swapper = BlockSwapper(blocks, swapped, self.device)
            per_list = _per_list(transformer, self.block_lists, len(swapped))
            say(f"memory: {len(swapped)} of {len(blocks)} blocks swapped from host memory{per_list}")
        else:
            transformer.to(self.device)
        if mem.activation_offload:
            self.hooks += offload_activations(transformer, self.device)
        return make_optimizer(self.recipe, params)


def apply_memory_plan(
    transformer: torch.nn.Module, recipe: Recipe, device: torch.device, family=None
) -> MemoryPlan:
    """Before the LoRA: base dtype (fp8 / nf4 / int8), gradient checkpointing, attention backend."""
    recipe = estimate_before_training(recipe, device)
    mem = recipe.memory
    block_lists = family.block_lists if family is not None else ("blocks",)
    blocks = blocks_of(transformer, block_lists[0])
    if mem.blocks_to_swap and not recipe.train.gradient_checkpointing:
        # Without checkpointing autograd keeps every block's weights for backward, so nothing would be freed.
        raise UserError("memory.blocks_to_swap needs train.gradient_checkpointing=true")
    if mem.blocks_to_swap and mem.base_dtype == "int8":
        raise UserError("memory.blocks_to_swap does not support base_dtype=int8 yet; use fp8 or nf4")
    # The model arrives in its compute dtype (bf16; fp32 on the CPU), some norms kept fp32: ask a block linear.
    compute = next(m.weight.dtype for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    _apply_base_dtype(transformer, recipe, device, all_blocks(transformer, family))
    if recipe.train.gradient_checkpointing:
        # Keeps only each block's input for backward and recomputes the rest: at 832x480x81 on Wan 1.3B this is
        # the difference between ~100 GiB and ~10 GiB at the peak (estimated), for ~30% more compute.
        transformer.enable_gradient_checkpointing()
        if mem.ffn_chunks:
            split_block_recompute(blocks, mem.ffn_chunks)
    if mem.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError("memory.attention=xformers: xformers is not installed (or use sdpa)") from None
        transformer.set_attention_backend("xformers")
    return MemoryPlan(recipe, device, block_lists, compute)
