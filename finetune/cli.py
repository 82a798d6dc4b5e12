"""The `finetune` command: parses, loads the recipe, calls one function. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from finetune.errors import UserError


def _recipe(args):
    from finetune.config import load_recipe

    return load_recipe(args.recipe, args.overrides)


def cmd_cache(args) -> None:
    from finetune.cache import build_cache
    from finetune.models import family_for, resolve_source

    recipe = _recipe(args)
    source = resolve_source(recipe.model)
    build_cache(recipe, family_for(recipe.model, source), source, clean=args.clean)


def cmd_train(args) -> None:
    from finetune.train import train

    train(_recipe(args))


def cmd_check_data(args) -> None:
    from finetune.check import check_data

    check_data(args.target, args.overrides, as_json=args.json)


def cmd_caption(args) -> None:
    from finetune.caption import caption_folder
    from finetune.ui import say

    report = caption_folder(
        args.folder, model=args.model, overwrite=args.overwrite, trigger=args.trigger, prompt=args.prompt
    )
    for problem in report.skipped:
        say(f"skipped {problem.path}: {problem.reason}")
    say(report.summary())


def cmd_generate(args) -> None:
    from finetune.generate import GenerateSettings, export, generate_frames, generation_mode, load_pipeline
    from finetune.lora import parse_lora_arg

    settings = GenerateSettings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        frames=1 if Path(args.out).suffix.lower() == ".png" else args.frames,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        max_sequence_length=args.max_sequence_length,
        fps=args.fps,
        image=args.image,
        last_image=args.last_image,
        video=args.video,
        strength=args.strength,
        extend=args.extend,
    )
    pipe, family = load_pipeline(
        args.model,
        [parse_lora_arg(x) for x in args.lora],
        args.family,
        args.base,
        generation_mode(settings),
        args.offload,
    )
    path = export(generate_frames(pipe, family, settings), Path(args.out), settings.fps)
    print(path)


def cmd_merge(args) -> None:
    from finetune.generate import merge
    from finetune.lora import merge_into_lora, parse_lora_arg

    loras = [parse_lora_arg(x) for x in args.lora]
    if args.into_lora:
        if args.model or args.transformer_only:
            raise UserError("merge --into-lora writes one adapter: drop --model/--transformer-only")
        merge_into_lora(loras, Path(args.out), args.rank)
        return
    if args.rank is not None:
        raise UserError("merge --rank: only with --into-lora (a merge into the base has no rank)")
    if not args.model:
        raise UserError("merge: give --model (to fuse into the base) or --into-lora (to make one adapter)")
    merge(args.model, loras, Path(args.out), args.transformer_only, args.base)


def cmd_convert(args) -> None:
    from finetune.formats import convert

    print(convert(args.adapter, args.to, args.out, allow_pickle=args.allow_pickle))


def cmd_inspect(args) -> None:
    import json

    from finetune.lora import inspect_adapter

    facts = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"{key:<{width}}  {'-' if shown is None else shown}")


def cmd_resize(args) -> None:
    from finetune.lora import resize_adapter

    out, energy, per_layer = resize_adapter(args.adapter, args.rank, Path(args.out))
    for name, kept in per_layer.items():
        print(f"{name}  {kept:.4%}")
    print(f"overall  {energy:.4%}  -> {out}")


def cmd_push(args) -> None:
    from finetune.hub import push

    push(args.adapter, args.repo, private=args.private, dry_run=args.dry_run)


def cmd_estimate(args) -> None:
    from finetune.estimate import estimate, format_table

    result = estimate(_recipe(args))
    print(result.to_json() if args.json else format_table(result))


def cmd_demo(args) -> None:
    from finetune.demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description="LoRA fine-tuning for video diffusion transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(name: str, func, help_: str) -> None:
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="recipe .yaml")
        p.add_argument("overrides", nargs="*", metavar="a.b=value", help="override any recipe key")
        p.set_defaults(func=func)

    with_recipe("cache", cmd_cache, "check the clips and encode latents + text embeddings to cache.dir")
    sub.choices["cache"].add_argument(
        "--clean",
        action="store_true",
        help="also remove stale entries (sources gone or changed, stray shards)",
    )
    with_recipe("train", cmd_train, "train a LoRA (runs the cache stage first when needed)")
    p = sub.add_parser("estimate", help="predict peak GPU memory for caching, training and generation (CPU)")
    p.add_argument("recipe", help="recipe .yaml")
    p.add_argument("overrides", nargs="*", metavar="a.b=value", help="override any recipe key")
    p.add_argument("--json", action="store_true", help="print JSON (train_peak_gb, cache_peak_gb, ...)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("check-data", help="check a dataset folder (or a recipe's data.path) before caching")
    p.add_argument(
        "target", help="recipe .yaml, data folder, or Hub dataset id (owner/name, from the local cache)"
    )
    p.add_argument("overrides", nargs="*", metavar="a.b=value")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=cmd_check_data)

    # Defaults live in finetune/caption.py (importing it here would load torch for every command).
    p = sub.add_parser("caption", help="write a .txt caption beside each image/clip without one (a VLM)")
    p.add_argument("folder", help="data folder (searched recursively)")
    p.add_argument("--model", help="VLM hub id or folder (default: HuggingFaceTB/SmolVLM-256M-Instruct)")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    p.add_argument("--trigger", help="put this word first in every new caption")
    p.add_argument("--prompt", help="what to ask the model (default: a one-to-two-sentence description)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("generate", help="generate a video with the base model and any adapters")
    p.add_argument("--model", required=True, help="hub id, diffusers folder, or .safetensors transformer")
    p.add_argument("--base", help="folder or hub id with the other components when --model is a file")
    p.add_argument("--family", help="model family (inferred from model_index.json when omitted)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--max-sequence-length", type=int, default=512)
    p.add_argument("--image", metavar="PNG", help="animate this image: it becomes the first frame")
    p.add_argument("--last-image", metavar="PNG", help="with --image: the last frame (keyframes)")
    p.add_argument("--video", metavar="MP4", help="restyle this clip (SDEdit, see --strength)")
    p.add_argument("--strength", type=float, default=0.7, help="--video: noise level 0..1 (default 0.7)")
    p.add_argument("--extend", metavar="MP4", help="continue this clip from its last frames")
    p.add_argument("--out", required=True, help="output file: .mp4, .gif or .png (one frame)")
    p.add_argument("--offload", choices=["auto", "none", "model", "blocks"], default="auto",
                   help="model: text encoder on the CPU, transformer and VAE take turns on the GPU; blocks: also "
                        "stream the transformer block by block (auto: the fastest that fits)")  # fmt: skip
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="fuse adapters into the base model (or, --into-lora, into one adapter)")
    p.add_argument("--model", help="the base to fuse into (not with --into-lora)")
    p.add_argument("--base", help="folder or hub id with the other components when --model is a file")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--transformer-only", action="store_true", help="save only the fused transformer")
    p.add_argument("--into-lora", action="store_true", help="write one adapter: the weighted sum (exact)")
    p.add_argument("--rank", type=int, help="with --into-lora: re-factor the sum to this rank by SVD")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="rewrite an adapter as diffusers, ComfyUI or a peft folder")
    p.add_argument("adapter", help="adapter folder or file (diffusers, ComfyUI, kohya/musubi, peft)")
    p.add_argument("--to", required=True, choices=["diffusers", "comfy", "peft"])
    p.add_argument("--out", required=True, help="output folder, or a .safetensors file (diffusers, comfy)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a .pt/.bin/.ckpt file (tensors only: torch.load(weights_only=True))")  # fmt: skip
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="what an adapter is: format, family, base, rank, targets, training")
    p.add_argument("adapter", help="adapter folder, file or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("resize", help="re-factor an adapter to a lower rank by SVD (reports energy kept)")
    p.add_argument("adapter")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("push", help="upload an adapter folder to the Hugging Face Hub")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--repo", required=True, metavar="OWNER/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "demo", help="the offline demo: tiny model, synthetic clips, cache, train, before/after"
    )
    p.add_argument("--out", default="demo-out", help="output folder (default: ./demo-out)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on import, on every CPU machine, about an optional kernel package we do not use.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
