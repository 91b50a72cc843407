"""Checkpoint load rate, cold and warm, beside the same machine's raw disk and host-to-device rates.

    python bench/model_load.py [--size-mb 2048] [--device cuda|cpu|cuda:N] [--dtype bfloat16]
                               [--tensors 200] [--rounds 3] [--dir DIR] [--keep] [--json]
                               [--chunk-mb MB] [--streams N] [--readers N] [--sweep-readers 2,4,16]
                               [--sweep-warm 16:32:4,8:64:2]

Standalone on purpose: needs torch, safetensors and the standard library only, and loads
workers/loading.py by file path (nothing else from the project), so it runs on a bare GPU box.

Writes one checkpoint of about --size-mb (--tensors tensors of varied sizes: a few small 1-D
norms/biases, the rest 2-D matrices of lognormally spread sizes) as safetensors and, for the
torch.load reference, as a .pt; both are fsynced. Then --rounds rounds; each round times every
figure below once, baselines next to ours, in one fixed order that odd rounds run backwards, so
that baseline and ours meet the same machine (and the same neighbours) in every round. Medians
over rounds are reported, and the median of the per-round ratios beside them:

  baselines  disk read cold   page cache dropped, sequential reads of the file into a reused
                              64 MiB buffer, one thread and `readers` threads (the faster is
                              the baseline: it is what the disk can do)
             disk read warm   the same from the page cache
             pinned H2D       (cuda) copy_ of a 512 MiB pinned buffer into a preallocated device
                              buffer, non_blocking, synchronised: the link's practical limit
             host memcpy      (cpu) copy_ of a 512 MiB tensor into another: the memory's limit
  ours       load_safetensors cold (page cache dropped before each one) and warm, called as a
             worker calls it (workers/runtime.py passes no options): the loader's shipped
             defaults for the device, unless --chunk-mb/--streams/--readers override one (the
             JSON then says shipped_defaults: false); on CPU also mmap=True, pages touched (like
             safetensors, it reads nothing up front)
  references torch.load       the .pt, weights_only=True, map_location=device, warm
             safetensors      safetensors.torch.load_file(path, device=...), warm. On CPU it
                              returns tensors over a mmap of the file and reads nothing, so it
                              is also reported with every page touched once (the cost moved to
                              first use)
  sweep      --sweep-warm / --sweep-readers: the loader with other settings, timed in the same
             rounds, reported in their own table (JSON key `sweep`), every setting with its
             figure; never one of ours' figures

Ratios: cold vs the cold disk read; warm vs pinned H2D on cuda, vs host memcpy and the warm
(page cache) read on cpu. GB/s are 1e9 bytes of checkpoint data per second. Every timed load
allocates its own destination (torch.cuda.empty_cache() between runs), so the device
allocation is part of each number; torch's pinned-memory cache keeps our staging buffers
between runs, as it would in a worker (on cuda each loader setting loads once, untimed, before
the rounds). Ours is checked bit for bit against safetensors once. The JSON carries
bench/provenance.py's fields (measured_at, commit, code, command, source_digest).

Cold needs the page cache dropped: posix_fadvise(DONTNEED), else (root only)
/proc/sys/vm/drop_caches; whether it worked is measured with mincore and printed. The default
directory is the system temp dir unless that is tmpfs/ramfs (nothing to drop there), then a
folder under the repository. The files are removed at the end unless --keep or --dir is given.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
READ_BUF = 64 * MiB


def _import_by_path(name: str, relpath: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


loading = _import_by_path("dreamq_workers_loading", "workers/loading.py")
provenance = _import_by_path("dreamq_bench_provenance", "bench/provenance.py")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- checkpoint -----------------------------------------------------------------------------


def plan_shapes(size_bytes: int, count: int, itemsize: int, seed: int = 0) -> list[tuple[int, ...]]:
    """About a quarter small 1-D tensors (norms, biases), the rest matrices whose sizes spread
    over two orders of magnitude, summing to size_bytes (to a row)."""
    rng = random.Random(seed)
    total = size_bytes // itemsize
    n_small = max(0, min(count - 1, count // 4))
    small = [(rng.choice((512, 1024, 2048, 4096, 8192)),) for _ in range(n_small)]
    rest = total - sum(s[0] for s in small)
    if rest <= 0:
        return [(total,)]
    n_big = count - n_small
    weights = [rng.lognormvariate(0, 1.0) for _ in range(n_big)]
    scale = rest / sum(weights)
    shapes: list[tuple[int, ...]] = []
    used = 0
    for w in weights:
        cols = rng.choice((1024, 2048, 3072, 4096, 5120))
        rows = max(1, int(w * scale) // cols)
        shapes.append((rows, cols))
        used += rows * cols
    left = total - sum(s[0] for s in small) - used
    if left > 0:
        shapes.append((left,))
    return small + shapes


def make_checkpoint(directory: Path, size_mb: int, count: int, dtype: torch.dtype) -> tuple[Path, Path, int, int]:
    shapes = plan_shapes(size_mb * MiB, count, dtype.itemsize)
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(shapes):
        kind = "norm" if len(shape) == 1 else "weight"
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen, dtype=dtype)
        elif dtype == torch.bool:
            t = torch.rand(shape, generator=gen) > 0.5
        else:
            t = torch.randint(0, 100, shape, generator=gen, dtype=dtype)
        tensors[f"blocks.{i:04d}.{kind}"] = t
    st_path = directory / "model.safetensors"
    pt_path = directory / "model.pt"
    save_file(tensors, str(st_path))
    torch.save(tensors, pt_path)
    for p in (st_path, pt_path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped for the cold runs
        finally:
            os.close(fd)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return st_path, pt_path, len(tensors), nbytes


# --- measurement helpers --------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # every load pays for its own device allocation


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    dt = time.perf_counter() - t0
    del result
    release(device)
    return dt


def read_file(path: Path, threads: int) -> int:
    """Read the whole file sequentially into reused, already-faulted buffers; discard."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (OSError, AttributeError):
            pass
        offsets = list(range(0, size, READ_BUF))
        lock = threading.Lock()

        def worker() -> None:
            buf = memoryview(bytearray(READ_BUF))
            while True:
                with lock:
                    if not offsets:
                        return
                    off = offsets.pop(0)
                want = min(READ_BUF, size - off)
                done = 0
                while done < want:
                    got = os.preadv(fd, [buf[done:want]], off + done)
                    if got == 0:
                        return
                    done += got

        if threads <= 1:
            worker()
        else:
            ts = [threading.Thread(target=worker) for _ in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return size
    finally:
        os.close(fd)


def drop(path: Path, drops: list[dict[str, Any]]) -> None:
    report = loading.drop_page_cache(path)
    drops.append(report)


def touch_pages(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte per page of every tensor: forces mmap-backed tensors to fault their pages in."""
    for t in tensors.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()


class CopyRate:
    """The copy a warm load is judged against, one sample per call over buffers made once: on
    cuda a non_blocking copy_ of a pinned host buffer into a preallocated device buffer (the
    link's practical limit), on cpu a copy_ between two host tensors (the memory's)."""

    REPS = 4

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.device, self.nbytes = device, nbytes
        cuda = device.type == "cuda"
        self.src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.src.fill_(1)
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.dst.fill_(0)
        self.dst.copy_(self.src, non_blocking=cuda)  # warm-up: context, copy engine, TLBs
        sync(device)

    def sample(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.REPS):
            self.dst.copy_(self.src, non_blocking=self.device.type == "cuda")
        sync(self.device)
        return self.REPS * self.nbytes / (time.perf_counter() - t0) / 1e9


def fs_type(path: Path) -> str:
    try:
        real = os.path.realpath(path)
        best, kind = "", "unknown"
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                        best, kind = mnt, parts[2]
        return kind
    except OSError:
        return "unknown"


def bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if sorted(a) != sorted(b):
        return False
    for k, x in a.items():
        y = b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


# --- main -----------------------------------------------------------------------------------


@dataclass
class Measure:
    """One figure: a load (or read) timed once per round, with the page cache put in the state it
    needs first (dropped for a cold one, read through for a warm one), or a CopyRate sample."""

    name: str
    role: str  # baseline, ours, reference or sweep
    fn: Callable[[], Any] | None = None
    cold: bool = False
    path: Path | None = None
    nbytes: int = 0
    rate: Callable[[], float] | None = None


def parse_sweep_warm(spec: str) -> list[tuple[int, float, int, str]]:
    """'16:32:4,8:64:2' -> [(readers, chunk_mb, streams, name), ...]."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        r, c, s = item.split(":")
        out.append((int(r), float(c), int(s), f"sweep_warm_r{r}_c{c}_s{s}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "int64", "uint8", "bool"])
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--dir", type=Path, default=None, help="where to write the checkpoint (default: temp dir, not tmpfs)"
    )
    ap.add_argument("--keep", action="store_true", help="leave the checkpoint files behind")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument(
        "--chunk-mb", type=float, default=None, help="override the loader's default (the figures are then not its)"
    )
    ap.add_argument("--streams", type=int, default=None, help="override the loader's default (CUDA only)")
    ap.add_argument("--readers", type=int, default=None, help="override the loader's default reader count")
    ap.add_argument(
        "--sweep-readers",
        default="",
        help="comma-separated reader counts: also time ours cold and warm with each, in the same rounds; "
        "reported as a sweep, apart from the shipped defaults' figures",
    )
    ap.add_argument(
        "--sweep-warm",
        default="",
        help="comma-separated readers:chunk_mb:streams triples: also time ours warm with each, in the same "
        "rounds; reported as a sweep (for picking the loader's defaults on a machine), never as ours",
    )
    args = ap.parse_args(argv)
    prov = provenance.provenance(__file__, sys.argv[1:] if argv is None else argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.empty(1, device=device)  # context creation is not part of any number
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({os.cpu_count()} cores)"
    dtype = getattr(torch, args.dtype)
    # Ours is the loader as a worker calls it (workers/runtime.py passes no options), unless a flag
    # overrides one; `options` reports what the loader used.
    overrides = {
        k: v
        for k, v in (("chunk_mb", args.chunk_mb), ("streams", args.streams), ("readers", args.readers))
        if v is not None
    }
    shipped = not overrides
    readers = args.readers or loading.default_readers(device.type)
    options = {
        "chunk_mb": args.chunk_mb
        if args.chunk_mb is not None
        else (loading.CUDA_CHUNK_MB if device.type == "cuda" else loading.CPU_CHUNK_MB),
        "streams": args.streams if args.streams is not None else loading.CUDA_STREAMS,
        "readers": readers,
    }
    rounds = max(1, args.rounds)
    sweep_readers = [int(x) for x in args.sweep_readers.split(",") if x.strip()]
    sweep_warm = parse_sweep_warm(args.sweep_warm)

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="model-load-", dir=args.dir))
        cleanup = not args.keep
    else:
        base = Path(tempfile.gettempdir())
        if fs_type(base) in ("tmpfs", "ramfs"):
            base = ROOT  # a RAM filesystem has no cold state to measure
        workdir = Path(tempfile.mkdtemp(prefix=".model-load-bench-", dir=base))
        cleanup = not args.keep
    fs = fs_type(workdir)

    started = time.perf_counter()
    samples: dict[str, list[float]] = {}
    drops: list[dict[str, Any]] = []
    orders: list[list[str]] = []
    try:
        log(f"writing a {args.size_mb} MiB {args.dtype} checkpoint to {workdir} ({fs}) ...")
        st_path, pt_path, count, nbytes = make_checkpoint(workdir, args.size_mb, args.tensors, dtype)
        file_bytes = st_path.stat().st_size
        log(f"  {count} tensors, {nbytes / 1e9:.3f} GB of data, {time.perf_counter() - started:.1f}s")

        def ours(**extra: Any) -> Callable[[], Any]:
            kwargs = {**overrides, **extra}
            return lambda: loading.load_safetensors(st_path, device, **kwargs)

        def touched(load: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], None]:
            return lambda: touch_pages(load())

        copy = CopyRate(device, min(512 * MiB, max(64 * MiB, nbytes)))
        copy_name = "pinned_h2d" if device.type == "cuda" else "host_memcpy"
        st, pt, fb = dict(path=st_path, nbytes=nbytes), dict(path=pt_path, nbytes=nbytes), dict(nbytes=file_bytes)
        thread_counts = [1] if readers == 1 else [1, readers]
        # Each cold baseline sits next to ours cold, each warm one next to ours warm; odd rounds run
        # the list backwards, so in every round baseline and ours meet the same machine.
        measures = [
            *(
                Measure(
                    f"disk_read_cold_{t}t", "baseline", lambda t=t: read_file(st_path, t), cold=True, path=st_path, **fb
                )
                for t in thread_counts
            ),
            Measure("ours_cold", "ours", ours(), cold=True, **st),
            *(
                Measure(f"disk_read_warm_{t}t", "baseline", lambda t=t: read_file(st_path, t), path=st_path, **fb)
                for t in thread_counts
            ),
            Measure(copy_name, "baseline", rate=copy.sample),
            Measure("ours_warm", "ours", ours(), **st),
            Measure("safetensors_warm", "reference", lambda: load_file(str(st_path), device=str(device)), **st),
        ]
        if device.type == "cpu":
            measures += [
                Measure(
                    "safetensors_warm_touched",
                    "reference",
                    touched(lambda: load_file(str(st_path), device="cpu")),
                    **st,
                ),
                Measure("ours_warm_touched", "ours", touched(ours()), **st),
                Measure(
                    "ours_mmap_warm_touched",
                    "ours",
                    touched(lambda: loading.load_safetensors(st_path, device, mmap=True)),
                    **st,
                ),
            ]
        measures.append(
            Measure(
                "torch_load_warm",
                "reference",
                lambda: torch.load(pt_path, map_location=device, weights_only=True),
                **pt,
            )
        )
        for r in sweep_readers:
            measures.append(Measure(f"sweep_r{r}_cold", "sweep", ours(readers=r), cold=True, **st))
            measures.append(Measure(f"sweep_r{r}_warm", "sweep", ours(readers=r), **st))
        for r, c, s, name in sweep_warm:
            measures.append(Measure(name, "sweep", ours(readers=r, chunk_mb=c, streams=s), **st))

        if device.type == "cuda":
            # Untimed: every setting's pinned staging into torch's host cache, as in a worker that
            # has loaded once; else whichever setting ran first in round 1 paid for it.
            log("warm-up (pinned staging of each loader setting) ...")
            for m in measures:
                if m.role in ("ours", "sweep") and not m.cold:
                    timed(m.fn, device)

        for i in range(rounds):
            order = measures if i % 2 == 0 else measures[::-1]
            orders.append([m.name for m in order])
            for m in order:
                if m.rate is not None:
                    value = m.rate()
                else:
                    if m.cold:
                        drop(m.path, drops)
                    else:
                        read_file(m.path, readers)  # make sure it is warm, whatever ran before
                    value = m.nbytes / timed(m.fn, device) / 1e9
                samples.setdefault(m.name, []).append(value)
            got = {k: v[-1] for k, v in samples.items()}
            log(
                f"round {i + 1}/{rounds}{' (reversed)' if i % 2 else ''}: ours cold {got['ours_cold']:.2f} vs disk cold "
                f"{max(got[f'disk_read_cold_{t}t'] for t in thread_counts):.2f}; ours warm {got['ours_warm']:.2f} vs "
                f"{copy_name} {got[copy_name]:.2f} GB/s"
            )
        ref_ours = loading.load_safetensors(st_path, device, **overrides)
        ref = load_file(str(st_path), device=str(device))
        exact = bit_exact(ref_ours, ref)
        del ref_ours, ref
        release(device)
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)

    role = {m.name: m.role for m in measures}
    med = {k: statistics.median(v) for k, v in samples.items()}
    disk_cold = max(med[f"disk_read_cold_{t}t"] for t in thread_counts)
    disk_warm = max(med[f"disk_read_warm_{t}t"] for t in thread_counts)
    warm_base, warm_base_name = med[copy_name], copy_name
    truly_cold = all(d.get("dropped") is not False for d in drops)
    ratio: dict[str, float] = {"ours_cold_vs_disk_cold": med["ours_cold"] / disk_cold}
    if device.type == "cpu":
        ratio["ours_warm_vs_disk_warm"] = med["ours_warm"] / disk_warm
    ratio[f"ours_warm_vs_{warm_base_name}"] = med["ours_warm"] / warm_base
    if device.type == "cuda":
        ratio["ours_warm_vs_safetensors_warm"] = med["ours_warm"] / med["safetensors_warm"]
    else:
        # safetensors on CPU reads nothing up front: compare loads that end with every page touched.
        ratio["ours_warm_touched_vs_safetensors_warm_touched"] = (
            med["ours_warm_touched"] / med["safetensors_warm_touched"]
        )
        ratio["ours_mmap_warm_touched_vs_safetensors_warm_touched"] = (
            med["ours_mmap_warm_touched"] / med["safetensors_warm_touched"]
        )
    ratio["ours_warm_vs_torch_load_warm"] = med["ours_warm"] / med["torch_load_warm"]
    # Each round's ours over the same round's baseline: on a shared machine the steadier figure.
    ratio_paired = {
        "ours_cold_vs_disk_cold": statistics.median(
            samples["ours_cold"][i] / max(samples[f"disk_read_cold_{t}t"][i] for t in thread_counts)
            for i in range(rounds)
        ),
        f"ours_warm_vs_{warm_base_name}": statistics.median(
            samples["ours_warm"][i] / samples[warm_base_name][i] for i in range(rounds)
        ),
    }

    sweep: dict[str, Any] = {}
    if sweep_warm:
        sweep["warm"] = [
            {
                "readers": r,
                "chunk_mb": c,
                "streams": s,
                "gbps": med[name],
                "samples": samples[name],
                f"ratio_vs_{warm_base_name}": med[name] / warm_base,
                "ratio_vs_ours_warm": med[name] / med["ours_warm"],
                "is_the_shipped_defaults": (r, c, s) == (options["readers"], options["chunk_mb"], options["streams"]),
            }
            for r, c, s, name in sweep_warm
        ]
    if sweep_readers:
        sweep["readers"] = [
            {
                "readers": r,
                "cold_gbps": med[f"sweep_r{r}_cold"],
                "warm_gbps": med[f"sweep_r{r}_warm"],
                "cold_samples": samples[f"sweep_r{r}_cold"],
                "warm_samples": samples[f"sweep_r{r}_warm"],
                "ratio_cold_vs_disk_cold": med[f"sweep_r{r}_cold"] / disk_cold,
                f"ratio_warm_vs_{warm_base_name}": med[f"sweep_r{r}_warm"] / warm_base,
            }
            for r in sweep_readers
        ]
    if sweep:
        sweep["note"] = (
            "other loader settings, measured in the same interleaved rounds as ours; not figures of the "
            "shipped loader (those are gbps.ours_*)"
        )

    main_names = [k for k in samples if role[k] != "sweep"]
    result = {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "size_bytes": nbytes,
        "file_bytes": file_bytes,
        "tensors": count,
        "dtype": args.dtype,
        "rounds": rounds,
        "dir": str(workdir),
        "filesystem": fs,
        "options": options,
        "shipped_defaults": shipped,
        "overrides": overrides,
        "cold_is_cold": truly_cold,
        "page_cache_drops": drops,
        "interleaving": "every figure once per round, in one fixed order, reversed in odd rounds; medians over rounds",
        "round_orders": orders,
        "gbps": {k: med[k] for k in main_names},
        "gbps_samples": {k: samples[k] for k in main_names},
        "baseline": {"disk_cold": disk_cold, "disk_warm": disk_warm, "warm": warm_base, "warm_name": warm_base_name},
        "ratio": ratio,
        "ratio_paired": ratio_paired,
        "goal": ({"ours_warm_vs_pinned_h2d": 0.5, "ours_cold_vs_disk_cold": 0.9} if device.type == "cuda" else None),
        "sweep": sweep or None,
        "bit_exact": exact,
        "unit": "GB/s (1e9 bytes of tensor data per second), median of rounds",
        "seconds_total": time.perf_counter() - started,
        **prov,
    }
    if args.json:
        print(json.dumps(result, indent=None))
        return 0 if exact else 1

    def row(name: str, label: str, vs: float | None = None, vs_name: str = "") -> str:
        r = f"{med[name] / vs:6.2f}  vs {vs_name}" if vs else ""
        return f"{label:<44} {med[name]:8.2f}  {r}".rstrip()

    cold_note = "" if truly_cold else "  (page cache NOT dropped: cold figures are warm)"
    print(
        f"model_load: {nbytes / 1e9:.3f} GB {args.dtype} in {count} tensors, device {device} ({device_name}), "
        f"torch {torch.__version__}"
    )
    print(
        f"checkpoint in {workdir} ({fs}); ours = load_safetensors with "
        f"{'the shipped defaults' if shipped else 'OVERRIDDEN options ' + str(overrides)}: chunk "
        f"{options['chunk_mb']} MiB, {str(options['streams']) + ' streams, ' if device.type == 'cuda' else ''}"
        f"{readers} readers; median of {rounds} "
        "interleaved rounds"
    )
    print(f"{prov['code']} at {prov['commit']}, {prov['measured_at']}")
    d = drops[-1] if drops else {}
    print(
        f"page cache drop: fadvise={d.get('fadvise')} drop_caches={d.get('drop_caches')} "
        f"resident before {d.get('resident_before')} after {d.get('resident_after')}{cold_note}"
    )
    print(f"{'method':<44} {'GB/s':>8}  ratio")
    for t in thread_counts:
        print(row(f"disk_read_cold_{t}t", f"disk read cold, {t} thread{'s' if t > 1 else ''}"))
    for t in thread_counts:
        print(row(f"disk_read_warm_{t}t", f"disk read warm (page cache), {t} thread{'s' if t > 1 else ''}"))
    if device.type == "cuda":
        print(row("pinned_h2d", "pinned host-to-device copy"))
    else:
        print(row("host_memcpy", "host memcpy (cpu stands in for pinned H2D)"))
    print(row("torch_load_warm", "torch.load warm (.pt, weights_only)", warm_base, warm_base_name))
    st_label = "safetensors load_file warm" + (" (lazy mmap)" if device.type == "cpu" else "")
    print(row("safetensors_warm", st_label, warm_base, warm_base_name))
    if device.type == "cpu":
        print(row("safetensors_warm_touched", "safetensors load_file warm + touch pages", warm_base, warm_base_name))
    print(row("ours_cold", "load_safetensors cold", disk_cold, "disk read cold"))
    print(row("ours_warm", "load_safetensors warm", warm_base, warm_base_name))
    if device.type == "cpu":
        print(row("ours_warm", "load_safetensors warm", disk_warm, "disk read warm"))
        print(row("ours_warm_touched", "load_safetensors warm + touch pages", warm_base, warm_base_name))
        print(row("ours_mmap_warm_touched", "load_safetensors(mmap=True) warm + touch", warm_base, warm_base_name))
    if device.type == "cuda":
        vs_st = f"ours warm vs safetensors warm: {ratio['ours_warm_vs_safetensors_warm']:.2f}x"
    else:
        vs_st = (
            f"touched, ours vs safetensors: {ratio['ours_warm_touched_vs_safetensors_warm_touched']:.2f}x "
            f"(mmap=True: {ratio['ours_mmap_warm_touched_vs_safetensors_warm_touched']:.2f}x)"
        )
    print(
        f"{vs_st}; ours warm vs torch.load warm: {ratio['ours_warm_vs_torch_load_warm']:.2f}x; "
        f"bit-exact vs safetensors: {exact}"
    )
    print(
        f"per-round ratios (median): cold {ratio_paired['ours_cold_vs_disk_cold']:.2f}x disk read, warm "
        f"{ratio_paired[f'ours_warm_vs_{warm_base_name}']:.2f}x {warm_base_name}"
    )
    if device.type == "cuda":
        ok_w = ratio["ours_warm_vs_pinned_h2d"] >= 0.5
        ok_c = ratio["ours_cold_vs_disk_cold"] >= 0.9
        print(
            f"goal: warm >= 50% of pinned H2D: {'met' if ok_w else 'MISSED'}; cold >= 90% of disk read: "
            f"{'met' if ok_c else 'MISSED'}"
            + ("" if shipped else " (options overridden: not a figure of the shipped loader)")
        )
    if sweep:
        print(f"\nsweep ({sweep['note']}):")
        print(f"{'readers':>7} {'chunk MiB':>9} {'streams':>7} {'cold GB/s':>9} {'warm GB/s':>9}  ratio")
        for e in sweep.get("readers", []):
            print(
                f"{e['readers']:>7} {options['chunk_mb']:>9g} {options['streams']:>7} {e['cold_gbps']:>9.2f} "
                f"{e['warm_gbps']:>9.2f}  cold {e['ratio_cold_vs_disk_cold']:.2f}x disk read, warm "
                f"{e[f'ratio_warm_vs_{warm_base_name}']:.2f}x {warm_base_name}"
            )
        for e in sweep.get("warm", []):
            print(
                f"{e['readers']:>7} {e['chunk_mb']:>9g} {e['streams']:>7} {'':>9} {e['gbps']:>9.2f}  "
                f"{e[f'ratio_vs_{warm_base_name}']:.2f}x {warm_base_name}, {e['ratio_vs_ours_warm']:.2f}x ours warm"
                + ("  (= the shipped defaults)" if e["is_the_shipped_defaults"] else "")
            )
    print(f"total {result['seconds_total']:.0f}s")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
