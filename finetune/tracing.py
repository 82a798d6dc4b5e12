"""Tracing on fake tensors: a tracker of live tensor-storage bytes and the few shims a real-size diffusers model
needs to run a training step under FakeTensorMode on the CPU (see finetune/estimate.py for how it is used)."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Live tensor-storage bytes by tag (weights, lora, grads, optimizer, activations; `host` is not on the
    GPU), with the peak and what was live at the peak. Storages are counted once however many views share
    them, and leave the count when Python frees them."""

    def __init__(self):
        super().__init__()
        self.live = {"weights": 0, "lora": 0, "grads": 0, "optimizer": 0, "activations": 0}
        self.host = 0
        self.host_peak = 0
        self.peak = 0
        self.at_peak: dict[str, int] = dict(self.live)
        self._tags: dict[int, tuple[str, int]] = {}  # id(storage) -> (tag, bytes)
        self._refs: dict[int, weakref.ref] = {}

    def device_bytes(self) -> int:
        return sum(self.live.values())

    def add(self, tensor: torch.Tensor, tag: str = "activations") -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._tags:
            return
        size = storage.nbytes()
        self._tags[key] = (tag, size)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self._count(tag, size)

    def retag(self, tensor: torch.Tensor, tag: str) -> None:
        key = id(tensor.untyped_storage())
        if key not in self._tags:
            return self.add(tensor, tag)
        old, size = self._tags[key]
        self._count(old, -size)
        self._tags[key] = (tag, size)
        self._count(tag, size)

    def _count(self, tag: str, size: int) -> None:
        if tag == "host":
            self.host += size
            self.host_peak = max(self.host_peak, self.host)
            return
        self.live[tag] += size
        total = self.device_bytes()
        if total > self.peak:
            self.peak = total
            self.at_peak = dict(self.live)

    def _free(self, key: int) -> None:
        tag, size = self._tags.pop(key)
        self._refs.pop(key, None)
        self._count(tag, -size)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


@contextlib.contextmanager
def fake_mode(dtype: torch.dtype = torch.bfloat16):
    """Fake CPU tensors, new parameters created directly in `dtype` (a .to() on fake modules cannot swap)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    previous = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def keep_in_fp32(model: torch.nn.Module) -> None:
    """What from_pretrained(dtype=bf16) does: the model's `_keep_in_fp32_modules` (Wan: norms, modulation
    tables, time embedder, rope) stay fp32. Works on fake tensors, where Module.to() cannot."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if param.is_floating_point() and any(k in name.split(".") for k in keep):
            param.data = param.data.float()


def fake_safe_to(self, *args, **kwargs):
    """Module.to for fake parameters: Module.to() swaps fake tensors (and fails on any that has a weakref);
    assigning `.data` casts in place the way it does for real tensors. Device moves are not needed (all CPU)."""
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is not None:
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)
    return self


@contextlib.contextmanager
def fake_module_to():
    """peft (placing new LoRA layers) and diffusers' layerwise casting (fp8 <-> bf16 around each layer) call
    Module.to on the fake model; route those calls through fake_safe_to for the duration of a trace."""
    original = torch.nn.Module.to
    torch.nn.Module.to = fake_safe_to
    try:
        yield
    finally:
        torch.nn.Module.to = original


def offload_hooks(tracker: LiveBytes):
    """What torch.autograd.graph.save_on_cpu does, on fake CPU tensors (where .cpu() would not copy)."""

    def pack(t: torch.Tensor):
        host = torch.empty_like(t)
        host.copy_(t)
        tracker.retag(host, "host")
        return host

    def unpack(host: torch.Tensor):
        return host.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def no_grad_peak(build, run) -> tuple[int, int]:
    """(weights, peak) bytes of a no-grad run of a model built on fake tensors."""
    with fake_mode(torch.bfloat16):
        model = build()
        tracker = LiveBytes()
        with tracker, torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                tracker.add(t, "weights")
            run(model)
        return tracker.live["weights"], tracker.peak
