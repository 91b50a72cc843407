"""Train the demo "shapes" video model and write its weights into this bundle.

    .venv/bin/python workers/demo_models/shapes/train.py            # writes weights/ here
    .venv/bin/python workers/demo_models/shapes/train.py --quick    # smoke run, into a temp dir

No dataset to download: training clips are synthesised on the fly from an analytic scene
description (a shape's signed distance, a palette colour, a straight path). The scene's
start/size/speed come from a 4-d standard-normal latent, and the generator is given that same
latent as its input, so it learns the whole map (words, noise) -> clip and at inference the
seed's normal draw plays the part of that noise: a one-step conditional generator.

Deterministic: fixed seeds, CPU, one process; the same machine and thread count give
byte-identical weights. About 2.5 minutes on 2 idle CPU cores.
Writes weights/model.safetensors and weights/config.json (architecture + training record).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

BUNDLE = Path(__file__).resolve().parent
sys.path.insert(0, str(BUNDLE / "code"))

from shapes_model.nets import RecolourNet, ShapesGenerator, background_estimate  # noqa: E402
from shapes_model.vocab import COLOUR_IDS, COLOURS, DIRECTION_IDS, SHAPE_IDS, TOKENS  # noqa: E402

# The colours each word is taught to mean. Saturated but not clipped, so H.264's limited-range
# YUV round trip doesn't push them into one another.
PALETTE = {
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
BACKGROUND = (12, 14, 28)
GENERATOR_CONFIG = {
    "text_dim": 32,
    "latent_dim": 4,
    "hidden": 128,
    "shape_hidden": 64,
    "n_freq": 5,
    "window": 1.5,
    "init_radius": 0.2,
}
RECOLOUR_CONFIG = {"channels": 16, "text_dim": 16}

PALETTE_T = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255
BACKGROUND_T = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
# left, right, up, down in image coordinates (y grows downwards).
DIRECTION_VECTORS = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
SQUARE_HALF = 0.85
TRIANGLE_CIRCUMRADIUS = 1.25  # triangle, square and circle then have similar visual weight


# -- the synthetic world ----------------------------------------------------------------------


def scene_from_latent(z: torch.Tensor):
    """z [B,4] ~ N(0,1) -> start offset, travel, cross-axis offset, radius. Ranges keep the
    whole object inside the frame for the whole clip."""
    q = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    travel = 1.0 + 0.2 * (q[:, 3] - 0.5)
    start = -travel / 2 + 0.16 * (q[:, 0] - 0.5)
    cross = 0.8 * (q[:, 1] - 0.5)
    radius = 0.15 + 0.11 * q[:, 2]
    return start, travel, cross, radius


def true_trajectory(direction: torch.Tensor, z: torch.Tensor, t: torch.Tensor):
    """-> centre x, y (-1..1 frame units) and radius (short-side units), each [B,K]."""
    start, travel, cross, radius = scene_from_latent(z)
    along = start[:, None] + travel[:, None] * t
    vec = DIRECTION_VECTORS[direction]
    horizontal = (vec[:, 0] != 0)[:, None]
    sign = vec.sum(dim=1)[:, None]
    cross = cross[:, None].expand_as(along)
    cx = torch.where(horizontal, sign * along, cross)
    cy = torch.where(horizontal, cross, sign * along)
    return cx, cy, radius[:, None].expand_as(along)


def _triangle_sdf(x: torch.Tensor, y: torch.Tensor, circumradius: float) -> torch.Tensor:
    # Equilateral triangle, apex towards +y, centroid at the origin (Quilez's formula).
    k = math.sqrt(3.0)
    r = circumradius * k / 2
    x = x.abs() - r
    y = y + r / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - x.clamp(-2 * r, 0.0)
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def shape_sdf(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact signed distance in object units (radius 1); shape broadcasts against u, v."""
    circle = torch.sqrt(u * u + v * v) - 1
    dx, dy = u.abs() - SQUARE_HALF, v.abs() - SQUARE_HALF
    square = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2) + torch.maximum(dx, dy).clamp(max=0)
    triangle = _triangle_sdf(u, -v, TRIANGLE_CIRCUMRADIUS)  # -v: apex points up on screen
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def render_clip(
    colour: int, shape: int, direction: int, z: torch.Tensor, width: int, height: int, num_frames: int
) -> torch.Tensor:
    """Ground-truth clip [T,H,W,3] in 0..1, for evaluating the trained generator."""
    t = torch.linspace(0, 1, num_frames)[None] if num_frames > 1 else torch.full((1, 1), 0.5)
    cx, cy, r = (a[0] for a in true_trajectory(torch.tensor([direction]), z[None], t))
    short = min(width, height)
    xs = (torch.arange(width) + 0.5) * 2 / width - 1
    ys = (torch.arange(height) + 0.5) * 2 / height - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    u = (gx[None] - cx[:, None, None]) * (width / short) / r[:, None, None]
    v = (gy[None] - cy[:, None, None]) * (height / short) / r[:, None, None]
    dist = shape_sdf(torch.tensor(shape), u, v) * r[:, None, None]
    alpha = torch.sigmoid(-4 * dist / (2 / short))[..., None]
    return alpha * PALETTE_T[colour] + (1 - alpha) * BACKGROUND_T


