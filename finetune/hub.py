"""The Hugging Face Hub side of an adapter: its model card, `finetune push`, and `--lora owner/name`.

The token is never handled here: huggingface_hub reads it from HF_TOKEN or the user's `hf auth login`; the kit
never writes it to a file, a log or the card.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

import finetune
from finetune.errors import UserError
from finetune.ui import say

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Uploaded with the adapter: the weights in every layout, the card, the recipe, samples. Training checkpoints and
# logs stay local (a 2000-step run at save_every 250 would upload eight more adapters).
PUSH_IGNORE = ("checkpoints/*", "logs/*", ".*")
# Licenses of bases the kit has recipes for, for cards whose base is not in the local cache to read it from.
KNOWN_LICENSES = {"Wan-AI/": "apache-2.0"}  # Wan 2.1 and 2.2 are Apache 2.0


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def looks_like_hub_ref(text: str) -> bool:
    """`owner/name` or `owner/name/path/in/repo.safetensors`, and not a local path."""
    parts = text.split("/")
    if len(parts) < 2 or text.startswith((".", "/", "~")) or "\\" in text or Path(text).exists():
        return False
    if not all(_REPO_PART.fullmatch(p) for p in parts[:2]):
        return False
    return len(parts) == 2 or parts[-1].endswith(".safetensors")


def download_adapter(ref: str) -> Path:
    """A hub adapter through the local Hugging Face cache (works offline when cached; HF_HUB_OFFLINE=1 never
    touches the network): a repo gives its snapshot folder, `owner/name/file.safetensors` that file."""
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = ref.split("/")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if file:
            return Path(hf_hub_download(repo, file))
        return Path(snapshot_download(repo, allow_patterns=["*.safetensors", "*.json", "*.md"]))
    except Exception as exc:  # not cached while offline, no such repo, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(
            f"--lora {ref}: not a local path, and the Hub repo could not be read ({type(exc).__name__}: "
            f"{first[:160]}); download it first with `hf download {repo}`"
        ) from None


def base_license(base: str) -> str | None:
    """The base model's license: from its card when it is a local folder or in the HF cache, else from the
    known bases; None when unknown (the card then has no license line rather than a guessed one)."""
    card = Path(base) / "README.md"
    if not card.is_file() and _is_hub_id(base):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
            card = Path(cached) if isinstance(cached, str) else card
        except Exception:  # no cache at all
            pass
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and isinstance(front.get("license"), str):
                return front["license"]
    return next((lic for prefix, lic in KNOWN_LICENSES.items() if base.startswith(prefix)), None)


PIPELINES = {
    "wan": "WanPipeline",
    "ltx": "LTXPipeline",
    "cogvideox": "CogVideoXPipeline",
    "hunyuan": "HunyuanVideoPipeline",
}


def model_card(info: dict[str, Any], sample: str | None = None) -> str:
    """README.md with YAML front matter the Hub reads (base_model, license, tags, instance_prompt), how to load
    the adapter in diffusers, ComfyUI and finetune, and the training settings. `sample`: a video/GIF path
    relative to the card, shown at the top."""
    front = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-video",
        "tags": ["lora", "diffusers", "text-to-video", info["family"], "finetune"],
    }
    if _is_hub_id(info["base_model"]):  # the Hub rejects a local path as base_model
        front = {"base_model": info["base_model"], **front}
    license_ = info.get("license") or base_license(info["base_model"])
    if license_:
        front["license"] = license_
    if info.get("trigger"):
        front["instance_prompt"] = info["trigger"]
    trigger = info.get("trigger") or ""
    base = info["base_model"]
    base_link = (
        f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"the local model `{base}`"
    )
    prompt = f"{trigger} a cat walking through a garden".strip()
    targets = info.get("targets", "-")
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    pipeline = PIPELINES.get(info["family"], "DiffusionPipeline")
    load_lines, comfy_text = _adapter_loading(info.get("experts") or [])
    loss = info.get("final_loss")
    rows = [
        ("steps", info.get("steps", "-")),
        ("clips", info.get("items", "-")),
        (
            "resolution",
            f"{info.get('width', '-')}x{info.get('height', '-')}, {info.get('frames', '-')} frames",
        ),
        ("rank / alpha", f"{info.get('rank', '-')} / {info.get('alpha', '-')}"),
        ("targets", f"{targets} ({info.get('lora_layers', '-')} layers)"),
        ("learning rate", info.get("lr", "-")),
        ("final loss (mean of last 10% of steps)", f"{loss:.4f}" if isinstance(loss, float) else "-"),
        ("recipe", f"`recipe.yaml` beside this file (hash {info.get('recipe_hash', '-')})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    shown = f"![sample]({sample})\n\n" if sample else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {info["name"]}

{shown}A LoRA for {base_link} trained with
`finetune` {finetune.__version__}, a LoRA kit for video diffusion transformers.

{"Trigger word: `" + trigger + "` (put it in your prompt)." if trigger else "No trigger word."}

## Use it

diffusers:

```python
import torch
from diffusers import {pipeline}
from diffusers.utils import export_to_video

pipe = {pipeline}.from_pretrained("{info["base_model"]}", torch_dtype=torch.bfloat16).to("cuda")
{load_lines}
pipe.set_adapters(["style"], adapter_weights=[1.0])
video = pipe("{prompt}", num_frames=81, height=480, width=832).frames[0]
export_to_video(video, "out.mp4", fps=16)
```

{comfy_text}

finetune:

```
finetune generate --model {info["base_model"]} --lora THIS_FOLDER:1.0 --prompt "{prompt}" --out out.mp4
```

## Training

| | |
|---|---|
{table}
"""


