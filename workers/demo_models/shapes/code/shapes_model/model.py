"""ShapesVideoModel: the interface the dreamq worker calls (load, generate, validate_prompt)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from .nets import RecolourNet, ShapesGenerator, background_estimate, object_coordinates
from .vocab import COLOURS, DIRECTIONS, SHAPES, TOKEN_ID, TOKENS, parse_prompt

# Used only when a bundle's model.json has no limits: the same numbers it ships with.
DEFAULT_LIMITS = {
    "width": {"min": 32, "max": 512, "multiple_of": 2},
    "height": {"min": 32, "max": 512, "multiple_of": 2},
    "num_frames": {"min": 1, "max": 120},
}


class GenerationCancelled(Exception):
    """on_step asked to stop; raised at a step boundary, nothing partial is returned."""


def _seed64(seed: int) -> int:
    # Any Python int is a valid seed (negative, huge); torch wants 0..2**64-1.
    return int(seed) % (1 << 64)


class ShapesVideoModel:
    def __init__(self, generator: ShapesGenerator, recolour: RecolourNet, config: dict, limits: dict,
                 device: torch.device):
        self.generator = generator
        self.recolour = recolour
        self.config = config
        self.limits = limits
        self.device = device

    @classmethod
    def load(cls, bundle_dir: Path, device: "torch.device | str", load_weights=None) -> "ShapesVideoModel":
        """`load_weights(path, device) -> dict of tensors`: the worker passes its staged loader
        (straight to device memory through pinned buffers); standalone, safetensors is used."""
        bundle_dir = Path(bundle_dir)
        device = torch.device(device)
        config = json.loads((bundle_dir / "weights" / "config.json").read_text())
        if tuple(config["vocab"]) != TOKENS:
            raise ValueError("weights were trained with a different vocabulary than this code has")
        model_json = bundle_dir / "model.json"
        info = json.loads(model_json.read_text()) if model_json.is_file() else {}
        limits = {**DEFAULT_LIMITS, **info.get("limits", {})}
        weights = bundle_dir / "weights" / "model.safetensors"
        if load_weights is not None:
            tensors = load_weights(weights, device)
        else:
            # To CPU first: safetensors then maps the file instead of touching the device
            # allocator once per tensor.
            tensors = load_file(str(weights), device="cpu")
        generator = ShapesGenerator(len(TOKENS), **config["generator"])
        recolour = RecolourNet(len(TOKENS), **config["recolour"])
        generator.load_state_dict(_with_prefix(tensors, "generator."), strict=True)
        recolour.load_state_dict(_with_prefix(tensors, "recolour."), strict=True)
        generator.to(device).eval().requires_grad_(False)
        recolour.to(device).eval().requires_grad_(False)
        return cls(generator, recolour, config, limits, device)

    # -- prompts ------------------------------------------------------------------------------

    def resolve_prompt(self, prompt: str, seed: int) -> dict[str, str]:
        """Which colour, shape and direction a (prompt, seed) renders."""
        resolved, _ = self._resolve(prompt, seed)
        return resolved

    def validate_prompt(self, prompt: str) -> list[str]:
        parsed = parse_prompt(prompt or "")
        warnings = []
        for kind, value in (("colour", parsed.colour), ("shape", parsed.shape), ("direction", parsed.direction)):
            if value is None:
                warnings.append(f"no {kind} named: one is picked from the seed")
        for kind, values in parsed.conflicts.items():
            warnings.append(f"several {kind}s named ({', '.join(values)}): using the last, {values[-1]}")
        if parsed.unknown:
            warnings.append("words outside the vocabulary are ignored: " + ", ".join(parsed.unknown))
        return warnings

    def _resolve(self, prompt: str, seed: int) -> tuple[dict[str, str], torch.Tensor]:
        parsed = parse_prompt(prompt or "")
        rng = torch.Generator(device="cpu").manual_seed(_seed64(seed))
        # Always drawn, in this order, whether or not the prompt names them: adding a colour to
        # a prompt then changes the colour only, not where the object starts.
        picks = torch.randint(0, 1 << 30, (3,), generator=rng).tolist()
        z = torch.randn(1, self.generator.latent_dim, generator=rng)
        resolved = {
            "colour": parsed.colour or COLOURS[picks[0] % len(COLOURS)],
            "shape": parsed.shape or SHAPES[picks[1] % len(SHAPES)],
            "direction": parsed.direction or DIRECTIONS[picks[2] % len(DIRECTIONS)],
        }
        return resolved, z

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompt: str, *, width: int, height: int, num_frames: int, seed: int,
                 input_video: "np.ndarray | None" = None,
                 on_step: "Callable[[int, int], bool] | None" = None) -> np.ndarray:
        """uint8 [num_frames, height, width, 3] RGB. One step per output frame: on_step(done,
        total) after each, total == num_frames; a falsy return other than None cancels."""
        self._check_params(width=width, height=height, num_frames=num_frames)
        resolved, z = self._resolve(prompt, seed)
        with torch.inference_mode():
            if input_video is not None:
                return self._recolour(input_video, resolved["colour"], width, height, num_frames, on_step)
            return self._render(resolved, z, width, height, num_frames, on_step)

    def _check_params(self, **values: int) -> None:
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r}")
            bound = self.limits.get(name, {})
            if "min" in bound and value < bound["min"]:
                raise ValueError(f"{name} must be at least {bound['min']} (got {value})")
            if "max" in bound and value > bound["max"]:
                raise ValueError(f"{name} must be at most {bound['max']} (got {value})")
            if bound.get("multiple_of") and value % bound["multiple_of"]:
                raise ValueError(f"{name} must be a multiple of {bound['multiple_of']} (got {value})")

    def _render(self, resolved: dict[str, str], z: torch.Tensor, width: int, height: int, num_frames: int,
                on_step) -> np.ndarray:
        gen, dev = self.generator, self.device
        ids = torch.tensor([[TOKEN_ID[resolved[k]] for k in ("colour", "shape", "direction")]], device=dev)
        h = gen.condition(ids, None, z.to(dev))
        # One frame sits at the clip's midpoint: that is where a thumbnail would look.
        times = torch.linspace(0.0, 1.0, num_frames, device=dev) if num_frames > 1 else torch.full((1,), 0.5, device=dev)
        cxs, cys, radii = (a[0].tolist() for a in gen.trajectory(h, times[None]))
        obj, bg = gen.colours(h)
        gamma, beta = gen.shape_film_params(h)
        obj, bg, gamma, beta = obj[0], bg[0], gamma[0], beta[0]

        short = min(width, height)
        xs = (torch.arange(width, device=dev, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
        ys = (torch.arange(height, device=dev, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
        background = _to_uint8(bg).expand(height, width, 3).contiguous()
        out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        for k in range(num_frames):
            cx, cy, radius = cxs[k], cys[k], radii[k]
            frame = background.clone()
            # Only the sprite window's pixels can differ from the background; evaluate the field
            # there alone, which keeps a 512x512 frame as cheap as the object is small.
            cols = _span((cx + 1) * width / 2, gen.window * radius * short / 2, width)
            rows = _span((cy + 1) * height / 2, gen.window * radius * short / 2, height)
            if cols and rows:
                gy, gx = torch.meshgrid(ys[rows[0]:rows[1]], xs[cols[0]:cols[1]], indexing="ij")
                u, v = object_coordinates(gx, gy, cx, cy, radius, width, height)
                dist = gen.distance(u.reshape(-1), v.reshape(-1), gamma, beta)
                pixel = 2.0 / short / radius
                alpha = gen.coverage(dist, u.reshape(-1), v.reshape(-1), torch.tensor(pixel, device=dev))
                patch = alpha[:, None] * obj + (1 - alpha[:, None]) * bg
                frame[rows[0]:rows[1], cols[0]:cols[1]] = _to_uint8(patch).reshape(gy.shape[0], gy.shape[1], 3)
            out[k] = frame.cpu().numpy()
            _step(on_step, k + 1, num_frames)
        return out

    def _recolour(self, input_video, colour: str, width: int, height: int, num_frames: int, on_step) -> np.ndarray:
        video = np.asarray(input_video)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (3, 4) or video.shape[0] == 0:
            raise ValueError(f"input_video must be uint8 [T,H,W,3], got {video.dtype} {video.shape}")
        video = video[..., :3]
        dev = self.device
        # Same uniform sampling over the clip as the worker's decoder, so a clip already at the
        # requested frame count passes through frame for frame.
        index = np.linspace(0, video.shape[0] - 1, num_frames).round().astype(int)
        sample = torch.from_numpy(np.ascontiguousarray(video[index[:: max(1, num_frames // 16)]])).to(dev)
        background = background_estimate(sample.permute(0, 3, 1, 2).float() / 255)
        ids = torch.tensor([[TOKEN_ID[colour]]], device=dev)
        target = self.recolour.colour(ids, None)
        out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        for k, source in enumerate(index):
            frame = torch.from_numpy(np.ascontiguousarray(video[source])).to(dev).permute(2, 0, 1)[None].float() / 255
            if frame.shape[-2:] != (height, width):
                frame = F.interpolate(frame, size=(height, width), mode="bilinear", align_corners=False,
                                      antialias=True).clamp(0, 1)
            alpha = self.recolour.alpha(frame, background[None])
            result = RecolourNet.composite(frame, alpha, target)
            out[k] = _to_uint8(result[0].permute(1, 2, 0)).cpu().numpy()
            _step(on_step, k + 1, num_frames)
        return out


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _span(centre_px: float, half_px: float, size: int) -> tuple[int, int] | None:
    """Pixel index range whose centres may fall within half_px of centre_px (one spare each side)."""
    start = max(0, math.floor(centre_px - half_px - 0.5) - 1)
    stop = min(size, math.ceil(centre_px + half_px - 0.5) + 2)
    return (start, stop) if start < stop else None


def _step(on_step, done: int, total: int) -> None:
    if on_step is None:
        return
    answer = on_step(done, total)
    # None means the callback has no opinion (it forgot to return): carry on.
    if answer is not None and not answer:
        raise GenerationCancelled(f"cancelled after step {done} of {total}")
