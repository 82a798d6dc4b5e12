"""Model families: each is data (facts) plus a few functions, registered by name.

Adding a model is one file that builds a `Family`, one line in `REGISTRY`, one recipe and one tiny test config.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.config import ModelConfig
from finetune.errors import UserError


@dataclass(frozen=True)
class Source:
    """Where the weights are. `transformer` is a folder/hub id with a transformer/ subfolder, or one file."""

    transformer: str
    transformer_is_file: bool
    base: str  # folder or hub id holding model_index.json, vae/, text_encoder/, tokenizer/, scheduler/
    # The pipeline component to train: `transformer`, or Wan 2.2 A14B's low-noise `transformer_2` (experts.py).
    component: str = "transformer"


@dataclass(frozen=True)
class ShippedModel:
    """A real model `finetune estimate` sizes without downloading it, from configs under models/configs."""

    names: tuple[str, ...]  # lowercase fragments of model.path / model.base that mean this model (any one)
    label: str
    transformer: str  # config file names under finetune/models/configs (each names its class)
    text_encoders: tuple[str, ...]
    vae: str
    image_encoder: str | None = None  # Wan 2.1 I2V/FLF2V: CLIP ViT-H/14, loaded with the encoders to cache
    experts: int = 1  # Wan 2.2 A14B: two transformers of this config


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name` values that mean this family
    lora_presets: dict[str, tuple[str, ...]]  # preset name -> module names inside each block
    blocks_attr: str  # the transformer attribute that holds its blocks (checkpointing, block swap)
    vae_stride: tuple[int, int]  # VAE compression (time, space)
    patch: tuple[int, int, int]  # transformer patch (time, height, width)
    frame_step: int  # valid frame counts are frame_step * k + 1
    flow_shift: float  # default sigma shift for training and sampling
    load_transformer: Callable[[Source, torch.dtype], torch.nn.Module]
    load_encoders: Callable[[Source, torch.device, torch.dtype], Any]
    # One (tokens, dim) tensor per prompt, or a dict of tensors named `text`, `text_*` (e.g. a pooled embedding).
    encode_prompts: Callable[[Any, list[str], int], list]
    # (B, 3, F, H, W) -> latents (B, C, F', H', W'), or a dict with `latents` and per-clip conditioning tensors.
    encode_video: Callable[[Any, torch.Tensor], Any]
    # (transformer, noisy, timesteps, text, extras) -> prediction; extras: the batch's other cached tensors
    # (finetune.data.batches), on the device. Callers without extras may leave it out.
    predict: Callable[..., torch.Tensor]
    load_pipeline: Callable[[Source, torch.dtype], Any]
    # Optional facts; the defaults describe a flow-matching text-to-video family such as Wan 2.1 T2V.
    objective: str = "flow"  # "flow" (velocity, sigma in (0, 1)) | "v_prediction" (DDPM alphas: CogVideoX)
    # Generation modes `finetune generate` can run: mode -> fn(pipeline, inputs) -> (pipeline to call, extra
    # call kwargs). "t2v" always; "image", "last_image", "video" (SDEdit), "extend" where the family can.
    modes: dict[str, Callable[[Any, Any], tuple[Any, dict[str, Any]]]] = field(default_factory=dict)
    # For `finetune estimate`: the real models it knows, the transformer config key holding the text width,
    # and fake per-batch extras for `predict` (transformer config, batch size, text length) -> {name: tensor};
    # a None value stands for a tensor shaped like the latents (Wan I2V's condition), made by the estimate.
    shipped: tuple[ShippedModel, ...] = ()
    text_dim_key: str = "text_dim"
    fake_extras: Callable[[dict, int, int], dict[str, torch.Tensor]] | None = None
    # Variants under one family name (Wan: "" = text-to-video, "i2v", "flf2v", "ti2v"): `specialize(source)`
    # picks the one the base is (family_for calls it); `variants()` lists them for the modes each can run.
    variant: str = ""
    specialize: Callable[[Source], Family] | None = None
    variants: Callable[[], tuple[Family, ...]] | None = None
    # First-frame conditioning by latent replacement (Wan 2.2 TI2V-5B, LTX-Video): (x0, noisy, timesteps,
    # extras, chosen (B,) bool) -> (model input, per-token timesteps, loss mask or None); the loss skips the
    # given frames (objectives.first_frame_condition). On `condition_share` of the clips unless the recipe's
    # train.first_frame_conditioning says otherwise.
    condition: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None
    condition_share: float = 0.0
    # Further block lists after `blocks_attr` whose linears LoRA targets too (HunyuanVideo: its single-stream
    # blocks after the dual-stream ones). Block swap covers every list, in this order.
    more_blocks: tuple[str, ...] = ()
    # The pipeline call's text arguments for cached prompt tensors (collated dicts `text`, `text_*`, on the
    # device), for the prompt and the negative prompt; None: `prompt_embeds` / `negative_prompt_embeds` only.
    pipeline_text_kwargs: Callable[[dict, dict], dict[str, Any]] | None = None

    @property
    def block_lists(self) -> tuple[str, ...]:
        return (self.blocks_attr, *self.more_blocks)

    def valid_frames(self, frames: int) -> int:
        """The largest valid frame count not above `frames` (an image is 1 frame)."""
        return max(1, (frames - 1) // self.frame_step * self.frame_step + 1)

    @property
    def size_multiple(self) -> int:
        return self.vae_stride[1] * self.patch[1]

    def fit(self, width: int, height: int, frames: int) -> tuple[int, int, int]:
        """Rounded down to the family's rule: sizes to `size_multiple` (0 when below it: each caller has its
        own policy for a size that small), frames to `valid_frames`."""
        m = self.size_multiple
        return width // m * m, height // m * m, self.valid_frames(frames)


def dtype_kwarg(library: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`dtype=` where the library has it, else the older `torch_dtype=` (now deprecated in both)."""
    if library == "diffusers":
        from diffusers.utils import deprecation_utils

        new = hasattr(deprecation_utils, "_resolve_dtype")  # the shim that deprecates torch_dtype (0.42+)
    else:
        import transformers

        new = int(transformers.__version__.split(".")[0]) >= 5
    return {"dtype" if new else "torch_dtype": dtype}


