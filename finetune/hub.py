"""The model card that goes beside every adapter, ready for the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

import finetune


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def model_card(info: dict[str, Any]) -> str:
    """README.md with YAML front matter (base_model, tags, instance_prompt) and how to use the adapter."""
    front = {
        "library_name": "diffusers",
        "pipeline_tag": "text-to-video",
        "tags": ["lora", "diffusers", "text-to-video", info["family"], "finetune"],
    }
    if _is_hub_id(info["base_model"]):  # the Hub rejects a local path as base_model
        front = {"base_model": info["base_model"], **front}
    if info.get("trigger"):
        front["instance_prompt"] = info["trigger"]
    trigger = info.get("trigger") or ""
    base = info["base_model"]
    base_link = (
        f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"the local model `{base}`"
    )
    prompt = f"{trigger} a cat walking through a garden".strip()
    targets = info["targets"] if isinstance(info["targets"], str) else ", ".join(info["targets"])
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {info["name"]}

A LoRA for {base_link} trained with
`finetune` {finetune.__version__}, a LoRA kit for video diffusion transformers.

{"Trigger word: `" + trigger + "` (put it in your prompt)." if trigger else "No trigger word."}

## Use it

diffusers:

```python
import torch
from diffusers import WanPipeline
from diffusers.utils import export_to_video

pipe = WanPipeline.from_pretrained("{info["base_model"]}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("path/or/hub-id/of/this/adapter", adapter_name="style")
pipe.set_adapters(["style"], adapter_weights=[1.0])
video = pipe("{prompt}", num_frames=81, height=480, width=832).frames[0]
export_to_video(video, "out.mp4", fps=16)
```

finetune:

```
finetune generate --model {info["base_model"]} --lora THIS_FOLDER:1.0 --prompt "{prompt}" --out out.mp4
```

## Training

| | |
|---|---|
| steps | {info["steps"]} |
| clips | {info["items"]} |
| resolution | {info["width"]}x{info["height"]}, {info["frames"]} frames |
| rank / alpha | {info["rank"]} / {info["alpha"]} |
| targets | {targets} ({info["lora_layers"]} layers) |
| learning rate | {info["lr"]} |
| final loss (mean of last 10% of steps) | {info["final_loss"]:.4f} |
| recipe | `recipe.yaml` beside this file (hash {info["recipe_hash"]}) |
"""
