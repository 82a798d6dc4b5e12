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
    build_cache(recipe, family_for(recipe.model, source), source)


def cmd_train(args) -> None:
    from finetune.train import train

    train(_recipe(args))


def cmd_check_data(args) -> None:
    from finetune.check import check_data

    check_data(args.target, args.overrides)


def cmd_generate(args) -> None:
    from finetune.generate import GenerateSettings, export, generate_frames, load_pipeline
    from finetune.lora import parse_lora_arg

    pipe, family = load_pipeline(args.model, [parse_lora_arg(x) for x in args.lora], args.family, args.base)
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
    )
    path = export(generate_frames(pipe, family, settings), Path(args.out), settings.fps)
    print(path)


def cmd_merge(args) -> None:
    from finetune.generate import merge
    from finetune.lora import parse_lora_arg

    merge(
        args.model, [parse_lora_arg(x) for x in args.lora], Path(args.out), args.transformer_only, args.base
    )


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
    with_recipe("train", cmd_train, "train a LoRA (runs the cache stage first when needed)")

    p = sub.add_parser("check-data", help="check a dataset folder (or a recipe's data.path) before caching")
    p.add_argument("target", help="recipe .yaml or data folder")
    p.add_argument("overrides", nargs="*", metavar="a.b=value")
    p.set_defaults(func=cmd_check_data)

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
    p.add_argument("--out", required=True, help="output file: .mp4, .gif or .png")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="fuse adapters into the base model and save it")
    p.add_argument("--model", required=True)
    p.add_argument("--base", help="folder or hub id with the other components when --model is a file")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--transformer-only", action="store_true", help="save only the fused transformer")
    p.set_defaults(func=cmd_merge)

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
