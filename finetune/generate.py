"""Inference with adapters, video export, and merging adapters into the base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.config import ModelConfig
from finetune.errors import UserError
from finetune.io import atomic_dir
from finetune.lora import load_adapters
from finetune.models import Family, family_for, resolve_source
from finetune.ui import say

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")


@dataclass
class GenerateSettings:
    prompt: str
    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 30
    guidance: float = 5.0
    seed: int = 42
    negative_prompt: str = ""
    max_sequence_length: int = 512
    fps: int = 16


def _device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_pipeline(
    model: str, loras: list[tuple[str, float]], family_name: str | None = None, base: str | None = None
):
    """The family's diffusers pipeline with each adapter loaded at its scale (and checked: see load_adapters)."""
    cfg = ModelConfig(path=model, family=family_name, base=base)
    source = resolve_source(cfg)
    family = family_for(cfg, source)
    device, dtype = _device_and_dtype()
    pipe = family.load_pipeline(source, dtype)
    load_adapters(pipe, loras)
    return pipe.to(device), family


def _fit(family: Family, s: GenerateSettings) -> GenerateSettings:
    m = family.size_multiple
    width, height, frames = s.width // m * m, s.height // m * m, family.valid_frames(s.frames)
    if min(width, height) == 0:
        raise UserError(
            f"--width/--height: {s.width}x{s.height} is below the {m}-pixel minimum of {family.name}"
        )
    if (width, height, frames) != (s.width, s.height, s.frames):
        say(
            f"note: {family.name} takes sizes divisible by {m} and {family.frame_step}k+1 frames: "
            f"generating {width}x{height}x{frames}"
        )
    s.width, s.height, s.frames = width, height, frames
    return s


def generate_frames(pipe, family: Family, s: GenerateSettings) -> np.ndarray:
    """(frames, height, width, 3) uint8."""
    s = _fit(family, s)
    generator = torch.Generator(pipe.device).manual_seed(s.seed)
    out = pipe(
        prompt=s.prompt,
        negative_prompt=s.negative_prompt,
        width=s.width,
        height=s.height,
        num_frames=s.frames,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance,
        generator=generator,
        max_sequence_length=s.max_sequence_length,
        output_type="np",
    )
    return (np.clip(out.frames[0], 0, 1) * 255).round().astype(np.uint8)


def export(frames: np.ndarray, path: Path, fps: int = 16) -> Path:
    """.mp4 (H.264 through PyAV), .gif, or .png (first frame). Written to a temp file, then renamed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"--out {path}: expected a file ending in {', '.join(VIDEO_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{suffix}")
    try:
        if suffix == ".mp4":
            _write_mp4(frames, tmp, fps)
        else:
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            if suffix == ".png":
                images[0].save(tmp)
            else:
                images[0].save(tmp, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    import av

    _, height, width, _ = frames.shape
    # yuv420p (what every player reads) needs even sizes: pad by one edge pixel where needed.
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def merge(
    model: str,
    loras: list[tuple[str, float]],
    out: Path,
    transformer_only: bool = False,
    base: str | None = None,
) -> Path:
    """Fuses the adapters at their scales into the transformer and saves a pipeline folder that the family's
    diffusers pipeline loads with `from_pretrained` (or only the transformer/ folder)."""
    if not loras:
        raise UserError("merge: give at least one --lora PATH[:SCALE]")
    pipe, _ = load_pipeline(model, loras, base=base)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay in the base layers
    out = Path(out)
    with atomic_dir(out) as folder:
        if transformer_only:
            pipe.transformer.save_pretrained(folder / "transformer")
        else:
            pipe.save_pretrained(folder)
    say(f"merged {len(loras)} adapter(s) into {out}")
    return out
