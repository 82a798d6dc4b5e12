"""What the model is learning, while it learns: sample videos at fixed prompts and seeds, and a loss on held-out
cached items at fixed sigmas and noise (the training loss jumps with each step's random sigma and noise).

Memory: the text encoder is loaded once before training, encodes the validation prompts, and is freed (umT5-XXL
is ~11 GB in bf16: it must not sit beside the transformer). The VAE (~0.25 GB for Wan 2.1) waits in CPU memory
and visits the GPU only to decode. Each validation builds a pipeline around the training transformer (nothing
is reloaded) and drops it afterwards; `last_pipeline` is a weak reference so tests can check it is gone.
"""

from __future__ import annotations

import gc
import random
import weakref
from pathlib import Path

import torch

from finetune import flow
from finetune.config import Recipe
from finetune.data.batches import collate
from finetune.errors import UserError
from finetune.models import Family, Source
from finetune.ui import say


def split_holdout(files: list[Path], holdout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(training items, held-out items): `holdout` distinct items chosen by the seed, the same on every resume.
    `files` may repeat a shard (data repeats); every copy of a held-out shard leaves training, so the
    validation loss is never measured on an item the model trains on."""
    if holdout == 0:
        return list(files), []
    unique = list(dict.fromkeys(files))
    if holdout >= len(unique):
        raise UserError(
            f"train.validation.holdout={holdout}: the cache has only {len(unique)} distinct items and at least "
            "one must remain for training; lower it"
        )
    chosen = {unique[i] for i in random.Random(seed).sample(range(len(unique)), holdout)}
    return [f for f in files if f not in chosen], [f for f in unique if f in chosen]


@torch.no_grad()
def fixed_noise_loss(
    transformer, family, files: list[Path], text_length: int, seed: int = 0, sigmas=(0.25, 0.5, 0.75)
):
    """Flow loss on cached items at fixed sigmas and fixed noise: a learning signal without sampling noise.
    Its own generator: the training's random state is not touched."""
    from safetensors.torch import load_file

    param = next(transformer.parameters())
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for path in files:
        batch = collate([load_file(str(path))], text_length)
        x0 = batch["latents"].to(param.device, param.dtype)
        text = batch["text"].to(param.device, param.dtype)
        extras = {
            k: v.to(param.device, param.dtype) for k, v in batch.items() if k not in ("latents", "text")
        }
        for sigma in sigmas:
            s = torch.tensor([sigma])
            noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            prediction = family.predict(
                transformer,
                flow.add_noise(x0, noise, s),
                flow.timesteps_from_sigmas(s).to(x0.device),
                text,
                extras,
            )
            total += flow.flow_loss(prediction, flow.velocity_target(x0, noise)).item()
            count += 1
    return total / count


class Validation:
    def __init__(
        self,
        recipe: Recipe,
        family: Family,
        source: Source,
        holdout: list[Path],
        device: torch.device,
        text_dtype: torch.dtype,
    ):
        v = recipe.train.validation
        self.recipe, self.family, self.source, self.holdout, self.device = (
            recipe,
            family,
            source,
            holdout,
            device,
        )
        self.prompts = list(v.prompts)
        self.last_pipeline: weakref.ref | None = None
        self.vae = None
        self.embeds: list[torch.Tensor] = []
        self.negative: torch.Tensor | None = None
        if self.prompts:
            say(f"encoding {len(self.prompts)} validation prompt(s)")
            encoders = family.load_encoders(source, device, text_dtype)
            length = recipe.cache.max_sequence_length
            texts = family.encode_prompts(encoders, [*self.prompts, ""], length)
            # Zero-padded to the pipeline's length, as the pipeline pads its own prompts.
            padded = [collate([{"latents": torch.zeros(1), "text": t}], length)["text"] for t in texts]
            self.embeds, self.negative = padded[:-1], padded[-1]
            self.vae = encoders.vae.to("cpu")
            del encoders, texts
            free_memory()

    def loss(self, transformer) -> float | None:
        if not self.holdout:
            return None
        was_training = transformer.training
        transformer.eval()
        try:
            return fixed_noise_loss(
                transformer,
                self.family,
                self.holdout,
                self.recipe.cache.max_sequence_length,
                self.recipe.train.seed,
            )
        finally:
            transformer.train(was_training)

    def samples(self, transformer, folder: Path, log=None, step: int = 0, tag: str = "samples") -> list[Path]:
        """One video per prompt under `folder`, at the validation size and seed. `transformer` is the unwrapped
        training transformer; it is put back in train mode afterwards."""
        if not self.prompts:
            return []
        from finetune.generate import export

        v = self.recipe.train.validation
        m = self.family.size_multiple
        width, height = max(m, v.width // m * m), max(m, v.height // m * m)
        frames = self.family.valid_frames(v.frames)
        was_training = transformer.training
        transformer.eval()
        pipe = self._pipeline(transformer)
        self.last_pipeline = weakref.ref(pipe)
        paths = []
        try:
            for i, (prompt, embeds) in enumerate(zip(self.prompts, self.embeds, strict=True)):
                out = pipe(
                    prompt_embeds=embeds.to(self.device),
                    negative_prompt_embeds=self.negative.to(self.device),
                    width=width,
                    height=height,
                    num_frames=frames,
                    num_inference_steps=v.steps,
                    generator=torch.Generator(self.device).manual_seed(v.seed + i),
                    output_type="np",
                )
                video = (out.frames[0].clip(0, 1) * 255).round().astype("uint8")
                del out
                paths.append(export(video, folder / f"{i:02d}-{_slug(prompt)}.mp4"))
                if log is not None:
                    log.record_video(f"{tag}/{i:02d}", video, step)
        finally:
            del pipe
            self.vae.to("cpu")
            transformer.train(was_training)
            free_memory()
        return paths

    def _pipeline(self, transformer):
        """The family's pipeline around the in-memory transformer: only the scheduler's config is read."""
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(
            self.source.base,
            transformer=transformer,
            vae=self.vae.to(self.device),
            text_encoder=None,
            tokenizer=None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _slug(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words)[:40] or "prompt"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
