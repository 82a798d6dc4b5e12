"""Inference with adapters, video export, and merging adapters into the base."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.config import ModelConfig
from finetune.errors import UserError
from finetune.io import atomic_dir
from finetune.lora import load_adapters
from finetune.models import Family, families_with_mode, family_for, resolve_source
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
    # Generation modes beyond text-to-video (each family declares the ones it can run: Family.modes).
    image: str | None = None  # first frame (image-to-video)
    last_image: str | None = None  # last frame too (keyframe interpolation)
    video: str | None = None  # restyle this clip (SDEdit) ...
    strength: float = 0.7  # ... from this noise level: 0 keeps the clip, 1 ignores it
    extend: str | None = None  # continue this clip from its last frames


def _device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_pipeline(
    model: str,
    loras: list[tuple[str, float]],
    family_name: str | None = None,
    base: str | None = None,
    mode: str | None = "t2v",  # None: no generation (merge)
    offload: str = "none",
):
    """The family's diffusers pipeline with each adapter loaded at its scale (and checked: see load_adapters),
    placed on the device as `offload` says (see place_pipeline). A generation `mode` the family cannot run fails
    here, before any weights load."""
    cfg = ModelConfig(path=model, family=family_name, base=base)
    source = resolve_source(cfg)
    family = family_for(cfg, source)
    if mode:
        mode_runner(family, mode)
    device, dtype = _device_and_dtype()
    pipe = family.load_pipeline(source, dtype)
    load_adapters(pipe, loras)
    return place_pipeline(pipe, device, offload), family


OFFLOAD_CHOICES = ("auto", "none", "model", "blocks")


def place_pipeline(pipe, device: torch.device, offload: str):
    """Where each component lives while generating (`finetune estimate` prints the peak of `none` and `model`):
    `none`: all on the device, fastest (Wan2.1 1.3B at 832x480x81: ~21 GiB, 12.5 of it the umT5 text encoder).
    `model`: the text encoder(s) run on the CPU and only their output goes to the device; the transformer and
      the VAE take turns on it (diffusers' model offload); the VAE decodes in tiles. 1.3B: ~5 GiB, for a slower
      prompt encoding and one host->device copy of the transformer per clip.
    `blocks`: as `model`, but the transformer stays in host RAM and its blocks stream in one at a time on a side
      CUDA stream (diffusers' group offloading), for a transformer that does not fit (14B: 26.7 GiB in bf16).
    `auto`: the first of none / model / blocks whose resident weights plus a quarter fit the free memory."""
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    if offload == "auto":
        offload = "none"
        if device.type == "cuda":
            size = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in modules.items()}
            transformer = max(v for n, v in size.items() if n.startswith("transformer"))
            free, _ = torch.cuda.mem_get_info()
            fits = {"none": sum(size.values()), "model": transformer}
            offload = next((k for k, need in fits.items() if need * 1.25 < free), "blocks")
            say(
                f"--offload auto: {offload} ({sum(size.values()) / 2**30:.1f} GiB of weights, {free / 2**30:.1f} free)"
            )
    if offload == "none":
        return pipe.to(device)
    if offload not in OFFLOAD_CHOICES:
        raise UserError(f"--offload: '{offload}' is not one of {', '.join(OFFLOAD_CHOICES)}")
    from accelerate.hooks import remove_hook_from_module

    from finetune.memory import run_on_cpu

    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    for name, module in modules.items():
        if name.startswith("text_encoder"):
            remove_hook_from_module(module, recurse=True)  # model offload's hook would bring it to the GPU
            run_on_cpu(module, device)
        elif offload == "blocks" and name.startswith("transformer"):
            module.enable_group_offload(
                onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                use_stream=device.type == "cuda",
            )  # fmt: skip
        elif offload == "blocks":
            module.to(device)
    if hasattr(getattr(pipe, "vae", None), "enable_tiling"):
        pipe.vae.enable_tiling()
    return pipe


def _fit(family: Family, s: GenerateSettings) -> GenerateSettings:
    m = family.size_multiple
    width, height, frames = family.fit(s.width, s.height, s.frames)
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


MODE_FLAGS = {
    "image": "--image (image-to-video)",
    "last_image": "--image with --last-image (keyframe interpolation)",
    "video": "--video (video-to-video restyle)",
    "extend": "--extend (continue a clip)",
}


def generation_mode(s: GenerateSettings) -> str:
    given = [
        flag for flag, value in (("--image", s.image), ("--video", s.video), ("--extend", s.extend)) if value
    ]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)}: give one of --image, --video, --extend")
    if s.last_image and not s.image:
        raise UserError("--last-image: give the first frame too with --image (keyframe interpolation)")
    if s.video and not 0 < s.strength <= 1:
        raise UserError(
            f"--strength {s.strength}: expected a number in (0, 1] (0.7 restyles, 1 ignores the clip)"
        )
    if s.image:
        return "last_image" if s.last_image else "image"
    return "video" if s.video else "extend" if s.extend else "t2v"


def mode_runner(family: Family, mode: str):
    """The family's function for `mode`, or one line naming the families that can run it."""
    run = family.modes.get(mode) or (mode == "t2v" and not family.variant and (lambda pipe, _: (pipe, {})))
    if not run and mode == "t2v":  # an image-to-video model (Wan I2V / FLF2V) needs its first frame
        raise UserError(f"the {family.name} {family.variant} model animates an image: give --image PNG")
    if not run:
        able = families_with_mode(mode)
        kind = f"the {family.name} family" + (f" ({family.variant} model)" if family.variant else "")
        raise UserError(
            f"{MODE_FLAGS[mode]}: {kind} cannot do this; families that can: "
            f"{', '.join(able) if able else 'none yet'}"
        )
    return run


@dataclass
class GenerationInputs:
    """What a family's mode function gets: the settings' sizes and the decoded media, as PIL images."""

    width: int
    height: int
    frames: int
    strength: float
    image: object = None
    last_image: object = None
    video: list | None = None
    extend: list | None = None


def _read_image(path: str, width: int, height: int):
    from PIL import Image, ImageOps

    if not Path(path).is_file():
        raise UserError(f"{path}: image not found")
    with Image.open(path) as image:
        return ImageOps.fit(
            ImageOps.exif_transpose(image).convert("RGB"), (width, height), Image.Resampling.BICUBIC
        )


def _read_video(path: str, width: int, height: int) -> list:
    """Every frame of a clip, scaled to cover width x height and center-cropped (as training data is)."""
    import av
    from PIL import Image, ImageOps

    if not Path(path).is_file():
        raise UserError(f"{path}: video not found")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise UserError(f"{path}: cannot be decoded as a video ({type(exc).__name__})") from None
    if not frames:
        raise UserError(f"{path}: no video frames")
    return [ImageOps.fit(f.convert("RGB"), (width, height), Image.Resampling.BICUBIC) for f in frames]


def _inputs(family: Family, s: GenerateSettings) -> GenerationInputs:
    inputs = GenerationInputs(s.width, s.height, s.frames, s.strength)
    if s.image:
        inputs.image = _read_image(s.image, s.width, s.height)
    if s.last_image:
        inputs.last_image = _read_image(s.last_image, s.width, s.height)
    if s.extend:
        inputs.extend = _read_video(s.extend, s.width, s.height)
    if s.video:
        clip = _read_video(s.video, s.width, s.height)
        usable = family.valid_frames(len(clip))
        if usable < s.frames:
            say(f"note: {s.video} has {len(clip)} frames; restyling its first {usable}")
            s.frames = inputs.frames = usable
        inputs.video = clip[: s.frames]
    return inputs


def generate_frames(pipe, family: Family, s: GenerateSettings) -> np.ndarray:
    """(frames, height, width, 3) uint8, in the mode the settings ask for (text-to-video by default)."""
    run = mode_runner(family, generation_mode(s))
    s = _fit(family, s)
    pipe, extra = run(pipe, _inputs(family, s))
    generator = torch.Generator(pipe.device).manual_seed(s.seed)
    kwargs = dict(
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
    kwargs.update(extra)  # a mode's own arguments win (e.g. CogVideoX's fixed text length)
    # Video-to-video pipelines take their length from the input clip and have no num_frames argument.
    accepted = inspect.signature(pipe.__call__).parameters
    out = pipe(**{k: v for k, v in kwargs.items() if k in accepted})
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
    pipe, _ = load_pipeline(model, loras, base=base, mode=None)
    # Wan 2.2 A14B: both experts (each adapter's transformer_2 file went into transformer_2).
    two = getattr(pipe, "transformer_2", None) is not None
    components = ["transformer", "transformer_2"] if two else ["transformer"]
    pipe.fuse_lora(components=components)
    pipe.unload_lora_weights()  # drops the LoRA layers; the fused weights stay in the base layers
    out = Path(out)
    with atomic_dir(out) as folder:
        if transformer_only:
            for component in components:
                getattr(pipe, component).save_pretrained(folder / component)
        else:
            pipe.save_pretrained(folder)
    say(f"merged {len(loras)} adapter(s) into {out}")
    return out
