"""Checkpoint load rate, cold and warm, beside the same machine's raw disk and host-to-device rates.

    python bench/model_load.py [--size-mb 2048] [--device cuda|cpu|cuda:N] [--dtype bfloat16]
                               [--tensors 200] [--rounds 3] [--dir DIR] [--keep] [--json]
                               [--chunk-mb MB] [--streams N] [--readers N] [--sweep-readers 2,4,16]
                               [--sweep-warm 16:32:4,8:64:2]

Standalone on purpose: needs torch, safetensors and the standard library only, and loads
workers/loading.py by file path (nothing else from the project), so it runs on a bare GPU box.

Writes one checkpoint of about --size-mb (--tensors tensors of varied sizes: a few small 1-D
norms/biases, the rest 2-D matrices of lognormally spread sizes) as safetensors and, for the
torch.load reference, as a .pt; both are fsynced. Then, median of --rounds each:

  baselines  disk read cold   page cache dropped, sequential reads of the file into a reused
                              64 MiB buffer, one thread and `readers` threads (the faster is
                              the baseline: it is what the disk can do)
             disk read warm   the same from the page cache
             pinned H2D       (cuda) copy_ of a 512 MiB pinned buffer into a preallocated device
                              buffer, non_blocking, synchronised: the link's practical limit
             host memcpy      (cpu) copy_ of a 512 MiB tensor into another: the memory's limit
             torch.load       the .pt, weights_only=True, map_location=device, warm
             safetensors      safetensors.torch.load_file(path, device=...), warm. On CPU it
                              returns tensors over a mmap of the file and reads nothing, so it
                              is also reported with every page touched once (the cost moved to
                              first use)
  ours       load_safetensors cold (page cache dropped before each round) and warm; on CPU
             also mmap=True, pages touched (like safetensors, it reads nothing up front)

Ratios: cold vs the cold disk read; warm vs pinned H2D on cuda, vs host memcpy and the warm
(page cache) read on cpu. GB/s are 1e9 bytes of checkpoint data per second. Every timed load
allocates its own destination (torch.cuda.empty_cache() between runs), so the device
allocation is part of each number; torch's pinned-memory cache keeps our staging buffers
between runs, as it would in a worker. Ours is checked bit for bit against safetensors once.

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
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
READ_BUF = 64 * MiB


def _import_loading():
    spec = importlib.util.spec_from_file_location("dreamq_workers_loading", ROOT / "workers" / "loading.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


loading = _import_loading()


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


def pinned_h2d_rate(device: torch.device, nbytes: int, rounds: int) -> list[float]:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    reps = 4
    dst.copy_(src, non_blocking=True)  # warm-up: context, copy engine, TLBs
    torch.cuda.synchronize(device)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        rates.append(reps * nbytes / (time.perf_counter() - t0) / 1e9)
    del src, dst
    release(device)
    return rates


def host_memcpy_rate(nbytes: int, rounds: int) -> list[float]:
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.fill_(0)
    reps = 4
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        rates.append(reps * nbytes / (time.perf_counter() - t0) / 1e9)
    return rates


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
    ap.add_argument("--chunk-mb", type=float, default=None, help="default: the loader's for the device")
    ap.add_argument("--streams", type=int, default=None, help="default: the loader's (CUDA only)")
    ap.add_argument("--readers", type=int, default=None)
    ap.add_argument(
        "--sweep-readers",
        default="",
        help="comma-separated reader counts: also time ours cold and warm with each (same checkpoint)",
    )
    ap.add_argument(
        "--sweep-warm",
        default="",
        help="comma-separated readers:chunk_mb:streams triples: also time ours warm with each "
        "(picks the loader's defaults on a given machine)",
    )
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.empty(1, device=device)  # context creation is not part of any number
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({os.cpu_count()} cores)"
    dtype = getattr(torch, args.dtype)
    readers = args.readers or loading.default_readers(device.type)
    if args.chunk_mb is None:
        args.chunk_mb = loading.CUDA_CHUNK_MB if device.type == "cuda" else loading.CPU_CHUNK_MB
    if args.streams is None:
        args.streams = loading.CUDA_STREAMS
    opts = dict(chunk_mb=args.chunk_mb, streams=args.streams, readers=readers)
    rounds = max(1, args.rounds)

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
    try:
        log(f"writing a {args.size_mb} MiB {args.dtype} checkpoint to {workdir} ({fs}) ...")
        st_path, pt_path, count, nbytes = make_checkpoint(workdir, args.size_mb, args.tensors, dtype)
        file_bytes = st_path.stat().st_size
        log(f"  {count} tensors, {nbytes / 1e9:.3f} GB of data, {time.perf_counter() - started:.1f}s")

        def rate(seconds: float, n: int = nbytes) -> float:
            return n / seconds / 1e9

        def run(name: str, fn: Callable[[], Any], *, cold: bool = False, path: Path = st_path, n: int = nbytes) -> None:
            out = samples.setdefault(name, [])
            for _ in range(rounds):
                if cold:
                    drop(path, drops)
                else:
                    read_file(path, readers)  # make sure it is warm, whatever ran before
                out.append(rate(timed(fn, device), n))
            log(f"  {name:<28} {statistics.median(out):7.2f} GB/s  {[round(x, 2) for x in out]}")

        log("baselines ...")
        run("disk_read_cold_1t", lambda: read_file(st_path, 1), cold=True, n=file_bytes)
        run(f"disk_read_cold_{readers}t", lambda: read_file(st_path, readers), cold=True, n=file_bytes)
        run("disk_read_warm_1t", lambda: read_file(st_path, 1), n=file_bytes)
        run(f"disk_read_warm_{readers}t", lambda: read_file(st_path, readers), n=file_bytes)
        copy_bytes = min(512 * MiB, max(64 * MiB, nbytes))
        if device.type == "cuda":
            samples["pinned_h2d"] = pinned_h2d_rate(device, copy_bytes, rounds)
            log(f"  {'pinned_h2d':<28} {statistics.median(samples['pinned_h2d']):7.2f} GB/s")
        else:
            samples["host_memcpy"] = host_memcpy_rate(copy_bytes, rounds)
            log(f"  {'host_memcpy':<28} {statistics.median(samples['host_memcpy']):7.2f} GB/s")

        log("ours ...")
        run("ours_cold", lambda: loading.load_safetensors(st_path, device, **opts), cold=True)
        run("ours_warm", lambda: loading.load_safetensors(st_path, device, **opts))

        log("references ...")
        run("safetensors_warm", lambda: load_file(str(st_path), device=str(device)))
        if device.type == "cpu":

            def st_touched() -> None:
                t = load_file(str(st_path), device="cpu")
                touch_pages(t)

            def ours_touched() -> None:
                t = loading.load_safetensors(st_path, device, **opts)
                touch_pages(t)

            def mmap_touched() -> None:
                t = loading.load_safetensors(st_path, device, mmap=True)
                touch_pages(t)

            run("safetensors_warm_touched", st_touched)
            run("ours_warm_touched", ours_touched)
            run("ours_mmap_warm_touched", mmap_touched)
        run(
            "torch_load_warm",
            lambda: torch.load(pt_path, map_location=device, weights_only=True),
            path=pt_path,
        )

        sweep = [int(x) for x in args.sweep_readers.split(",") if x.strip()]
        if sweep:
            log("reader sweep ...")
        for r in sweep:
            o = dict(opts, readers=r)
            run(f"sweep_r{r}_cold", lambda o=o: loading.load_safetensors(st_path, device, **o), cold=True)
            run(f"sweep_r{r}_warm", lambda o=o: loading.load_safetensors(st_path, device, **o))
        warm_sweep = [tuple(x.split(":")) for x in args.sweep_warm.split(",") if x.strip()]
        for r, c, s in warm_sweep:
            o = dict(opts, readers=int(r), chunk_mb=float(c), streams=int(s))
            run(f"sweep_warm_r{r}_c{c}_s{s}", lambda o=o: loading.load_safetensors(st_path, device, **o))

        ours = loading.load_safetensors(st_path, device, **opts)
        ref = load_file(str(st_path), device=str(device))
        exact = bit_exact(ours, ref)
        del ours, ref
        release(device)
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in samples.items()}
    disk_cold = max(med["disk_read_cold_1t"], med[f"disk_read_cold_{readers}t"])
    disk_warm = max(med["disk_read_warm_1t"], med[f"disk_read_warm_{readers}t"])
    truly_cold = all(d.get("dropped") is not False for d in drops)
    ratio: dict[str, float] = {"ours_cold_vs_disk_cold": med["ours_cold"] / disk_cold}
    if device.type == "cuda":
        warm_base, warm_base_name = med["pinned_h2d"], "pinned_h2d"
    else:
        warm_base, warm_base_name = med["host_memcpy"], "host_memcpy"
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
        "options": opts,
        "cold_is_cold": truly_cold,
        "page_cache_drops": drops,
        "gbps": med,
        "gbps_samples": samples,
        "baseline": {"disk_cold": disk_cold, "disk_warm": disk_warm, "warm": warm_base, "warm_name": warm_base_name},
        "ratio": ratio,
        "goal": ({"ours_warm_vs_pinned_h2d": 0.5, "ours_cold_vs_disk_cold": 0.9} if device.type == "cuda" else None),
        "bit_exact": exact,
        "unit": "GB/s (1e9 bytes of tensor data per second), median of rounds",
        "seconds_total": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(result, indent=None))
        return 0 if exact else 1

    def row(name: str, label: str, vs: float | None = None, vs_name: str = "") -> str:
        r = f"{med[name] / vs:6.2f}  vs {vs_name}" if vs else ""
        return f"{label:<44} {med[name]:8.2f}  {r}".rstrip()

    cold_note = "" if truly_cold else "  (page cache NOT dropped: cold figures are warm)"
    print(
        f"model_load: {nbytes / 1e9:.3f} GB {args.dtype} in {count} tensors, device {device} ({device_name}), torch {torch.__version__}"
    )
    print(
        f"checkpoint in {workdir} ({fs}); chunk {args.chunk_mb} MiB, {args.streams} streams, {readers} readers; median of {rounds}"
    )
    d = drops[-1] if drops else {}
    print(
        f"page cache drop: fadvise={d.get('fadvise')} drop_caches={d.get('drop_caches')} "
        f"resident before {d.get('resident_before')} after {d.get('resident_after')}{cold_note}"
    )
    print(f"{'method':<44} {'GB/s':>8}  ratio")
    print(row("disk_read_cold_1t", "disk read cold, 1 thread"))
    print(row(f"disk_read_cold_{readers}t", f"disk read cold, {readers} threads"))
    print(row("disk_read_warm_1t", "disk read warm (page cache), 1 thread"))
    print(row(f"disk_read_warm_{readers}t", f"disk read warm (page cache), {readers} threads"))
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
        f"{vs_st}; ours warm vs torch.load warm: {ratio['ours_warm_vs_torch_load_warm']:.2f}x; bit-exact vs safetensors: {exact}"
    )
    for r in sweep:
        print(row(f"sweep_r{r}_cold", f"load_safetensors cold, {r} readers", disk_cold, "disk read cold"))
        print(row(f"sweep_r{r}_warm", f"load_safetensors warm, {r} readers", warm_base, warm_base_name))
    if device.type == "cuda":
        ok_w = ratio["ours_warm_vs_pinned_h2d"] >= 0.5
        ok_c = ratio["ours_cold_vs_disk_cold"] >= 0.9
        print(
            f"goal: warm >= 50% of pinned H2D: {'met' if ok_w else 'MISSED'}; cold >= 90% of disk read: {'met' if ok_c else 'MISSED'}"
        )
    print(f"total {result['seconds_total']:.0f}s")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
