"""Seeking vs decoding from the start: seconds per clip for windows late in a long clip (CPU).

    python tools/bench_seek.py [--frames 900] [--source 1280x720] [--fps 30] [--gop 30] [--size 832x480]

Writes one synthetic clip (a noise texture panning under a moving square, libx264, a keyframe every --gop frames, like phone footage at about one per second),
then times `decode_windows` for three extraction patterns, once with seeking (the default) and once with it
turned off (`seek.SEEK_MIN_SKIP` set out of reach), checks both give pixel-equal frames, and prints one JSON line:
  late     one 33-frame window starting at 80% of the clip (a `slide`/`chain` window near the end)
  uniform  33 frames spread over the whole clip (`uniform`)
  slide    33-frame windows every 200 frames (`slide` with a large `frame_stride`)
Each pattern is timed --repeat times per mode, alternating, and the best time is kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_clip(path: Path, frames: int, width: int, height: int, fps: int, gop: int) -> None:
    import av
    import numpy as np

    from tests.clips import frame_pattern

    # A detailed texture panning sideways: flat synthetic frames decode far faster than real footage does.
    texture = np.random.default_rng(0).integers(0, 256, (height, width + frames, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(gop), "keyint_min": str(gop)}
        for i in range(frames):
            picture = (
                texture[:, i : i + width] // 2 + frame_pattern(i, frames, width, height, (255, 0, 0)) // 2
            )
            picture[: height // 8, : width // 8] = (i * 7) % 256  # a per-frame mark, so frames differ
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=900)
    parser.add_argument("--source", default="1280x720")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=30)
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from finetune.data import seek
    from finetune.data.decode import decode_windows

    src_w, src_h = map(int, args.source.split("x"))
    width, height = map(int, args.size.split("x"))
    n = args.frames
    start = int(n * 0.8)
    patterns = {
        "late": [tuple(range(start, start + 33))],
        "uniform": [tuple(round(i * (n - 1) / 32) for i in range(33))],
        "slide": [tuple(range(s, s + 33)) for s in range(0, n - 33, 200)],
    }
    report = {
        "clip": f"{n} frames {args.source} @{args.fps} fps, keyframe every {args.gop}",
        "size": args.size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "long.mp4"
        began = time.perf_counter()
        write_clip(clip, n, src_w, src_h, args.fps, args.gop)
        report["write_s"] = round(time.perf_counter() - began, 2)
        default = seek.SEEK_MIN_SKIP
        for name, windows in patterns.items():
            best = {"seek": float("inf"), "from_start": float("inf")}
            outputs = {}
            for _ in range(args.repeat):
                for mode, skip in (("seek", default), ("from_start", 10**9)):
                    seek.SEEK_MIN_SKIP = skip
                    began = time.perf_counter()
                    outputs[mode] = dict(decode_windows(clip, windows, width, height))
                    best[mode] = min(best[mode], time.perf_counter() - began)
            seek.SEEK_MIN_SKIP = default
            same = all(bool((outputs["seek"][k] == outputs["from_start"][k]).all()) for k in outputs["seek"])
            report[name] = {
                "seek_s": round(best["seek"], 3),
                "from_start_s": round(best["from_start"], 3),
                "speedup": round(best["from_start"] / best["seek"], 2),
                "pixel_equal": same,
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
