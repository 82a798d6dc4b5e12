"""`finetune caption DIR`: write a `.txt` caption beside every image or clip that has none, with an open
vision-language model (VLM) loaded through transformers.

A clip is captioned from its middle frame (the first frame is often a fade-in or a title card). The model sees
one picture at a time, so memory is the model plus one frame, capped at `MAX_SIDE` pixels on its longer side
before the processor resizes it again. Captions are written atomically, so Ctrl-C never leaves half a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from finetune.data.decode import MediaError, decode_windows, probe
from finetune.data.discover import IMAGE_EXTS, VIDEO_EXTS, Problem, _walk, check_root, unsafe_reason
from finetune.errors import UserError
from finetune.io import atomic_write_text
from finetune.models import dtype_kwarg

# ~256M parameters (~0.5 GB in bf16): runs on a laptop CPU and captions a frame in seconds on a GPU.
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEFAULT_PROMPT = (
    "Describe this image in one or two sentences for a video model's training caption: the subject, "
    "what it does, the setting, the camera and the style. No preamble."
)
MAX_SIDE = 1024  # larger frames are scaled down before the processor sees them (no VLM needs more)


@dataclass
class CaptionReport:
    written: list[Path] = field(default_factory=list)  # the .txt files written
    kept: list[Path] = field(default_factory=list)  # media whose existing caption was left alone
    skipped: list[Problem] = field(default_factory=list)  # media that could not be captioned, with the reason

    def summary(self) -> str:
        return f"{len(self.written)} captions written, {len(self.kept)} kept, {len(self.skipped)} skipped"


def caption_path(media: Path) -> Path:
    return media.with_suffix(".txt")


def has_caption(media: Path) -> bool:
    """A .txt with some text in it. An empty one counts as missing (discover trains it with an empty caption)."""
    txt = caption_path(media)
    return txt.is_file() and txt.stat().st_size > 0 and bool(txt.read_bytes().strip())


def middle_frame(path: Path) -> Image.Image:
    """The picture the VLM sees: the image itself (EXIF rotation applied), or a clip's middle frame."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTS:
        try:
            with Image.open(path) as image:
                picture = ImageOps.exif_transpose(image).convert("RGB")
        except PermissionError:
            raise MediaError("cannot be read (permission denied)") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise MediaError(f"cannot be decoded: {e}") from e
        picture.thumbnail((MAX_SIDE, MAX_SIDE))
        return picture
    info = probe(path)
    scale = min(1.0, MAX_SIDE / max(info.width, info.height))
    # decode_windows scales from YUV straight to this size, so a 4K clip never exists as a full RGB frame.
    width, height = max(2, round(info.width * scale)), max(2, round(info.height * scale))
    for _, video in decode_windows(path, [(info.frames // 2,)], width, height):
        pixels = video[:, 0].add(1.0).mul(127.5).round().clamp(0, 255).byte()  # (3, H, W) back to uint8
        return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
    raise AssertionError("decode_windows yields the window or raises")  # pragma: no cover


class Captioner:
    """A VLM and its processor, loaded once: `AutoModelForImageTextToText` covers SmolVLM, Idefics3, LLaVA,
    Qwen2-VL and the other chat VLMs transformers ships."""

    def __init__(self, model: str = DEFAULT_MODEL, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 80):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # bf16 halves memory on a GPU; CPUs run fp32 much faster than bf16.
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, **dtype_kwarg("transformers", self.dtype)
            )
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"caption --model {model}: cannot load it as a vision-language model ({first}); give a hub id "
                "or folder of an image-text-to-text model, e.g. the default " + DEFAULT_MODEL
            ) from None
        self.model.to(self.device).eval()
        if getattr(self.processor, "chat_template", None) is None:
            raise UserError(
                f"caption --model {model}: its processor has no chat template, so the prompt cannot be "
                "formatted; use an instruct/chat VLM (e.g. " + DEFAULT_MODEL + ")"
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        self.max_new_tokens = max_new_tokens

    def __call__(self, picture: Image.Image) -> str:
        import torch

        inputs = self.processor(images=[picture], text=self.text, return_tensors="pt")
        inputs = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            # Greedy: the same frame always gets the same caption, so reruns are reproducible.
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        text = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
        # One line: every line of a caption file is a separate caption to the trainer.
        return " ".join(text.split())


def with_trigger(caption: str, trigger: str | None) -> str:
    if not trigger or caption.split(",")[0].strip() == trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def caption_folder(
    folder: Path | str,
    model: str | None = None,
    overwrite: bool = False,
    trigger: str | None = None,
    prompt: str | None = None,
    captioner=None,
) -> CaptionReport:
    """Caption every image and clip under `folder` (recursive) that has no caption (all of them with
    `overwrite`). A file that cannot be decoded is skipped and named in the report; the rest go on."""
    root = check_root(folder, key="caption DIR")
    from finetune.data.sources import find_list_files, find_metadata_files

    listed = find_metadata_files(root) or list(find_list_files(root) or ())
    if listed:
        raise UserError(
            f"caption: {listed[0]} exists, so training reads captions from it and ignores .txt files; "
            "caption a folder without a metadata file or prompts list"
        )
    media = [
        Path(d, n) for d, names in _walk(root) for n in names if n.lower().endswith(VIDEO_EXTS + IMAGE_EXTS)
    ]
    if not media:
        raise UserError(f"caption: no videos or images found in {root} ({' '.join(VIDEO_EXTS + IMAGE_EXTS)})")
    report = CaptionReport()
    todo = []
    for path in media:
        if not overwrite and has_caption(path):
            report.kept.append(path)
        elif reason := unsafe_reason(path, root):
            report.skipped.append(Problem(path, reason))
        else:
            todo.append(path)
    from finetune.ui import progress

    for path in progress(todo, desc="caption", unit="file"):
        try:
            picture = middle_frame(path)
        except MediaError as e:
            report.skipped.append(Problem(path, str(e)))
            continue
        # Loaded at the first decodable file that needs a caption: a rerun with nothing to do loads nothing.
        captioner = captioner or Captioner(model or DEFAULT_MODEL, prompt or DEFAULT_PROMPT)
        caption = captioner(picture)
        if not caption:
            report.skipped.append(Problem(path, "the model returned an empty caption; write one by hand"))
            continue
        atomic_write_text(caption_path(path), with_trigger(caption, trigger) + "\n")
        report.written.append(caption_path(path))
    return report
