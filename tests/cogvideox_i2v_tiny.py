"""A tiny CogVideoX 1.0 5B-I2V layout (tests.family_tiny.build_tiny_cogvideox with `image_to_video`): learned
positional embeddings at its one trained size, as the real 5B-I2V at 720x480x49."""

from __future__ import annotations

from pathlib import Path

from tests.family_tiny import build_tiny_cogvideox

SIZE, FRAMES, TEXT = 32, 9, 16  # the one size the learned positional embeddings cover


def build_tiny_cogvideox_i2v(folder: Path, seed: int = 0) -> Path:
    return build_tiny_cogvideox(folder, seed, text_length=TEXT, image_to_video=True, trained_size=SIZE)
