"""A video DiT of production shape, as a dreamq model bundle (bench/gpu_busy.py pushes it).

Patchified 3-D latent, `layers` blocks of self-attention + MLP with timestep modulation, `steps`
Euler steps of a rectified flow, then an 8x convolutional decoder (three conv + pixel-shuffle
stages) to RGB frames. Weights are random (`random_weights`): what the bench measures is the
worker's loop around the model, not pictures. bf16 on CUDA, float32 elsewhere: the dtype is the
checkpoint's. Needs torch, numpy and safetensors only.

weights/config.json: {"net": {dim, layers, heads, patch, latent_ch, decoder_ch}, "steps": N}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class GenerationCancelled(Exception):
    """on_step asked to stop; raised at a step boundary."""


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.mod = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.mod(c).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + g1 * self.proj(a)
        h = self.norm2(x) * (1 + s2) + b2
        return x + g2 * self.mlp(h)


class VideoDiT(nn.Module):
    def __init__(self, *, dim=1152, layers=16, heads=16, patch=2, latent_ch=16, decoder_ch=128):
        super().__init__()
        self.patch = patch
        self.latent_ch = latent_ch
        self.embed = nn.Linear(latent_ch * patch * patch, dim)
        self.time = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text = nn.Linear(512, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.out = nn.Linear(dim, latent_ch * patch * patch)
        self.dec_in = nn.Conv2d(latent_ch, decoder_ch, 3, padding=1)
        self.dec_up = nn.ModuleList(nn.Conv2d(decoder_ch, decoder_ch * 4, 3, padding=1) for _ in range(3))
        self.dec_out = nn.Conv2d(decoder_ch, 3, 3, padding=1)

    @staticmethod
    def _timestep(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
        args = t[:, None].float() * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def denoise(self, z: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = z.shape
        p = self.patch
        tokens = (
            z.reshape(b, c, f, h // p, p, w // p, p)
            .permute(0, 2, 3, 5, 1, 4, 6)
            .reshape(b, f * (h // p) * (w // p), c * p * p)
        )
        x = self.embed(tokens)
        cond = self.time(self._timestep(t).to(x.dtype)) + self.text(text)
        for block in self.blocks:
            x = block(x, cond)
        return self.out(x).reshape(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        z = F.interpolate(z.float(), size=(num_frames, z.shape[-2], z.shape[-1]), mode="trilinear").to(z.dtype)
        frames = z[0].transpose(0, 1)  # [F, C, H, W]
        x = F.silu(self.dec_in(frames))
        for up in self.dec_up:
            x = F.silu(F.pixel_shuffle(up(x), 2))
        rgb = torch.tanh(self.dec_out(x))
        return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # [F, H, W, 3]


def random_weights(net_config: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the default initialisation, halved (keeps the untrained activations finite)."""
    torch.manual_seed(seed)
    net = VideoDiT(**net_config)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return {k: v.to(dtype).contiguous() for k, v in net.state_dict().items()}


class VideoDiTModel:
    def __init__(self, net: VideoDiT, device: torch.device, steps: int):
        self.net, self.device, self.steps = net, device, steps
        self.dtype = next(net.parameters()).dtype

    @classmethod
    def load(cls, bundle_dir: Path, device, load_weights=None) -> "VideoDiTModel":
        bundle_dir, device = Path(bundle_dir), torch.device(device)
        config = json.loads((bundle_dir / "weights" / "config.json").read_text())
        path = bundle_dir / "weights" / "dit.safetensors"
        if load_weights is not None:  # the worker's staged loader (workers/loading.py)
            tensors = load_weights(path, device)
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(path), device=str(device))
        with torch.device("meta"):
            net = VideoDiT(**config["net"])
        net.load_state_dict(tensors, assign=True)
        net.eval().requires_grad_(False)
        return cls(net, device, int(config["steps"]))

    def generate(
        self,
        prompt: str,
        *,
        width: int,
        height: int,
        num_frames: int,
        seed: int,
        input_video: "np.ndarray | None" = None,
        on_step: "Callable[[int, int], bool] | None" = None,
    ) -> np.ndarray:
        """uint8 [num_frames, height, width, 3]; on_step(done, total) after each denoising step,
        a falsy answer other than None cancels."""
        if input_video is not None:
            raise ValueError("this model does text_to_video only")
        g = torch.Generator(device="cpu").manual_seed(int(seed) % (1 << 63))
        latent_frames = (num_frames - 1) // 4 + 1
        z = torch.randn(1, self.net.latent_ch, latent_frames, height // 8, width // 8, generator=g)
        z = z.to(self.device, self.dtype)
        text = torch.randn(1, 512, generator=g).to(self.device, self.dtype)
        with torch.inference_mode():
            for i in range(self.steps):
                t = torch.full((1,), 1000.0 * (1 - i / self.steps), device=self.device)
                z = z - self.net.denoise(z, t, text) / self.steps  # an Euler step of a rectified flow
                if on_step is not None:
                    answer = on_step(i + 1, self.steps)
                    if answer is not None and not answer:
                        raise GenerationCancelled(f"cancelled after step {i + 1} of {self.steps}")
            return self.net.decode(z, num_frames).cpu().numpy()
