"""The two networks of the demo model.

ShapesGenerator is a conditional neural field for video: a bag of word embeddings plus the
seed's latent go through an MLP to a scene code; small heads turn that code into the object's
trajectory over normalised time, its colour and the background colour, and a coordinate MLP
(Fourier features) turns it into a signed-distance field of the object's shape in the object's
own frame. Rendering a pixel is: map it into object coordinates (a spatial transformer), read
the learned distance there, turn distance into coverage for the pixel's footprint, composite.
Because every piece is a function of continuous coordinates, any width, height and frame count
renders natively, and anti-aliasing follows the output resolution.

RecolourNet is the modify-video network: a small fully convolutional matting net that finds
the moving object in each input frame (soft alpha, robust to codec blur and chroma bleed), and
a colour head on the prompt's word embeddings that says what to paint it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ShapesGenerator(nn.Module):
    def __init__(self, vocab_size: int, *, text_dim: int = 32, latent_dim: int = 4, hidden: int = 128,
                 shape_hidden: int = 64, n_freq: int = 5, window: float = 1.5, init_radius: float = 0.2):
        super().__init__()
        self.latent_dim = latent_dim
        self.n_freq = n_freq
        self.window = window
        self.init_log_radius = math.log(init_radius)
        self.text = nn.EmbeddingBag(vocab_size, text_dim, mode="sum")
        self.cond = nn.Sequential(_mlp([text_dim + latent_dim, hidden, hidden]), nn.SiLU())
        # Time enters through a few smooth features; the head still has to learn what each
        # direction word does to the path.
        self.motion = _mlp([hidden + 3, 64, 64, 3])
        self.appearance = nn.Linear(hidden, 6)
        self.shape_film = nn.Linear(hidden, 2 * shape_hidden)
        self.shape_in = nn.Linear(2 + 4 * n_freq, shape_hidden)
        # ReLU here, not SiLU: this MLP runs once per pixel, ReLU is ~3x cheaper on CPU, and a
        # piecewise-linear field suits a distance function anyway.
        self.shape_body = nn.Sequential(
            nn.ReLU(), nn.Linear(shape_hidden, shape_hidden), nn.ReLU(),
            nn.Linear(shape_hidden, shape_hidden), nn.ReLU(), nn.Linear(shape_hidden, 1),
        )

    def condition(self, token_ids: torch.Tensor, offsets: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        return self.cond(torch.cat([self.text(token_ids, offsets), z], dim=-1))

    def trajectory(self, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B,H], t [B,K] in [0,1] -> centre x, y (frame units, -1..1) and radius (short-side units)."""
        feats = torch.stack([t, torch.sin(math.pi * t), torch.cos(math.pi * t)], dim=-1)
        out = self.motion(torch.cat([h[:, None, :].expand(-1, t.shape[1], -1), feats], dim=-1))
        radius = torch.exp(out[..., 2].clamp(-4.0, 2.0) + self.init_log_radius)
        return out[..., 0], out[..., 1], radius

    def colours(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.sigmoid(self.appearance(h))
        return out[:, :3], out[:, 3:]

    def shape_film_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma, beta = self.shape_film(h).chunk(2, dim=-1)
        return gamma, beta

    def distance(self, u: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Learned signed distance (object-radius units) at object coordinates u, v [..., N].

        gamma/beta [..., C] broadcast over N: one scene code modulates many points.
        """
        p = torch.stack([u, v], dim=-1)
        freqs = (2.0 ** torch.arange(self.n_freq, device=u.device, dtype=u.dtype)) * (math.pi / 2)
        angles = (p[..., None] * freqs).flatten(-2)
        feats = torch.cat([p, torch.sin(angles), torch.cos(angles)], dim=-1)
        x = self.shape_in(feats) * (1 + gamma[..., None, :]) + beta[..., None, :]
        return self.shape_body(x)[..., 0]

    def coverage(self, dist: torch.Tensor, u: torch.Tensor, v: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """Distance -> how much of a pixel the object covers; `pixel` is the pixel size in the
        same units. Outside the sprite window the object is absent by construction, so the field
        never has to be right (and can't leave ghosts) far from the object."""
        inside = ((u.abs() <= self.window) & (v.abs() <= self.window)).to(dist.dtype)
        return torch.sigmoid(-4.0 * dist / pixel) * inside


class RecolourNet(nn.Module):
    def __init__(self, vocab_size: int, *, channels: int = 16, text_dim: int = 16):
        super().__init__()
        # Input: the frame and its difference from the clip's background estimate, so the
        # matte depends on "how far from the background" rather than on absolute colours.
        # Replicate padding: zero padding makes the frame border look like a dark-to-bright
        # edge, and the matte would paint the corners.
        self.matte = nn.Sequential(
            nn.Conv2d(6, channels, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
            nn.Conv2d(channels, 1, 1),
        )
        self.text = nn.EmbeddingBag(vocab_size, text_dim, mode="sum")
        self.colour_head = _mlp([text_dim, 32, 3])

    def alpha(self, frames: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """frames [N,3,H,W] in 0..1, background [N,3] -> alpha [N,1,H,W]."""
        x = torch.cat([frames, frames - background[:, :, None, None]], dim=1)
        return torch.sigmoid(self.matte(x))

    def colour(self, token_ids: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        return torch.sigmoid(self.colour_head(self.text(token_ids, offsets)))

    @staticmethod
    def composite(frames: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        return alpha * colour[:, :, None, None] + (1 - alpha) * frames


def background_estimate(frames: torch.Tensor) -> torch.Tensor:
    """Per-channel median of a subsample of [T,3,H,W] frames -> [3]: the object is small, so
    the median pixel is background, whatever its colour."""
    t_step = max(1, frames.shape[0] // 16)
    sample = frames[::t_step, :, ::2, ::2]
    return sample.permute(1, 0, 2, 3).reshape(3, -1).median(dim=1).values


def object_coordinates(xs: torch.Tensor, ys: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                       radius: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame coordinates (-1..1 across each side) -> object coordinates (radius 1, isotropic).

    Positions are fractions of each side so motion spans the frame whatever its aspect; sizes
    are fractions of the short side so a circle stays round in a wide frame.
    """
    short = min(width, height)
    u = (xs - cx) * (width / short) / radius
    v = (ys - cy) * (height / short) / radius
    return u, v