# -- generator training -------------------------------------------------------------------------


def _warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # Short warm-up (Adam's early steps on a fresh net are large), then cosine down to 3% so the
    # last few hundred steps polish edges instead of jittering around them.
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_generator(gen: ShapesGenerator, steps: int, rng: torch.Generator, log_every: int) -> dict:
    batch, times, points = 48, 4, 48
    ids_colour, ids_shape, ids_dir = (torch.tensor(x) for x in (COLOUR_IDS, SHAPE_IDS, DIRECTION_IDS))
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    sched = _warmup_cosine(opt, steps)
    window = gen.window
    running: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        colour = torch.randint(len(COLOURS), (batch,), generator=rng)
        shape = torch.randint(3, (batch,), generator=rng)
        direction = torch.randint(4, (batch,), generator=rng)
        z = torch.randn(batch, gen.latent_dim, generator=rng)
        ids = torch.stack([ids_colour[colour], ids_shape[shape], ids_dir[direction]], dim=1)
        h = gen.condition(ids, None, z)

        t = torch.rand(batch, times, generator=rng)
        true_cx, true_cy, true_r = true_trajectory(direction, z, t)
        cx, cy, r = gen.trajectory(h, t)
        loss_traj = F.mse_loss(cx, true_cx) + F.mse_loss(cy, true_cy) + F.mse_loss(r.log(), true_r.log())

        # Half the points uniform over the sprite window (plus a margin), half picked near the
        # true outline, where all the detail is.
        cand = (torch.rand(batch, times, 4 * points, 2, generator=rng) * 2 - 1) * (window + 0.2)
        cand_sdf = shape_sdf(shape[:, None, None], cand[..., 0], cand[..., 1])
        near = (-cand_sdf.abs()).topk(points // 2, dim=-1).indices
        pts = torch.cat([cand[:, :, : points // 2], cand.gather(2, near[..., None].expand(-1, -1, -1, 2))], dim=2)
        tu, tv = pts[..., 0], pts[..., 1]
        sdf = shape_sdf(shape[:, None, None], tu, tv)
        gamma, beta = gen.shape_film_params(h)
        gamma, beta = gamma[:, None], beta[:, None]

        # Teacher-forced: the field at the true object coordinates learns the (truncated) SDF.
        in_window = ((tu.abs() <= window) & (tv.abs() <= window)).float()
        learned = gen.distance(tu, tv, gamma, beta)
        loss_sdf = ((learned - sdf.clamp(-0.6, 0.6)).abs() * in_window).sum() / in_window.sum()

        # End to end: render the same frame points through the predicted path and compare pixels,
        # at a random output resolution so anti-aliasing is learned for every size.
        res = torch.exp(torch.empty(batch, 1, 1).uniform_(math.log(48), math.log(512), generator=rng))
        pixel = 2.0 / res
        fx = true_cx[..., None] + tu * true_r[..., None]
        fy = true_cy[..., None] + tv * true_r[..., None]
        u = (fx - cx[..., None]) / r[..., None]
        v = (fy - cy[..., None]) / r[..., None]
        alpha = gen.coverage(gen.distance(u, v, gamma, beta), u, v, pixel / r[..., None])
        true_alpha = torch.sigmoid(-4 * sdf * true_r[..., None] / pixel)
        obj, bg = gen.colours(h)
        target = true_alpha[..., None] * PALETTE_T[colour][:, None, None] + (1 - true_alpha[..., None]) * BACKGROUND_T
        pred = alpha[..., None] * obj[:, None, None] + (1 - alpha[..., None]) * bg[:, None, None]
        loss_pix = F.mse_loss(pred, target)
        loss_col = F.mse_loss(obj, PALETTE_T[colour]) + F.mse_loss(bg, BACKGROUND_T.expand_as(bg))

        loss = 4 * loss_pix + loss_sdf + 10 * loss_traj + loss_col
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for name, value in (
            ("loss", loss),
            ("pix", loss_pix),
            ("sdf", loss_sdf),
            ("traj", loss_traj),
            ("col", loss_col),
        ):
            running[name] = running.get(name, 0.0) + value.detach().item()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            means = {k: v / n for k, v in running.items()}
            print(
                f"[generator {step:5d}/{steps}] "
                + " ".join(f"{k}={v:.5f}" for k, v in means.items())
                + f"  ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
            last, running = means, {}
    # No wall times in the record: config.json ships in the bundle, and a retrain that yields
    # the same weights should yield the same bundle (same fingerprint, no spurious version).
    return {"steps": steps, "final": {k: round(v, 6) for k, v in last.items()}}


# -- recolour training --------------------------------------------------------------------------


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable blur; sigma [N] in pixels (0 = untouched)."""
    n, c, h, w = x.shape
    radius = 3
    offs = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offs[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # [n*c, k]
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def _chroma_subsample(x: torch.Tensor) -> torch.Tensor:
    """What yuv420p does to colour: chroma at half resolution, luma untouched (BT.601)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = (b - y) * 0.564
    cr = (r - y) * 0.713
    chroma = torch.stack([cb, cr], dim=1)
    chroma = F.interpolate(F.avg_pool2d(chroma, 2), scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0], chroma[:, 1]
    r = y + 1.403 * cr
    b = y + 1.773 * cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.stack([r, g, b], dim=1).clamp(0, 1)


def recolour_batch(batch: int, size: int, rng: torch.Generator):
    """Frames of one random shape on a random dark background, degraded like a decoded upload,
    with the object's visible coverage and a target palette colour."""
    shape = torch.randint(3, (batch,), generator=rng)
    centre = (torch.rand(batch, 2, generator=rng) * 2 - 1) * 0.7
    radius = 0.12 + 0.22 * torch.rand(batch, generator=rng)
    angle = torch.where(
        torch.rand(batch, generator=rng) < 0.5, torch.zeros(batch), torch.rand(batch, generator=rng) * 2 * math.pi
    )
    palette_pick = PALETTE_T[torch.randint(len(COLOURS), (batch,), generator=rng)]
    random_colour = torch.rand(batch, 3, generator=rng)
    random_colour = (
        random_colour
        / random_colour.amax(dim=1, keepdim=True).clamp(min=1e-3)
        * (0.1 + 0.9 * torch.rand(batch, 1, generator=rng))
    )
    source = torch.where(torch.rand(batch, 1, generator=rng) < 0.5, palette_pick, random_colour)
    # Mostly the demo's own dark backgrounds, sometimes any flat colour: the matte should key on
    # "differs from the background", not on "is bright".
    background = torch.where(
        torch.rand(batch, 1, generator=rng) < 0.7,
        torch.rand(batch, 3, generator=rng) * 0.15,
        torch.rand(batch, 3, generator=rng),
    )
    too_close = (source - background).norm(dim=1, keepdim=True) < 0.35
    source = torch.where(too_close, (background + 0.5) % 1.0, source)  # 0.5 away in every channel
    present = (torch.rand(batch, generator=rng) > 0.1).float()

    xs = (torch.arange(size) + 0.5) * 2 / size - 1
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    dx = gx[None] - centre[:, 0, None, None]
    dy = gy[None] - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / radius[:, None, None]
    v = (-sin * dx + cos * dy) / radius[:, None, None]
    dist = shape_sdf(shape[:, None, None], u, v) * radius[:, None, None]
    cover = ((0.5 - dist / (2 / size)).clamp(0, 1) * present[:, None, None])[:, None]

    frames = cover * source[:, :, None, None] + (1 - cover) * background[:, :, None, None]
    sigma = torch.rand(batch, generator=rng) * 1.2
    frames = _gaussian_blur(frames, sigma)
    cover = _gaussian_blur(cover, sigma)
    chroma = torch.rand(batch, generator=rng) < 0.6
    frames = torch.where(chroma[:, None, None, None], _chroma_subsample(frames), frames)
    noise = torch.randn(frames.shape, generator=rng) * (torch.rand(batch, 1, 1, 1, generator=rng) * 0.015)
    frames = ((frames + noise).clamp(0, 1) * 255).round() / 255
    target_colour = torch.randint(len(COLOURS), (batch,), generator=rng)
    return frames, cover, background, target_colour


def train_recolour(net: RecolourNet, steps: int, rng: torch.Generator, log_every: int) -> dict:
    batch, size = 16, 48
    ids_colour = torch.tensor(COLOUR_IDS)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = _warmup_cosine(opt, steps)
    running: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        frames, cover, background, target = recolour_batch(batch, size, rng)
        estimate = torch.stack([background_estimate(f[None]) for f in frames])
        alpha = net.alpha(frames, estimate)
        colour = net.colour(ids_colour[target][:, None], None)
        out = RecolourNet.composite(frames, alpha, colour)
        want = RecolourNet.composite(background[:, :, None, None].expand_as(frames), cover, PALETTE_T[target])
        loss_img = F.mse_loss(out, want)
        loss_alpha = F.mse_loss(alpha, cover)
        loss_col = F.mse_loss(colour, PALETTE_T[target])
        loss = loss_img + loss_alpha + loss_col
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for name, value in (("loss", loss), ("img", loss_img), ("alpha", loss_alpha), ("col", loss_col)):
            running[name] = running.get(name, 0.0) + value.detach().item()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            means = {k: v / n for k, v in running.items()}
            print(
                f"[recolour  {step:5d}/{steps}] "
                + " ".join(f"{k}={v:.5f}" for k, v in means.items())
                + f"  ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
            last, running = means, {}
    # No wall times in the record: config.json ships in the bundle, and a retrain that yields
    # the same weights should yield the same bundle (same fingerprint, no spurious version).
    return {"steps": steps, "final": {k: round(v, 6) for k, v in last.items()}}


# -- evaluation ---------------------------------------------------------------------------------


def evaluate(bundle: Path, rng: torch.Generator) -> dict:
    """Load the written bundle through the worker-facing class and compare its clips with the
    analytic ground truth for the same (words, latent)."""
    import shapes_model

    model = shapes_model.ShapesVideoModel.load(bundle, torch.device("cpu"))
    errors, ious = [], []
    for colour in range(len(COLOURS)):
        for shape in range(3):
            direction = (colour + shape) % 4
            seed = int(torch.randint(1 << 30, (1,), generator=rng))
            prompt = f"{COLOURS[colour]} {('circle', 'square', 'triangle')[shape]} moving {('left', 'right', 'up', 'down')[direction]}"
            _, z = model._resolve(prompt, seed)
            got = (
                torch.from_numpy(model.generate(prompt, width=128, height=128, num_frames=24, seed=seed)).float() / 255
            )
            want = render_clip(colour, shape, direction, z[0], 128, 128, 24)
            errors.append(float((got - want).abs().mean()))
            got_mask = (got - BACKGROUND_T).abs().amax(-1) > 0.25
            want_mask = (want - BACKGROUND_T).abs().amax(-1) > 0.25
            ious.append(float((got_mask & want_mask).sum() / (got_mask | want_mask).sum()))
    result = {
        "mean_abs_error_u8": round(255 * sum(errors) / len(errors), 3),
        "mask_iou_mean": round(sum(ious) / len(ious), 4),
        "mask_iou_min": round(min(ious), 4),
    }
    print(f"[eval] vs ground truth at 128x128x24 over {len(errors)} clips: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator-steps", type=int, default=2500)
    parser.add_argument("--recolour-steps", type=int, default=800)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few hundred steps into a temporary bundle: checks the script, not the model",
    )
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args()
    if args.quick:
        args.generator_steps, args.recolour_steps = 300, 100

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    gen = ShapesGenerator(len(TOKENS), **GENERATOR_CONFIG)
    rec = RecolourNet(len(TOKENS), **RECOLOUR_CONFIG)
    n_gen = sum(p.numel() for p in gen.parameters())
    n_rec = sum(p.numel() for p in rec.parameters())
    print(
        f"generator: {n_gen} parameters, recolour: {n_rec} parameters, threads: {torch.get_num_threads()}", flush=True
    )

    gen_record = train_generator(gen, args.generator_steps, rng, log_every=max(1, args.generator_steps // 20))
    rec_record = train_recolour(rec, args.recolour_steps, rng, log_every=max(1, args.recolour_steps // 15))

    tensors = {f"generator.{k}": v.detach().contiguous() for k, v in gen.state_dict().items()}
    tensors.update({f"recolour.{k}": v.detach().contiguous() for k, v in rec.state_dict().items()})
    # A quick run never overwrites the real weights.
    bundle = Path(tempfile.mkdtemp(prefix="shapes-quick-")) if args.quick else BUNDLE
    if args.quick:
        shutil.copy(BUNDLE / "model.json", bundle / "model.json")
    weights = bundle / "weights"
    weights.mkdir(exist_ok=True)
    save_file(tensors, str(weights / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes 0600; the bundle is read by workers running as other users.
    (weights / "model.safetensors").chmod(0o644)
    config = {
        "vocab": list(TOKENS),
        "generator": GENERATOR_CONFIG,
        "recolour": RECOLOUR_CONFIG,
        "palette": PALETTE,
        "background": BACKGROUND,
        "parameters": {"generator": n_gen, "recolour": n_rec, "total": n_gen + n_rec},
        "training": {"seed": args.seed, "torch": torch.__version__, "generator": gen_record, "recolour": rec_record},
    }
    (weights / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    config["training"]["eval"] = evaluate(bundle, torch.Generator().manual_seed(args.seed + 1))
    (weights / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    size = (weights / "model.safetensors").stat().st_size
    print(
        f"wrote {weights / 'model.safetensors'} ({size} bytes) in {time.perf_counter() - started:.0f}s total",
        flush=True,
    )


if __name__ == "__main__":
    main()