_ADAPTER = '"path/or/hub-id/of/this/adapter"'
_COMFY_ONE = """ComfyUI: put `pytorch_lora_weights_comfy.safetensors` in `ComfyUI/models/loras/` and load it with a
"LoraLoaderModelOnly" node on the base model (make it with
`finetune convert THIS_FOLDER --to comfy --out THIS_FOLDER` if it is not here)."""


def _adapter_loading(experts: list[str]) -> tuple[str, str]:
    """The diffusers lines and the ComfyUI paragraph: one file, or Wan 2.2 A14B's file per expert (the
    high-noise `transformer`'s and the low-noise `transformer_2`'s, see finetune/experts.py)."""
    if not experts:
        return f'pipe.load_lora_weights({_ADAPTER}, adapter_name="style")', _COMFY_ONE
    lines, files, comfy = [], [], []
    if "high" in experts:
        lines.append(f'pipe.load_lora_weights({_ADAPTER}, adapter_name="style")  # high-noise expert')
        files.append("`pytorch_lora_weights.safetensors` (the high-noise expert, `transformer`)")
        comfy.append("`pytorch_lora_weights_comfy.safetensors` on the high-noise model")
    if "low" in experts:
        lines.append(
            f"pipe.load_lora_weights({_ADAPTER},\n"
            '                       weight_name="pytorch_lora_weights_transformer_2.safetensors",\n'
            '                       adapter_name="style", load_into_transformer_2=True)  # low-noise expert'
        )
        files.append(
            "`pytorch_lora_weights_transformer_2.safetensors` (the low-noise expert, `transformer_2`)"
        )
        comfy.append("`pytorch_lora_weights_transformer_2_comfy.safetensors` on the low-noise model")
    text = (
        f"Wan 2.2 two-expert adapter: {' and '.join(files)}. ComfyUI: load {' and '.join(comfy)}, each with a "
        '"LoraLoaderModelOnly" node (written with `output.formats: [comfy]`, or `finetune convert` each file).'
    )
    return "\n".join(lines), text


def check_card(card_text: str, source: str = "README.md") -> Any:
    """Parses the card with huggingface_hub's ModelCard (front matter must be valid metadata)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(card_text, ignore_metadata_errors=False)
    except Exception as exc:
        raise UserError(f"{source}: not a valid model card ({type(exc).__name__}: {exc})") from None
    return card


def files_to_push(folder: Path) -> list[Path]:
    """Relative paths of what `push` uploads (checkpoints, logs and hidden files stay local)."""
    import fnmatch

    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(rel, pat) for pat in PUSH_IGNORE):
            files.append(Path(rel))
    return files


def push(folder: str | Path, repo: str, private: bool = False, dry_run: bool = False) -> list[Path]:
    """Uploads an adapter folder to `repo` (created when missing). The token comes from HF_TOKEN or the user's
    login, read by huggingface_hub itself; nothing here sees or stores it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"push: {folder} is not an adapter folder")
    if not _is_hub_id(repo) or not all(_REPO_PART.fullmatch(p) for p in repo.split("/")):
        raise UserError(f"--repo {repo}: expected owner/name")
    files = files_to_push(folder)
    if not any(p.suffix == ".safetensors" for p in files):
        raise UserError(f"push: {folder} holds no .safetensors adapter")
    card = folder / "README.md"
    if not card.is_file():
        raise UserError(f"push: {folder} has no README.md model card (train writes one)")
    check_card(card.read_text(encoding="utf-8"), str(card))
    if dry_run:
        for path in files:
            print(f"{path}  ({(folder / path).stat().st_size:,} bytes)")
        say(f"dry run: would upload {len(files)} files to https://huggingface.co/{repo}")
        return files
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            ignore_patterns=list(PUSH_IGNORE),
            commit_message="Upload LoRA adapter (finetune)",
        )
    except Exception as exc:  # no token, no network, no permission
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(
            f"push {repo}: {type(exc).__name__}: {first[:200]} (log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    say(f"pushed {len(files)} files to https://huggingface.co/{repo}")
    return files
