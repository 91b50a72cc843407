"""Synthetic clips for upload and modify-video tests."""

from __future__ import annotations

import numpy as np

from app.media import encode_mp4


def moving_square_frames(*, frames: int = 12, size: int = 64, colour=(230, 30, 30), direction: str = "right") -> np.ndarray:
    out = np.zeros((frames, size, size, 3), dtype=np.uint8)
    side = size // 4
    for t in range(frames):
        offset = int((size - side) * t / max(frames - 1, 1))
        x, y = {"right": (offset, size // 2 - side // 2), "left": (size - side - offset, size // 2 - side // 2),
                "down": (size // 2 - side // 2, offset), "up": (size // 2 - side // 2, size - side - offset)}[direction]
        out[t, y:y + side, x:x + side] = colour
    return out


def moving_square_mp4(**kwargs) -> bytes:
    return encode_mp4(moving_square_frames(**kwargs), fps=8)
