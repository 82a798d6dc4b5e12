"""Wan 2.2 A14B's two experts: which one a training phase trains, on which noise levels, into which file.

Wan 2.2 A14B denoises with two transformers of the Wan 2.1 14B architecture: `transformer`, the high-noise
expert, runs every sampling step whose timestep t >= boundary_ratio * 1000 (0.875 for T2V, 0.9 for I2V, in
model_index.json), and `transformer_2`, the low-noise expert, the steps below (diffusers' WanPipeline.__call__).
That t is the scheduler's timestep, 1000 * sigma with the flow shift already applied, and training feeds the
transformer exactly that (finetune.flow: timestep = 1000 * sigma, sigma shifted before), so the boundary means the
same in both: the high expert trains on sigma in [boundary, 1), the low one on (0, boundary). FlowMatching's
`sigma_range` maps each sampled (shifted, clamped to [1e-3, 1 - 1e-3]) sigma linearly into the expert's range,
so no sample ever reaches the other expert's side.

Memory: one expert in memory at all, not only on the GPU. `lora.experts: both` runs two phases in one run: the
high expert for the first half of train.steps, then it is freed and the low expert is loaded for the second
half, each with its own LoRA, optimizer and learning-rate schedule (warmup and cosine restart per phase). Routing
each step to its expert instead (musubi-tuner) keeps the inactive 14B expert in host RAM (~28 GB in bf16;
musubi asks for ~96 GB of host RAM); two phases need none of that, and train.py's loop stays one loop that
`train` runs once per phase.

Files: the high expert's adapter is `pytorch_lora_weights.safetensors`, the low expert's
`pytorch_lora_weights_transformer_2.safetensors` beside it; both use diffusers' `transformer.` key prefix, which
is what `load_lora_weights(..., load_into_transformer_2=True)` expects for the second file.

Checkpoints count steps over the whole run and record the expert in training_state.json (`progress.expert`).
A checkpoint of the low phase also holds the finished high adapter, so it is a complete adapter folder; a
resume skips the phases a checkpoint shows finished and puts the finished high adapter back into output.dir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.config import Recipe
from finetune.errors import UserError
from finetune.formats import COMFY_NAME, TRANSFORMER_2_WEIGHTS_NAME, WEIGHTS_NAME
from finetune.models import Source, model_index, resolve_source

HIGH, LOW = "high", "low"
# Where each expert's adapter goes, and the diffusers component it belongs to.
COMPONENTS = {HIGH: "transformer", LOW: "transformer_2"}
WEIGHTS = {HIGH: WEIGHTS_NAME, LOW: TRANSFORMER_2_WEIGHTS_NAME}


@dataclass(frozen=True)
class Expert:
    """One training phase: a pipeline component, its noise levels and its global step range [first, last)."""

    name: str | None  # "high" | "low"; None for a one-transformer model (the whole run, the whole range)
    component: str  # the diffusers pipeline component trained: transformer | transformer_2
    weights_name: str  # the adapter file this phase writes
    sigma_range: tuple[float, float]
    first_step: int
    last_step: int  # exclusive; steps are counted over the whole run

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step

    def source(self, source: Source) -> Source:
        """The source with this phase's component (the low expert loads from transformer_2/)."""
        return dataclasses.replace(source, component=self.component)

    @property
    def label(self) -> str:
        return f"{self.name}-noise expert ({self.component})" if self.name else "transformer"


def boundary_ratio(base: str) -> float | None:
    """A two-expert pipeline's boundary, or None: model_index.json names a `transformer_2` (save_pretrained
    writes [null, null] for a missing one) and a `boundary_ratio`; diffusers uses transformer_2 only then."""
    index = model_index(base)
    second = index.get("transformer_2")
    has_second = isinstance(second, list | tuple) and len(second) == 2 and second[0] is not None
    ratio = index.get("boundary_ratio")
    return float(ratio) if has_second and ratio is not None else None


def expert(name: str, boundary: float, first_step: int, last_step: int) -> Expert:
    sigma_range = (boundary, 1.0) if name == HIGH else (0.0, boundary)
    return Expert(name, COMPONENTS[name], WEIGHTS[name], sigma_range, first_step, last_step)


def plan(recipe: Recipe, boundary: float | None) -> list[Expert]:
    """The phases of a run from its start: `both` splits train.steps in half (the high expert gets the odd step)."""
    choice, steps = recipe.lora.experts, recipe.train.steps
    if boundary is None:
        if choice != "both":
            raise UserError(
                f"lora.experts: '{choice}' needs a two-expert model (Wan 2.2 A14B: transformer and "
                f"transformer_2 with a boundary_ratio in model_index.json), and {recipe.model.base or recipe.model.path} "
                "has one transformer; remove lora.experts (or set lora.experts=both)"
            )
        return [Expert(None, "transformer", WEIGHTS_NAME, (0.0, 1.0), 0, steps)]
    if choice != "both":
        return [expert(choice, boundary, 0, steps)]
    if steps < 2:
        raise UserError(
            f"train.steps = {steps}: lora.experts=both trains two experts, half of the steps each; "
            "give at least 2 steps (or set lora.experts to high or low)"
        )
    half = (steps + 1) // 2
    return [expert(HIGH, boundary, 0, half), expert(LOW, boundary, half, steps)]


