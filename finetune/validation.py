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

from finetune import flow, objectives
from finetune.config import Recipe
from finetune.data.batches import collate, extras_of, text_tensors
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
        extras = extras_of(batch, param.device, param.dtype)
        for sigma in sigmas:
            s = torch.tensor([sigma])
            noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            noisy, timesteps, keep = objectives.condition(
                family, x0, flow.add_noise(x0, noise, s), flow.timesteps_from_sigmas(s).to(x0.device), extras
            )
            prediction = family.predict(transformer, noisy, timesteps, text, extras)
            total += objectives.loss(prediction, flow.velocity_target(x0, noise), keep).item()
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
        clip_for_images: Path | None = None,  # image-to-video models: the cached clip samples start from
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
        self.images: dict = {}  # an image-to-video model's first (and last) frame, for every sample
        self.embeds: list[dict[str, torch.Tensor]] = []  # per prompt: `text` (and a family's `text_*`)
        self.negative: dict[str, torch.Tensor] | None = None
        if self.prompts:
            say(f"encoding {len(self.prompts)} validation prompt(s)")
            encoders = family.load_encoders(source, device, text_dtype)
            length = recipe.cache.max_sequence_length
            texts = family.encode_prompts(encoders, [*self.prompts, ""], length)
            # Zero-padded to the pipeline's length, as the pipeline pads its own prompts.
            padded = [collate([{"latents": torch.zeros(1), **text_tensors([t])}], length) for t in texts]
            padded = [{k: v for k, v in p.items() if k != "latents"} for p in padded]
            self.embeds, self.negative = padded[:-1], padded[-1]
            # An image-to-video model (Wan I2V / FLF2V) samples from the first (and last) frame of a cached clip.
            if "t2v" not in family.modes and clip_for_images is not None:
                self.images = condition_images(encoders.vae, clip_for_images, "last_image" in family.modes)
            elif "t2v" not in family.modes:
                say("note: no cached clip to take a first frame from: validation samples are skipped")
                self.prompts = []
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
        width, height, frames = self.family.fit(v.width, v.height, v.frames)
        width, height = max(m, width), max(m, height)  # a too-small validation size: one multiple
        was_training = transformer.training
        transformer.eval()
        pipe = self._pipeline(transformer)
        self.last_pipeline = weakref.ref(pipe)
        paths = []
        try:
            for i, (prompt, embeds) in enumerate(zip(self.prompts, self.embeds, strict=True)):
                out = pipe(
                    **self._text_kwargs(embeds),
                    width=width,
                    height=height,
                    num_frames=frames,
                    num_inference_steps=v.steps,
                    generator=torch.Generator(self.device).manual_seed(v.seed + i),
                    output_type="np",
                    **self.images,
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

    def _text_kwargs(self, embeds: dict[str, torch.Tensor]) -> dict:
        prompt = {k: v.to(self.device) for k, v in embeds.items()}
        negative = {k: v.to(self.device) for k, v in self.negative.items()}
        if self.family.pipeline_text_kwargs:  # e.g. HunyuanVideo: mask and pooled CLIP embedding too
            return self.family.pipeline_text_kwargs(prompt, negative)
        return {"prompt_embeds": prompt["text"], "negative_prompt_embeds": negative["text"]}

    def _pipeline(self, transformer):
        """The family's pipeline around the in-memory transformer: only the scheduler's config is read."""
        from diffusers import DiffusionPipeline

        from finetune.models import model_index

        # No text encoder or tokenizer (HunyuanVideo has two of each): the prompts are already encoded.
        unused = {k: None for k in model_index(self.source.base) if k.startswith(("text_enc", "tokenizer"))}
        pipe = DiffusionPipeline.from_pretrained(
            self.source.base,
            transformer=transformer,
            vae=self.vae.to(self.device),
            **unused,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


@torch.no_grad()
def condition_images(vae, item: Path, last: bool) -> dict:
    """{"image": first frame (, "last_image": last frame)} of a cached clip as PIL images, decoded from its
    latents (the cache keeps no pixels): what an image-to-video model's validation samples start from. Decoding
    only the first latent frame gives the first frame (the VAE is causal); the last frame needs the whole clip."""
    from PIL import Image
    from safetensors.torch import load_file

    param = next(vae.parameters())
    latents = load_file(str(item))["latents"].unsqueeze(0).to(param.device, param.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    video = vae.decode((latents if last else latents[:, :, :1]) * std + mean).sample[0].float().cpu()

    def picture(frame: torch.Tensor):
        return Image.fromarray(((frame.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())

    return {"image": picture(video[:, 0])} | ({"last_image": picture(video[:, -1])} if last else {})


def _slug(text: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words)[:40] or "prompt"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
