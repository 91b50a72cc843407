"""GPU busy fraction of a worker's job loop under a steady backlog.

    python bench/gpu_busy.py [--device cuda] [--models dit,demo] [--jobs 8] [--rounds 2] [--quick] [--json]
                             [--claim-ms 3] [--record-ms 4] [--progress-ms 2]
                             [--upload-mbps 400] [--upload-ms 5]

Standalone on purpose (torch, numpy, safetensors and the standard library only), so it runs on a
bare GPU box where Postgres, Redis and SeaweedFS are not: it loads workers/loading.py and the
demo model bundle by file path and replays, job after job with a backlog that never empties,
what `tasks.generate.generate` does on a GPU worker:

  claim        the claim transaction (queued/dispatched -> running)           sleep --claim-ms
  generate     the model's own generate(), on_step after every step; every
               0.25 s a progress write (app.jobs.execution.PROGRESS_INTERVAL_S)    real; writes sleep --progress-ms
  frames       uint8 frames to host memory, np.save into a buffer           real
  upload       put the staged frames into object storage                    sleep size/--upload-mbps + --upload-ms
  record       the "generated" transaction and the finalize hand-off         sleep --record-ms

The sleeps stand for round trips to services this box does not have. Their defaults are
assumptions, of the order of local Postgres and SeaweedFS round trips, not measurements; they
are printed, and the time each step takes is reported separately, so a reader can redo the sum
for their own network.

GPU busy = the union of CUDA kernel intervals recorded by torch.profiler / wall time of the
loop (the first job, which compiles and warms the allocator, is not counted). The rest of the
wall time is attributed to the loop's steps by host timers.

Models:
  dit   a video diffusion transformer of production shape (patchified 3-D latent, --layers
        blocks of self-attention + MLP with timestep modulation, --steps denoising steps, then a
        convolutional decoder to 512x512 RGB frames), bf16, random weights saved as safetensors
        and loaded through workers/loading.py. It stands in for a real model's cost: what this
        bench measures is our loop around it, not picture quality.
  demo  the shipped demo model (workers/demo_models/shapes), at its largest clip (512x512, 120
        frames). It is tiny (68k parameters) and copies each frame to the host as it renders,
        so its fraction says how much of a small model's time is Python and launches.

Each model runs the loop as the worker did before the tail moved to its own thread (baseline)
and as it does now (ours), interleaved over --rounds; medians and the ratio are reported.
Output: a table; --json prints one line {"gpu_busy_<model>": {"baseline": .., "ours": .., ...}}.
On a machine without CUDA it runs (for testing the harness) and reports the fraction of wall
time spent inside generate() instead, marked as such.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PROGRESS_INTERVAL_S = 0.25  # app.jobs.execution.PROGRESS_INTERVAL_S (not imported: standalone)


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


loading = _load_module("dreamq_loading", ROOT / "workers" / "loading.py")
staging = _load_module("dreamq_staging", ROOT / "workers" / "staging.py")


# -- a video DiT of production shape -----------------------------------------------------------------


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
    def __init__(self, *, latent_ch=16, dim=1152, layers=16, heads=16, patch=2, decoder_ch=128):
        super().__init__()
        self.patch = patch
        self.latent_ch = latent_ch
        self.embed = nn.Linear(latent_ch * patch * patch, dim)
        self.time = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text = nn.Linear(512, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.out = nn.Linear(dim, latent_ch * patch * patch)
        # 8x spatial upsampling decoder (three conv + pixel-shuffle stages), frame by frame.
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
        out = self.out(x).reshape(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)
        return out

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        z = F.interpolate(z.float(), size=(num_frames, z.shape[-2], z.shape[-1]), mode="trilinear").to(z.dtype)
        frames = z[0].transpose(0, 1)  # [F, C, H, W]
        x = F.silu(self.dec_in(frames))
        for up in self.dec_up:
            x = F.silu(F.pixel_shuffle(up(x), 2))
        rgb = torch.tanh(self.dec_out(x))
        return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # [F, H, W, 3]


class DiTBundle:
    """The bundle interface our runtime calls: generate(prompt, width, height, num_frames, seed, on_step)."""

    def __init__(self, net: VideoDiT, device: torch.device, dtype: torch.dtype, steps: int):
        self.net, self.device, self.dtype, self.steps = net, device, dtype, steps

    def generate(self, prompt: str, *, width: int, height: int, num_frames: int, seed: int, on_step=None) -> np.ndarray:
        g = torch.Generator(device="cpu").manual_seed(seed)
        latent_frames = (num_frames - 1) // 4 + 1
        z = torch.randn(1, self.net.latent_ch, latent_frames, height // 8, width // 8, generator=g)
        z = z.to(self.device, self.dtype)
        text = torch.randn(1, 512, generator=g).to(self.device, self.dtype)
        with torch.inference_mode():
            for i in range(self.steps):
                t = torch.full((1,), 1000.0 * (1 - i / self.steps), device=self.device)
                v = self.net.denoise(z, t, text)
                z = z - v / self.steps  # an Euler step of a rectified flow
                if on_step is not None:
                    on_step(i + 1, self.steps)
            frames = self.net.decode(z, num_frames)
            return frames.cpu().numpy()


def build_dit(device: torch.device, args, workdir: Path) -> DiTBundle:
    """Random weights, saved as safetensors and loaded the way a worker loads a checkpoint."""
    torch.manual_seed(0)
    cfg = dict(dim=args.dim, layers=args.layers, heads=args.heads)
    net = VideoDiT(**cfg)
    for p in net.parameters():
        with torch.no_grad():
            p.mul_(0.5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = workdir / "dit.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in net.state_dict().items()}, str(path))
    started = time.perf_counter()
    tensors = loading.load_safetensors(path, device)
    load_s = time.perf_counter() - started
    with torch.device("meta"):
        net = VideoDiT(**cfg)
    net.load_state_dict(tensors, assign=True)
    net.eval().requires_grad_(False)
    params = sum(p.numel() for p in net.parameters())
    print(
        f"dit: {params / 1e6:.0f}M parameters, {path.stat().st_size / 1e9:.2f} GB, loaded in {load_s:.2f} s",
        file=sys.stderr,
    )
    return DiTBundle(net, device, dtype, args.steps)


def build_demo(device: torch.device):
    bundle = ROOT / "workers" / "demo_models" / "shapes"
    sys.path.insert(0, str(bundle / "code"))
    from shapes_model import ShapesVideoModel  # noqa: E402  (the bundle's own code)

    return ShapesVideoModel.load(bundle, device, load_weights=lambda path, dev: loading.load_safetensors(path, dev))


# -- the worker's job loop -------------------------------------------------------------------------


def run_loop(model, device: torch.device, jobs: int, size: dict, args, *, overlap: bool = False) -> dict:
    """jobs + 1 jobs back to back (the first is warm-up); host-timed steps of the counted ones.

    overlap=False is the worker before this change: the job's tail (serialise the frames with
    np.save into a BytesIO, upload, record) ran in line, the GPU idle meanwhile. overlap=True is
    workers/executor.py now: the tail (frames serialised in one copy) runs on the worker's tail
    thread while the next job is claimed and generated, at most one tail in flight; the steps
    then count only the time the loop itself waited for it.
    """
    steps = {
        "claim": 0.0,
        "generate": 0.0,
        "progress writes": 0.0,
        "frames (or waiting for the last tail)": 0.0,
        "upload": 0.0,
        "record": 0.0,
    }
    cuda = device.type == "cuda"
    tail_pool = ThreadPoolExecutor(max_workers=1) if overlap else None
    pending = [None]

    def one_job(seed: int, timed: bool) -> None:
        marks = {}
        t0 = time.perf_counter()
        time.sleep(args.claim_ms / 1000)
        t1 = time.perf_counter()
        last = [time.monotonic()]
        writes = [0.0]

        def on_step(done: int, total: int) -> bool:
            now = time.monotonic()
            if done < total and now - last[0] < PROGRESS_INTERVAL_S:
                return True
            last[0] = now
            w0 = time.perf_counter()
            time.sleep(args.progress_ms / 1000)
            writes[0] += time.perf_counter() - w0
            return True

        frames = model.generate("a red circle moving right", seed=seed, on_step=on_step, **size)
        t2 = time.perf_counter()

        def tail() -> tuple[float, float, float, int]:
            s0 = time.perf_counter()
            out = np.ascontiguousarray(frames, dtype=np.uint8)
            if overlap:  # the worker now: one copy (workers/staging.py)
                nbytes = len(staging.npy_bytes(out))
            else:  # the worker before: np.save into a BytesIO, then getvalue()
                buffer = io.BytesIO()
                np.save(buffer, out, allow_pickle=False)
                nbytes = len(buffer.getvalue())
            s1 = time.perf_counter()
            time.sleep(nbytes / (args.upload_mbps * 1e6) + args.upload_ms / 1000)
            s2 = time.perf_counter()
            time.sleep(args.record_ms / 1000)
            return s1 - s0, s2 - s1, time.perf_counter() - s2, nbytes

        if tail_pool is None:
            frames_s, upload_s, record_s, nbytes = tail()
        else:
            if pending[0] is not None:
                pending[0].result()
            pending[0] = tail_pool.submit(tail)
            frames_s, upload_s, record_s, nbytes = 0.0, 0.0, 0.0, 0
        waited = time.perf_counter() - t2 - frames_s - upload_s - record_s
        if timed:
            marks = {
                "claim": t1 - t0,
                "generate": t2 - t1 - writes[0],
                "progress writes": writes[0],
                "frames (or waiting for the last tail)": frames_s + waited,
                "upload": upload_s,
                "record": record_s,
            }
            for k, v in marks.items():
                steps[k] += v
            steps["_bytes"] = max(nbytes, steps.get("_bytes", 0))

    one_job(0, timed=False)  # compile kernels, warm the caching allocator and cuDNN autotune
    if cuda:
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for seed in range(1, jobs + 1):
            one_job(seed, timed=True)
        if pending[0] is not None:
            pending[0].result()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    nbytes = steps.pop("_bytes", 0)
    result = {
        "wall_s": wall,
        "jobs": jobs,
        "per_job_s": wall / jobs,
        "frame_bytes": nbytes,
        "steps_s": {k: v / jobs for k, v in steps.items()},
    }
    if cuda:
        busy = _kernel_union_s(prof)
        result["busy_fraction"] = busy / wall
        result["measure"] = "union of CUDA kernel intervals (torch.profiler) / wall"
    else:
        result["busy_fraction"] = steps["generate"] / wall
        result["measure"] = "no CUDA: time inside generate() / wall"
    return result


def _kernel_union_s(prof) -> float:
    intervals = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.time_range.elapsed_us() > 0:
            intervals.append((evt.time_range.start, evt.time_range.end))
    intervals.sort()
    total, cur_start, cur_end = 0.0, None, None
    for start, end in intervals:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="dit,demo")
    parser.add_argument("--jobs", type=int, default=8, help="jobs per loop run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved before/now runs per model")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CPU check of the harness")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--claim-ms", type=float, default=3.0)
    parser.add_argument("--progress-ms", type=float, default=2.0)
    parser.add_argument("--record-ms", type=float, default=4.0)
    parser.add_argument("--upload-mbps", type=float, default=400.0, help="object storage put rate, MB/s")
    parser.add_argument("--upload-ms", type=float, default=5.0, help="object storage put latency, ms")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.dim, args.layers, args.heads, args.steps, args.jobs, args.rounds = 128, 2, 4, 4, min(args.jobs, 3), 1
    dit_size = (
        {"width": 128, "height": 128, "num_frames": 9}
        if args.quick
        else {"width": 512, "height": 512, "num_frames": 49}
    )
    demo_size = (
        {"width": 128, "height": 128, "num_frames": 24}
        if args.quick
        else {"width": 512, "height": 512, "num_frames": 120}
    )

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "dit":
                model, size = build_dit(device, args, Path(tmp)), dit_size
            elif name == "demo":
                model, size = build_demo(device), demo_size
            else:
                raise SystemExit(f"unknown model {name!r} (dit, demo)")
            runs: dict[str, list[dict]] = {"before": [], "now": []}
            for _ in range(args.rounds):  # interleaved: before, now, before, now
                runs["before"].append(run_loop(model, device, args.jobs, size, args, overlap=False))
                runs["now"].append(run_loop(model, device, args.jobs, size, args, overlap=True))
            median = {k: statistics.median(r["busy_fraction"] for r in v) for k, v in runs.items()}
            results[name] = {
                "size": size,
                "baseline": median["before"],
                "ours": median["now"],
                "ratio": median["now"] / median["before"] if median["before"] else None,
                "before": runs["before"][-1],
                "now": runs["now"][-1],
            }
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sleeps = {
        "claim_ms": args.claim_ms,
        "progress_ms": args.progress_ms,
        "record_ms": args.record_ms,
        "upload_mbps": args.upload_mbps,
        "upload_ms": args.upload_ms,
    }
    if args.json:
        print(
            json.dumps(
                {
                    f"gpu_busy_{k}": {
                        "unit": "fraction of wall",
                        "goal": 0.95,
                        "device": device_name,
                        "baseline_name": "the same loop with the tail in line (the worker before)",
                        "sleeps": sleeps,
                        **v,
                    }
                    for k, v in results.items()
                }
            )
        )
        return
    print(
        f"device: {device_name}; sleeps: claim {args.claim_ms} ms, progress write {args.progress_ms} ms, "
        f"upload {args.upload_mbps} MB/s + {args.upload_ms} ms, record {args.record_ms} ms"
    )
    for name, res in results.items():
        print(
            f"\n{name} {res['size']}: busy {100 * res['baseline']:.1f}% before -> {100 * res['ours']:.1f}% now "
            f"(median of {args.rounds}; {res['now']['measure']})"
        )
        for label in ("before", "now"):
            r = res[label]
            print(f"  {label}: {r['jobs']} jobs, {r['per_job_s'] * 1000:.0f} ms a job")
            for step, sec in r["steps_s"].items():
                print(f"    {step:38s} {sec * 1000:9.1f} ms  {100 * sec / r['per_job_s']:5.1f}% of the loop")


if __name__ == "__main__":
    main()
