"""An exponential moving average of the LoRA weights (`train.ema: 0.999`), saved beside the adapter as
`pytorch_lora_weights_ema.safetensors` (same keys and header, so diffusers loads it with weight_name=...).

Memory: one fp32 copy of the LoRA weights on the training device (~88 MB at rank 32 on Wan 1.3B).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from finetune.io import atomic_save_safetensors
from finetune.lora import WEIGHTS_NAME

EMA_NAME = "pytorch_lora_weights_ema.safetensors"


def adapter_key(param_name: str) -> str:
    """peft parameter name -> the adapter file's key (diffusers layout: no adapter name, `transformer.` first)."""
    return "transformer." + param_name.replace(".default.", ".")


class LoraEMA:
    def __init__(self, transformer: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        # shadow += (1 - decay) * (param - shadow), one fused kernel over all LoRA tensors.
        torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1 - self.decay)

    def save(self, folder: Path) -> Path:
        """Beside `folder/pytorch_lora_weights.safetensors` (written first), with its header."""
        with safe_open(str(Path(folder) / WEIGHTS_NAME), framework="pt") as f:
            metadata = f.metadata() or {}
        path = Path(folder) / EMA_NAME
        atomic_save_safetensors(
            {adapter_key(n): s for n, s in zip(self.names, self.shadow, strict=True)}, path, metadata
        )
        return path

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, shadow in zip(self.names, self.shadow, strict=True):
                shadow.copy_(saved[adapter_key(name)])
