"""Caching throughput on this machine: clips/s for `finetune cache` on a tiny Wan pipeline (CPU).

    python tools/bench_cache.py [--clips 24] [--frames 33] [--source 640x360] [--size 64x64] [--threads N]

Writes `--clips` synthetic clips (a square moving over gray, libx264) of `--frames` frames at `--source`
resolution, builds the tiny Wan pipeline of the tests, then times, each on a fresh cache directory:
  decode    probe + decode + resize every clip to the bucket, no encoders (the data path alone)
  serial    the full `build_cache` with the prefetch thread off (decode and encode take turns); run twice,
            before and after `cache`, so the spread shows how much the machine's load drifted
  cache     the full `build_cache`: probe, hash, decode in a prefetch thread, VAE + text encode, atomic shards
  rerun     `build_cache` again on the finished cache (hash + manifest only; nothing is decoded)
and prints one JSON line. The tiny VAE is far cheaper than Wan's real one, so on a GPU with the real VAE the
encode dominates; this measures the kit's own overhead around it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--source", default="640x360", help="source clip size WxH")
    parser.add_argument("--size", default="64x64", help="target size WxH (data.width x data.height)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    import finetune.cache as cache_module
    from finetune.cache import build_cache
    from finetune.config import build_recipe
    from finetune.data.decode import decode_windows, probe
    from finetune.models import family_for, resolve_source
    from tests.clips import write_video
    from tests.tiny import build_tiny_wan

    if args.threads:
        torch.set_num_threads(args.threads)
    src_w, src_h = map(int, args.source.split("x"))
    width, height = map(int, args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        base = build_tiny_wan(work / "base")
        clips = work / "clips"
        for i in range(args.clips):
            write_video(
                clips / f"clip{i:03d}.mp4", args.frames, src_w, src_h, color=(9 * i % 256, 128, 40), fps=24
            )
            (clips / f"clip{i:03d}.txt").write_text(f"a square moving right number {i}")

        def recipe(cache_dir: str):
            return build_recipe({
                "model": {"path": str(base)},
                "data": {"path": str(clips), "width": width, "height": height, "frames": args.frames},
                "cache": {"dir": str(work / cache_dir), "max_sequence_length": 16},
                "output": {"dir": str(work / "out")},
            })  # fmt: skip

        r = recipe("cache")
        source = resolve_source(r.model)
        family = family_for(r.model, source)

        started = time.perf_counter()
        for path in sorted(clips.glob("*.mp4")):
            info = probe(path)
            frames = family.valid_frames(min(info.frames, args.frames))
            for _ in decode_windows(path, [tuple(range(frames))], width, height):
                pass
        decode_s = time.perf_counter() - started

        # Serial first, then prefetch, then serial again: load from other processes drifts, so the two serial
        # runs bracket the prefetch run and show how much of a difference is noise.
        prefetch = cache_module._prefetch
        serial_s = []
        for attempt in ("serial-1", "cache", "serial-2"):
            cache_module._prefetch = (
                prefetch if attempt == "cache" else (lambda iterable, depth=1: iter(iterable))
            )
            started = time.perf_counter()
            result = build_cache(recipe(attempt), family, source)
            seconds = time.perf_counter() - started
            assert result.new == args.clips, result.summary()
            if attempt == "cache":
                cache_s = seconds
            else:
                serial_s.append(seconds)
        cache_module._prefetch = prefetch

        started = time.perf_counter()
        build_cache(r, family, source)
        rerun_s = time.perf_counter() - started

        print(
            json.dumps(
                {
                    "clips": args.clips,
                    "frames": args.frames,
                    "source": args.source,
                    "size": args.size,
                    "torch_threads": torch.get_num_threads(),
                    "decode_clips_per_s": round(args.clips / decode_s, 2),
                    "cache_clips_per_s": round(args.clips / cache_s, 2),
                    "serial_clips_per_s": [round(args.clips / x, 2) for x in serial_s],
                    "rerun_s": round(rerun_s, 3),
                }
            )  # fmt: skip
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
