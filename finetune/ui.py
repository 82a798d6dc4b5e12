"""What the user sees: short lines to stderr and progress bars that do not fight them."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def progress(iterable=None, **kwargs) -> tqdm:
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)