def phases(recipe: Recipe) -> list[tuple[Recipe, Expert]]:
    """What `train` runs, in order: (recipe, expert) per phase, without the phases a resumed checkpoint shows
    finished. Only the first phase run resumes; a phase after it starts fresh."""
    source = resolve_source(recipe.model)
    boundary = boundary_ratio(source.base)
    experts = plan(recipe, boundary)
    if boundary is not None:
        _check_two_expert_recipe(recipe, source)
    if not recipe.train.resume or len(experts) == 1:
        return _resume_first_only(recipe, experts)
    from finetune.checkpoint import STATE_JSON, find_checkpoint

    folder = find_checkpoint(recipe.train.resume, Path(recipe.output.dir))
    state = folder / STATE_JSON
    if not state.is_file():  # load_checkpoint explains what is missing
        return _resume_first_only(recipe, experts)
    saved = json.loads(state.read_text())
    saved_expert, saved_step = saved.get("progress", {}).get("expert"), saved.get("step", 0)
    high, low = experts
    if saved_expert == LOW or (saved_expert == HIGH and saved_step >= high.last_step):
        restore_finished(folder, Path(recipe.output.dir), high)
        if saved_expert == HIGH:  # the high phase ended at this checkpoint: the low one starts fresh
            return [(_without_resume(recipe), low)]
        return [(recipe, low)]
    return _resume_first_only(recipe, experts)


def _resume_first_only(recipe: Recipe, experts: list[Expert]) -> list[tuple[Recipe, Expert]]:
    return [(recipe if i == 0 else _without_resume(recipe), e) for i, e in enumerate(experts)]


def _without_resume(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"resume": None})})


def _check_two_expert_recipe(recipe: Recipe, source: Source) -> None:
    if source.transformer_is_file and recipe.lora.experts == "both":
        raise UserError(
            f"model.path: {source.transformer} is one transformer file, and {source.base} has two experts; "
            "set lora.experts=high or lora.experts=low to say which expert the file is"
        )
    if recipe.train.ema:
        raise UserError(
            f"train.ema = {recipe.train.ema}: an EMA of the LoRA weights is not supported yet on two-expert models "
            "(Wan 2.2 A14B); remove train.ema"
        )
    if recipe.train.validation.every:
        # Validation builds a pipeline around the training transformer; with two experts it would load the
        # other 14B expert from disk beside it, which is what the phases avoid.
        raise UserError(
            f"train.validation.every = {recipe.train.validation.every}: validation samples are not supported "
            "yet on two-expert models (Wan 2.2 A14B); set train.validation.every=0 and sample the adapter "
            "afterwards with `finetune generate`"
        )


def restore_finished(checkpoint: Path, out_dir: Path, finished: Expert) -> None:
    """The finished expert's adapter (and its ComfyUI copy) from a checkpoint back into output.dir."""
    for name in _files_of(finished):
        if (checkpoint / name).is_file():
            _copy_atomic(checkpoint / name, out_dir / name)


def copy_finished(out_dir: Path, folder: Path, current: Expert) -> None:
    """Into a checkpoint of the low phase: the high expert's finished adapter, so that the folder is complete
    (and a resume from it can put it back). Nothing for any other phase."""
    if current.name != LOW or Path(folder).resolve() == Path(out_dir).resolve():
        return
    for name in _files_of(expert(HIGH, 0.0, 0, 0)):
        if (Path(out_dir) / name).is_file():
            _copy_atomic(Path(out_dir) / name, Path(folder) / name)


def comfy_name(weights_name: str) -> str:
    """The ComfyUI file beside an adapter file: one per expert (ComfyUI loads each on its own model)."""
    return (
        COMFY_NAME
        if weights_name == WEIGHTS_NAME
        else weights_name.replace(".safetensors", "_comfy.safetensors")
    )


def _files_of(e: Expert) -> tuple[str, str]:
    return e.weights_name, comfy_name(e.weights_name)


def present(folder: Path) -> list[str]:
    """The experts whose adapter files are in `folder` (for the model card): [], ["high"], ["low"] or both."""
    return [name for name in (HIGH, LOW) if (Path(folder) / WEIGHTS[name]).is_file()]


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.copy.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# --- loading adapters into a two-expert pipeline (finetune generate / merge) --------------------------------


def adapter_parts(file: Path) -> list[tuple[str, Path]]:
    """(pipeline component, file) for one --lora: an adapter folder's main file goes into `transformer` and a
    `pytorch_lora_weights_transformer_2.safetensors` beside it into `transformer_2`; that file named alone (or
    alone in its folder) goes into `transformer_2` only."""
    file = Path(file)
    if file.name == TRANSFORMER_2_WEIGHTS_NAME:
        return [("transformer_2", file)]
    low = file.parent / TRANSFORMER_2_WEIGHTS_NAME
    if file.name == WEIGHTS_NAME and low.is_file():
        return [("transformer", file), ("transformer_2", low)]
    return [("transformer", file)]
