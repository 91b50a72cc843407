"""What is in a clip: the moving object's colour, where it is per frame, which way it goes.

Works on decoded uint8 RGB frames [T,H,W,3], typically what came back out of an MP4 the system
produced, so nothing here trusts exact pixel values: H.264 blurs edges, rings a little, and
yuv420p keeps colour at half resolution. The background is whatever colour most pixels have
(per-channel median), the object is what stands clearly away from it, and decisions are made on
the object's core, not its edges.

Only numpy is needed; `h264_roundtrip` imports PyAV when called.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np

# The prompt colour names, as the demo model is trained to paint them. Matching is nearest
# neighbour, so a clip only has to be closer to its colour than to any other.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 200, 60),
    "cyan": (40, 210, 230),
    "blue": (50, 90, 240),
    "purple": (140, 60, 230),
    "magenta": (220, 50, 220),
    "pink": (250, 140, 190),
    "white": (240, 240, 240),
}

# Below this distance from the background (RGB, 0..255 units) nothing counts as an object:
# codec noise on a flat background stays well under it.
MIN_CONTRAST = 40.0


def _check(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T,H,W,3], got {frames.shape}")
    return frames


def background_colour(frames: np.ndarray) -> np.ndarray:
    """Per-channel median over (a subsample of) the clip, float RGB."""
    frames = _check(frames)
    step_t = max(1, frames.shape[0] // 16)
    sample = frames[::step_t, ::2, ::2].reshape(-1, 3)
    return np.median(sample, axis=0).astype(np.float32)


def distance_from_background(frames: np.ndarray) -> np.ndarray:
    """[T,H,W] Euclidean RGB distance of every pixel from the background colour."""
    frames = _check(frames)
    diff = frames.astype(np.float32) - background_colour(frames)
    return np.sqrt((diff * diff).sum(axis=-1))


def _contrast(dist: np.ndarray) -> float:
    # The typical brightest-object distance: median of per-frame maxima, so one frame of codec
    # garbage (or one frame where the object left) does not set the scale.
    return float(np.median(dist.reshape(dist.shape[0], -1).max(axis=1)))


def object_weights(frames: np.ndarray) -> np.ndarray:
    """[T,H,W] soft object mask in 0..1: 0 below a quarter of the object's contrast, 1 above
    three quarters. Soft, so centroids move smoothly by sub-pixel amounts."""
    dist = distance_from_background(frames)
    contrast = _contrast(dist)
    if contrast < MIN_CONTRAST:
        return np.zeros_like(dist)
    return np.clip((dist / contrast - 0.25) / 0.5, 0.0, 1.0)


def mean_object_colour(frames: np.ndarray) -> np.ndarray | None:
    """Mean RGB of the object's core (pixels at >= 70% of its contrast); None if no object."""
    frames = _check(frames)
    dist = distance_from_background(frames)
    contrast = _contrast(dist)
    if contrast < MIN_CONTRAST:
        return None
    core = dist >= 0.7 * contrast
    return frames[core].astype(np.float64).mean(axis=0)


def nearest_colour(rgb, palette: dict[str, tuple[int, int, int]] = PALETTE) -> str:
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(palette, key=lambda name: float(((np.asarray(palette[name]) - rgb) ** 2).sum()))


def dominant_colour(frames: np.ndarray, palette: dict[str, tuple[int, int, int]] = PALETTE) -> str:
    """Name of the palette colour closest to the object's mean colour, background excluded;
    'none' when nothing stands out from the background."""
    mean = mean_object_colour(frames)
    return "none" if mean is None else nearest_colour(mean, palette)


def centroid_track(frames: np.ndarray) -> list[tuple[float, float]]:
    """Object centroid (x, y) in pixels per frame; (nan, nan) for a frame with no object."""
    weights = object_weights(frames)
    _, height, width = weights.shape
    ys = np.arange(height, dtype=np.float64)[:, None]
    xs = np.arange(width, dtype=np.float64)[None, :]
    track = []
    for w in weights:
        total = float(w.sum())
        if total < 1.0:  # less than one pixel's worth of object
            track.append((math.nan, math.nan))
            continue
        track.append((float((w * xs).sum() / total), float((w * ys).sum() / total)))
    return track


def motion_direction(frames: np.ndarray, min_travel: float | None = None) -> str:
    """'left' / 'right' / 'up' / 'down' (screen directions: up is towards row 0), or 'none'.

    Fits a straight line to the centroid track (robust to a jittery frame) and takes its larger
    component; 'none' when the fitted travel over the clip is under `min_travel` pixels
    (default: 5% of the short side, at least 2 px) or the object is seen in fewer than 2 frames.
    """
    frames = _check(frames)
    track = np.asarray(centroid_track(frames), dtype=np.float64)
    index = np.arange(len(track), dtype=np.float64)
    seen = ~np.isnan(track[:, 0])
    if seen.sum() < 2:
        return "none"
    if min_travel is None:
        min_travel = max(2.0, 0.05 * min(frames.shape[1], frames.shape[2]))
    t = index[seen]
    span = t.max() - t.min()
    dx = np.polyfit(t, track[seen, 0], 1)[0] * span
    dy = np.polyfit(t, track[seen, 1], 1)[0] * span
    if max(abs(dx), abs(dy)) < min_travel:
        return "none"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def h264_roundtrip(frames: np.ndarray, *, fps: int = 12, crf: int = 23) -> np.ndarray:
    """Encode to H.264 (libx264, yuv420p, in MP4) and decode back to uint8 RGB, as a viewer of
    the system's output would see the clip."""
    import av

    frames = _check(frames)
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    decoded = []
    with av.open(io.BytesIO(out.getvalue()), mode="r") as container:
        for frame in container.decode(container.streams.video[0]):
            decoded.append(frame.to_ndarray(format="rgb24"))
    return np.stack(decoded)