@contextlib.contextmanager
def loading(what: str, where: str) -> Iterator[None]:
    """Turns "not found / not cached / no network" into one line that says what to do."""
    try:
        yield
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load {what} from '{where}': {first} (offline? download it first with "
            "`huggingface-cli download`, or point model.path at a local diffusers folder)"
        ) from None


def _registry() -> dict[str, Family]:
    from finetune.models import cogvideox, hunyuan, ltx, wan

    return {"wan": wan.FAMILY, "ltx": ltx.FAMILY, "cogvideox": cogvideox.FAMILY, "hunyuan": hunyuan.FAMILY}


def families_with_mode(mode: str) -> list[str]:
    """Family names that can run `mode`; where only some variants can, `name (variant, ...)`."""
    able = []
    for name, family in sorted(_registry().items()):
        if mode in family.modes:
            able.append(name)
        elif some := [v.variant for v in (family.variants() if family.variants else ()) if mode in v.modes]:
            able.append(f"{name} ({', '.join(some)} models)")
    return able


def families_with_condition() -> list[str]:
    """Family names (and variants) that train first-frame conditioning (train.first_frame_conditioning)."""
    able = []
    for name, family in sorted(_registry().items()):
        variants = (family, *(family.variants() if family.variants else ()))
        able += [f"{name} {v.variant}".strip() for v in variants if v.condition is not None]
    return able


def get_family(name: str) -> Family:
    families = _registry()
    if name not in families:
        raise UserError(f"model.family: unknown family '{name}' (known: {', '.join(sorted(families))})")
    return families[name]


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def resolve_source(cfg: ModelConfig) -> Source:
    path = Path(cfg.path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(
                f"model.path: {path} is a file but not .safetensors (weights load from safetensors only)"
            )
        if not cfg.base:
            raise UserError(
                f"model.path: {path} is a single transformer file; set model.base to the diffusers folder or "
                "hub id that provides its VAE, text encoder and config (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
            )
        return Source(
            transformer=str(path), transformer_is_file=True, base=_check_base(cfg.base, "model.base")
        )
    base = _check_base(cfg.path, "model.path")
    return Source(transformer=base, transformer_is_file=False, base=cfg.base or base)


def _check_base(text: str, key: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "transformer").is_dir():
            raise UserError(f"{key}: {path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path)
    if _looks_like_hub_id(text):
        return text  # resolved by diffusers through the local Hugging Face cache (offline when cached)
    raise UserError(f"{key}: '{text}' is neither a folder, a .safetensors file nor a hub id (owner/name)")


def model_index(base: str) -> dict[str, Any]:
    local = Path(base) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(base, "model_index.json")).read_text())
    except Exception as exc:  # offline and not cached, or no such repo
        raise UserError(
            f"model.path: cannot read model_index.json of '{base}' ({type(exc).__name__}); download it first "
            "with `huggingface-cli download` or point model.path at a local folder"
        ) from None


def family_for(cfg: ModelConfig, source: Source) -> Family:
    """The family, and within it the variant the base is (e.g. Wan I2V), from model_index.json when unset."""
    if cfg.family:
        family = get_family(cfg.family)
        return family.specialize(source) if family.specialize else family
    pipeline = model_index(source.base).get("_class_name", "")
    for family in _registry().values():
        if pipeline in family.pipeline_classes:
            return family.specialize(source) if family.specialize else family
    raise UserError(
        f"model.family: cannot tell the family of '{source.base}' (pipeline '{pipeline}'); set it"
    )


def load_scheduler_config(base: str) -> dict[str, Any]:
    """The base pipeline's scheduler/scheduler_config.json (local folder or the local hub cache)."""
    local = Path(base) / "scheduler" / "scheduler_config.json"
    if local.is_file():
        return json.loads(local.read_text())
    with loading("the scheduler config", base):
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(base, "scheduler/scheduler_config.json")).read_text())
