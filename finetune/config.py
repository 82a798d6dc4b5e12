"""The recipe: one schema, declared once, loaded from YAML with `a.b=value` overrides.

Every key has a default except `model.path` and `data.path`. An unknown key is an error that names it and
suggests the closest valid key; a value of the wrong type names the key and the type it expects.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.errors import UserError


class _Section(BaseModel):
    # extra="forbid": a typo such as `train.stpes` must fail loudly, never be ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    family: str | None = None  # wan, ...; inferred from model_index.json when omitted
    path: str  # hub id, local diffusers folder, or a single .safetensors transformer file
    base: str | None = None  # hub id / folder for the VAE, text encoder and config when `path` is a file


FrameExtraction = Literal["head", "uniform", "slide", "chain", "full"]


class DatasetConfig(_Section):
    """One entry of `data.datasets`; a key left out (None) takes the value under `data:`."""

    path: str  # folder (recursive, same-stem .txt captions) or a folder with metadata.jsonl / metadata.csv
    split: str | None = None  # a folder with train/ test/ ... split folders: which one to read
    repeats: int = Field(1, gt=0)  # each item is seen this many times per epoch (balances small datasets)
    trigger: str | None = None
    frame_buckets: list[int] | None = None
    frame_extraction: FrameExtraction | None = None
    frame_stride: int | None = Field(None, gt=0)
    target_fps: float | None = Field(None, gt=0)
    shuffle_tags: int | None = Field(None, ge=0)


class DataConfig(_Section):
    # Folder of clips and images with same-stem .txt captions (searched recursively), or a folder holding
    # metadata.jsonl / metadata.csv (file_name + text/caption), or a Hub dataset id read from the local Hugging
    # Face cache (owner/name; see finetune/data/sources.py for every layout). Empty when `datasets` lists them.
    path: str = ""
    datasets: list[DatasetConfig] = []  # several folders, each with its own repeats and overrides
    split: str = "train"  # for a folder (or Hub dataset) laid out in split folders: train/ test/ validation/
    width: int = Field(832, gt=0)  # with height: the target area of the aspect-ratio buckets
    height: int = Field(480, gt=0)
    frames: int = Field(81, gt=0)  # the one frame bucket when frame_buckets is empty (rounded: Wan 4k+1)
    frame_buckets: list[int] = []  # e.g. [1, 17, 33, 49, 81]: a clip goes to the largest one it fills
    aspect_buckets: bool = True  # false: every item is cover-cropped to exactly width x height
    no_upscale: bool = False  # a source smaller than its bucket gets a smaller bucket instead of upscaling
    # head: first frames; uniform: spread over the clip; slide: windows every frame_stride frames;
    # chain: back-to-back windows; full: the whole clip (capped at the largest bucket)
    frame_extraction: FrameExtraction = "head"
    frame_stride: int = Field(16, gt=0)  # slide: frames between window starts (at target_fps)
    target_fps: float | None = Field(None, gt=0)  # resample clips to this rate first; None: source rate
    trigger: str = ""  # prepended to every caption: the word that calls up the style
    caption_dropout: float = Field(0.0, ge=0, lt=1)  # chance a step trains on the empty prompt instead
    shuffle_tags: int = Field(0, ge=0)  # N > 0: also cache N shuffled orders of comma-separated tags
    repeats: int = Field(1, gt=0)  # for data.path: times each item is seen per epoch
    strict: bool = False  # a broken clip or missing caption stops the run instead of being skipped


class CacheConfig(_Section):
    dir: str = "./cache"
    max_sequence_length: int = Field(512, gt=0)  # text tokens kept per caption (Wan was trained on 512)


class LoraConfig(_Section):
    rank: int = Field(32, gt=0)
    alpha: float = Field(32, gt=0)  # scale = alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: str | list[str] = "blocks"  # a preset of the family (blocks, attention, ffn) or module names
    # Wan 2.2 A14B's two experts (finetune/experts.py): both (train.steps split in half: the high-noise
    # `transformer` first, then the low-noise `transformer_2`, one loaded at a time), or only high / low.
    experts: Literal["both", "high", "low"] = "both"


class ValidationConfig(_Section):
    every: int = Field(0, ge=0)  # 0: no validation. Samples and the held-out loss every N steps
    prompts: list[str] = []  # sampled at every validation with the same seed, so the videos are comparable
    width: int = Field(320, gt=0)  # small: a validation should cost seconds, not minutes
    height: int = Field(192, gt=0)
    frames: int = Field(17, gt=0)
    steps: int = Field(20, gt=0)  # sampling steps
    seed: int = 0
    holdout: int = Field(0, ge=0)  # cached items kept out of training for the fixed-noise validation loss


class TrainConfig(_Section):
    steps: int = Field(2000, gt=0)
    lr: float = Field(1.0e-4, gt=0)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    # adamw8bit / paged_adamw8bit: bitsandbytes (paged: states can spill to host RAM under pressure);
    # torchao_adamw8bit: torchao's 8-bit AdamW (used automatically when bitsandbytes is missing).
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "torchao_adamw8bit"] = "adamw8bit"
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 turns clipping off
    gradient_checkpointing: bool = True
    timestep_sampling: Literal["shift", "uniform", "logit_normal"] = "shift"
    flow_shift: float | None = Field(None, gt=0)  # None: the family's default (Wan: 3.0)
    # Share of clips trained image-to-video: first latent frame given clean at timestep 0, left out of the loss.
    # None: the model's default (Wan 2.2 TI2V-5B: 1, LTX-Video: 0). Wan 2.1 I2V / FLF2V and CogVideoX-I2V
    # always condition on the first frame (their transformer takes the image), whatever this says.
    first_frame_conditioning: float | None = Field(None, ge=0, le=1)
    seed: int = 42
    num_workers: int = Field(0, ge=0)
    resume: str | None = None  # "latest" (newest checkpoint under output.dir) or a checkpoints/step-N folder
    max_bad_steps: int = Field(5, gt=0)  # non-finite loss or gradient this many steps in a row stops the run
    validation: ValidationConfig = ValidationConfig()
    log: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]  # CSV is always written
    ema: float | None = Field(None, gt=0, lt=1)  # e.g. 0.999: also save an EMA of the LoRA weights


class MemoryConfig(_Section):
    # bf16: weights and compute in bf16. fp8: weights stored as float8 e4m3 (half of bf16), each layer upcast
    # to bf16 just before it runs. fp32: full precision (the CPU always trains in fp32).
    # nf4 / int8: block linears quantized with bitsandbytes (QLoRA style: ~0.56 / ~1 byte per weight), each
    # dequantized to bf16 as it runs. LoRA weights stay fp32 on the GPU whatever the base.
    base_dtype: Literal["bf16", "fp8", "nf4", "int8", "fp32"] = "bf16"
    # Checkpointed block inputs (and any other saved activation) wait for backward in pinned host memory.
    activation_offload: bool = False
    # N transformer blocks keep their frozen weights in pinned host memory and are streamed to the GPU one
    # block ahead of use on a side CUDA stream (forward and backward); saves ~N-2 blocks of weights.
    blocks_to_swap: int = Field(0, ge=0)
    # With gradient checkpointing: recompute attention and FFN under their own checkpoints inside each block,
    # the FFN in this many token chunks, so backward holds one piece of one block (0: whole blocks).
    ffn_chunks: int = Field(0, ge=0)
    # The caching stage's umT5 text encoder: on the GPU (bf16, ~11 GB for umT5-XXL), int8 (~6 GB), or cpu.
    text_encoder: Literal["gpu", "int8", "cpu"] = "gpu"
    vae_tiling: bool = (
        False  # encode videos in spatial tiles (the VAE's peak no longer scales with the frame)
    )
    attention: Literal["sdpa", "xformers"] = "sdpa"
    # auto: before training, pick the fastest plan that the estimate says fits the detected GPU.
    plan: Literal["manual", "auto"] = "manual"


class OutputConfig(_Section):
    dir: str = "./adapters/my-style"
    save_every: int = Field(250, ge=0)  # 0: only the final adapter
    keep_last: int = Field(3, ge=0)  # checkpoints kept under checkpoints/ (0: all)
    # Layouts written beside the adapter: diffusers always; comfy adds pytorch_lora_weights_comfy.safetensors,
    # peft adds adapter_config.json + adapter_model.safetensors.
    formats: list[Literal["diffusers", "comfy", "peft"]] = ["diffusers"]


class Recipe(_Section):
    model: ModelConfig
    data: DataConfig
    cache: CacheConfig = CacheConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    memory: MemoryConfig = MemoryConfig()
    output: OutputConfig = OutputConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the resolved recipe, written into the adapter's metadata."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.append(prefix + name)
            keys += _all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


VALID_KEYS = _all_keys(Recipe)
_REQUIRED_IN = {"model": "model.path", "data": "data.path"}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.6)
    if not close:  # a misspelt leaf under a right section: compare the last part only
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in VALID_KEYS}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)]
    return f" (did you mean '{close[0]}'?)" if close else ""


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
    "list_type": "a list",
}


def _explain(err: dict[str, Any], source: str) -> str:
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    # Union types add the member type's name to the location (e.g. targets.str): drop it.
    while loc and loc[-1] in {"str", "list[str]", "int", "float", "function-after[...]"}:
        loc.pop()
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}'{_suggest(key)}"
    if kind == "missing":
        if key in _REQUIRED_IN:  # a whole section missing: name the key inside it that has no default
            key = _REQUIRED_IN[key]
        return f"{source}: '{key}' is required (set it in the recipe or pass {key}=VALUE)"
    value = err.get("input")
    if kind == "literal_error":
        return f"{source}: {key} = {value!r}: {err['msg'].replace('Input should be', 'expected')}"
    expected = _TYPE_WORDS.get(kind, err["msg"].lower())
    return f"{source}: {key} = {value!r}: expected {expected}"


def _merge_union_lines(lines: list[str]) -> list[str]:
    """A value that fits no member of a union gives one line per member: fold them into one line."""
    merged: dict[str, str] = {}
    for line in lines:
        head, sep, tail = line.rpartition(": expected ")
        if sep and head in merged:
            merged[head] += f" or {tail}"
        else:
            merged[head if sep else line] = line if not sep else line
    return list(merged.values())


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=10` -> ("train.steps", 10). Values are parsed as YAML, so `true`, `1e-4`, `[a, b]` work."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected KEY=VALUE, e.g. train.steps=500")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in VALID_KEYS:
        raise UserError(f"override '{text}': unknown key '{key}'{_suggest(key)}")
    if _is_text_key(key):  # `data.trigger=2024` or `=yes` stays the text the user typed
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _is_text_key(key: str) -> bool:
    section, _, leaf = key.partition(".")
    field = Recipe.model_fields[section].annotation.model_fields.get(leaf) if leaf else None
    return field is not None and field.annotation in (str, str | None)


def build_recipe(tree: dict[str, Any], overrides: list[str] = (), source: str = "recipe") -> Recipe:
    tree = json.loads(json.dumps(tree))  # a private deep copy
    for section, body in list(tree.items()):
        if body is None and section in Recipe.model_fields:  # `train:` with every line commented out
            tree[section] = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, f"override '{text}'")
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        lines = [_explain(e, source) for e in exc.errors()]
        raise UserError("\n".join(_merge_union_lines(lines))) from None
    if not recipe.data.path and not recipe.data.datasets:
        raise UserError(
            f"{source}: 'data.path' is required (set it in the recipe or pass data.path=VALUE, "
            "or list folders under data.datasets)"
        )
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe not found (pass the path of a recipe .yaml, e.g. recipes/wan/...)")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model:, data:, ...)")
    return build_recipe(tree, overrides, source=str(path))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    from finetune.io import atomic_write_text

    atomic_write_text(Path(path), recipe.to_yaml())
