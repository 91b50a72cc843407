"""Fast safetensors loading: page cache or disk to device memory at close to the hardware's rate.

    tensors = load_safetensors([shard0, shard1], "cuda:0")     # dict name -> tensor on cuda:0

Format: 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape,
data_offsets relative to the data region, plus an optional "__metadata__"), then the data region.
We parse the header ourselves so that the data region can be read as a few large sequential
reads instead of one small read (or one page fault) per tensor.

CUDA pipeline, per call:

    disk / page cache --pread (reader threads, GIL released)--> pinned staging buffer k
        --copy_(non_blocking) on a side stream, event k recorded--> one flat device buffer per file

* One flat device allocation per file: one cudaMalloc instead of one per tensor, so no allocator
  churn or fragmentation, and every chunk copy lands at a plain offset. Tensors are views of it
  (dtype, shape and contiguous strides from the header).
* Pinned (page-locked) staging: the DMA engine reads straight from those pages. A copy from
  pageable memory makes the driver bounce it through its own small pinned buffer and is
  synchronous: a fraction of the pinned rate, and nothing else overlaps with it.
* Several staging buffers (readers + streams of them, each chunk_mb): a reader fills one buffer
  while the H2D copies of earlier chunks run from the others, so disk/page-cache reads overlap
  with PCIe transfers. Before a reader reuses a buffer it waits on that buffer's CUDA event (the
  copy that last read it), so a buffer is never overwritten while the DMA engine still reads it.
* Several reader threads: one thread copying out of the page cache stays well under a PCIe Gen5
  link (a few GB/s on bare metal, 1-2 GB/s on our 2-core VM), and a cold NVMe read wants more
  than one request in flight. os.preadv releases the GIL, so the threads really run in parallel.
* The copies run on `streams` side streams that first wait on the caller's current stream (the
  destination memory may have been freed by work still queued there); the call returns after the
  side streams are synchronised, so the tensors are complete for every stream.

CPU device: no staging at all. Reader threads pread straight into one torch-owned uint8 buffer per
file and the tensors are views of it: one copy out of the page cache, no mmap. The memory is
ordinary, writable and owned by torch. Lifetime: every tensor from a file shares that file's
buffer, so the buffer is freed only when the last of them is dropped (keep that in mind before
holding one small tensor of a large checkpoint for long). Nothing refers to the file after the
call returns, so the cache may evict or delete it at once.

CPU with mmap=True: tensors are views of a private (copy-on-write) mapping of each file, so a
warm load copies nothing and maps pages on first touch, and processes loading the same file
share its page-cache pages instead of each holding a copy. The price: the data is not read when
the call returns (a cold load moves its disk reads to first use), the mapping keeps the file's
inode and disk space until the last tensor dies, and a file truncated or unreadable underneath
raises SIGBUS in whatever touches it rather than an exception here. Writes copy the page.

A tensor whose byte offset is not a multiple of its element size cannot be a view (torch storage
offsets count elements); it is cloned out of the flat buffer on the same device instead.
safetensors' own writer pads the header to 8 bytes and sorts tensors by alignment, so that
happens only with files written by other tools.

Other device types (mps, xpu, ...) use the same staged reads with synchronous copies.

Cold reads: POSIX_FADV_SEQUENTIAL doubles the kernel's readahead window. `drop_page_cache` and
`page_cache_resident` exist for honest cold measurements (bench/model_load.py).

This module needs only torch and the standard library (the benchmark loads it by file path on
machines without the rest of the project).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap as mmap_module
import os
import queue
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "TensorEntry",
    "default_readers",
    "drop_page_cache",
    "load_safetensors",
    "page_cache_resident",
    "read_header",
]

# safetensors itself refuses larger headers; a bigger length means a corrupt or foreign file.
MAX_HEADER_BYTES = 100_000_000

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("C64", "complex64"),
):
    # Older torch builds lack some of these; files using them then fail with a clear message.
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data region
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # absolute file offset of the data region
    data_len: int  # bytes of the data region that tensors use (max end offset)
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None


# Defaults by device type, from the block-ordered bench/model_load.py --sweep-warm of 2026-11-27
# on an H100 host (16 cores, 2 GB bf16 checkpoint warm in the page cache;
# bench/results/gpu/model_load.json; the same sweep read the old defaults 13% higher than that
# run's main loop did, and these defaults have not been measured as defaults on a GPU since):
#   readers:chunk MiB:streams   8:64:2 24.1 GB/s   12:64:2 27.0   16:64:2 27.7   16:32:2 29.2
#                               16:32:4 30.9       16:16:4 29.8   12:128:2 23.0   8:32:4 25.2
# against 53.3 GB/s pinned H2D: the page-cache copies by reader threads are the limit, so on a
# GPU host every core reads (up to 16), in 32 MiB chunks over 4 copy streams. Pinned staging is
# (readers + streams) * chunk_mb: 640 MiB, as before. On CPU, two readers per core pair were
# measured best on the 2-core VM and half the cores leaves the worker room.
CUDA_CHUNK_MB = 32
CUDA_STREAMS = 4
CPU_CHUNK_MB = 64


def default_readers(device_type: str = "cpu") -> int:
    """Reader threads when none is given: on CUDA every core up to 16 (see above); otherwise
    half the cores, 2 to 8. Several page-cache copies in parallel are needed to approach a PCIe
    Gen5 link or keep an NVMe queue busy."""
    cpus = os.cpu_count() or 1
    if device_type == "cuda":
        return max(2, min(16, cpus))
    return max(1, min(cpus, max(2, min(8, cpus // 2))))


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and validate a safetensors header; ValueError says what is wrong with the file."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _read_header_fd(fd, path)
    finally:
        os.close(fd)


def _read_header_fd(fd: int, path: Path) -> SafetensorsHeader:
    size = os.fstat(fd).st_size
    if size < 8:
        raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > MAX_HEADER_BYTES:
        raise ValueError(
            f"{path}: corrupt safetensors header: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
    if 8 + n > size:
        raise ValueError(
            f"{path}: corrupt safetensors header: header length {n} runs past the end of the {size}-byte file"
        )
    raw = _pread_bytes(fd, n, 8, path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header: not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header: expected a JSON object, got {type(header).__name__}")

    data_start = 8 + n
    avail = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ValueError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")

    entries: list[TensorEntry] = []
    for name, info in header.items():
        entries.append(_parse_entry(path, name, info, avail))
    # Overlapping ranges would make two "independent" tensors alias each other's memory.
    by_offset = sorted((e for e in entries if e.end > e.begin), key=lambda e: e.begin)
    for prev, cur in zip(by_offset, by_offset[1:]):
        if cur.begin < prev.end:
            raise ValueError(f"{path}: corrupt safetensors header: tensors {prev.name!r} and {cur.name!r} overlap")
    data_len = max((e.end for e in entries), default=0)
    return SafetensorsHeader(path, data_start, data_len, tuple(entries), metadata)


def _parse_entry(path: Path, name: str, info: Any, avail: int) -> TensorEntry:
    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: corrupt safetensors header: tensor {name!r}: {why}")

    if not isinstance(info, dict):
        raise bad("entry is not an object")
    dtype_name = info.get("dtype")
    if not isinstance(dtype_name, str):
        raise bad("missing dtype")
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise bad(f"unsupported dtype {dtype_name!r} (this torch knows {sorted(_DTYPES)})")
    shape = info.get("shape")
    # bool is an int subclass in Python: exclude it explicitly.
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets {offsets} are not 0 <= begin <= end")
    if end > avail:
        raise bad(f"data_offsets end {end} runs past the {avail}-byte data region (truncated file?)")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise bad(f"data_offsets span {end - begin} bytes but {dtype_name}{shape} needs {nbytes}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def load_safetensors(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    device: torch.device | str = "cpu",
    *,
    chunk_mb: float | None = None,
    streams: int | None = None,
    readers: int | None = None,
    mmap: bool = False,
) -> dict[str, torch.Tensor]:
    """Load one or more safetensors files onto `device`; bit-identical to safetensors' load_file.

    chunk_mb: size of one read / one H2D copy (and of each pinned staging buffer); default
    CUDA_CHUNK_MB on CUDA, CPU_CHUNK_MB elsewhere.
    streams: CUDA side streams the copies are spread over (default CUDA_STREAMS; ignored on CPU).
    readers: reader threads (default `default_readers(device.type)`). Pinned staging memory on CUDA is
    (readers + streams) * chunk_mb, capped by the checkpoint's size; torch's pinned-memory cache
    keeps it for the next load in the process.
    mmap: CPU only; tensors over a private (copy-on-write) mapping of each file instead of a
    copy. See the module docstring for when that is worth it.
    A tensor name present in two files raises ValueError. See the module docstring for lifetime.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [Path(p) for p in paths]
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; views on a big-endian host would be wrong")
    device = torch.device(device)
    if mmap and device.type != "cpu":
        raise ValueError("mmap=True only makes sense for the cpu device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if chunk_mb is None:
        chunk_mb = CUDA_CHUNK_MB if device.type == "cuda" else CPU_CHUNK_MB
    streams = CUDA_STREAMS if streams is None else streams
    chunk = max(1, int(chunk_mb * 2**20))
    readers = default_readers(device.type) if readers is None else max(1, int(readers))

    fds: list[int] = []
    try:
        headers = []
        for path in files:
            # Header and data come from the same open file, so an atomic replace of the path
            # between the two can never pair one version's header with another's data.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            fds.append(fd)
            headers.append(_read_header_fd(fd, path))
            if hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass  # advice only
        seen: dict[str, Path] = {}
        for h in headers:
            for e in h.tensors:
                if e.name in seen:
                    raise ValueError(f"tensor {e.name!r} is in both {seen[e.name]} and {h.path}")
                seen[e.name] = h.path

        bases = [0] * len(headers)  # file offset of each flat buffer's first byte, minus data_start
        if mmap:
            flats = [_map_file(h, fd) for h, fd in zip(headers, fds)]
            bases = [h.data_start for h in headers]
        elif device.type == "cpu":
            flats = _read_direct(headers, fds, chunk, readers)
        elif device.type == "cuda":
            flats = _read_staged(headers, fds, chunk, readers, _CudaStage(device, streams))
        else:
            flats = _read_staged(headers, fds, chunk, readers, _SyncStage(device))
    finally:
        for fd in fds:
            os.close(fd)

    out: dict[str, torch.Tensor] = {}
    for h, flat, base in zip(headers, flats, bases):
        for e in h.tensors:
            region = flat[base + e.begin : base + e.end]
            if (base + e.begin) % e.dtype.itemsize:
                region = region.clone()  # misaligned: a view cannot express a byte offset
            out[e.name] = region.view(e.dtype).view(e.shape)
    return out


def _plan(headers: Sequence[SafetensorsHeader], chunk: int) -> list[tuple[int, int, int]]:
    """(file index, offset in its data region, length) for every chunk, in file order."""
    return [
        (fi, off, min(chunk, h.data_len - off)) for fi, h in enumerate(headers) for off in range(0, h.data_len, chunk)
    ]


def _map_file(h: SafetensorsHeader, fd: int) -> torch.Tensor:
    """The whole file (header included, so that element alignment is judged on page-aligned
    addresses) as a uint8 tensor over a MAP_PRIVATE mapping; the tensor keeps the mapping alive."""
    if h.data_len == 0:
        return torch.empty(0, dtype=torch.uint8)
    mm = mmap_module.mmap(fd, h.data_start + h.data_len, access=mmap_module.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8)


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable memoryview over a contiguous CPU uint8 tensor, without numpy. It does not keep
    `t` alive: the caller must."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    # preadv may return short counts (Linux caps one call near 2 GiB; signals interrupt it).
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{path}: unexpected end of file at byte {offset + done} (file truncated while loading?)")
        done += got


def _pread_bytes(fd: int, n: int, offset: int, path: Path) -> bytes:
    buf = bytearray(n)
    _pread_into(fd, memoryview(buf), offset, path)
    return bytes(buf)


def _read_direct(
    headers: Sequence[SafetensorsHeader], fds: Sequence[int], chunk: int, readers: int
) -> list[torch.Tensor]:
    flats = [torch.empty(h.data_len, dtype=torch.uint8) for h in headers]
    views = [_byte_view(f) for f in flats]
    jobs = _plan(headers, chunk)

    def run(job: tuple[int, int, int]) -> None:
        fi, off, n = job
        _pread_into(fds[fi], views[fi][off : off + n], headers[fi].data_start + off, headers[fi].path)

    # Fresh memory is faulted in during the read itself, so parallel readers also parallelise
    # the page faults (measured: ~1.5 GB/s with one thread vs ~2.7 GB/s with two on a 2-core VM).
    if readers <= 1 or len(jobs) <= 1:
        for job in jobs:
            run(job)
    else:
        with ThreadPoolExecutor(max_workers=min(readers, len(jobs)), thread_name_prefix="safetensors-read") as ex:
            for _ in ex.map(run, jobs):
                pass
    return flats


class _CudaStage:
    """Pinned staging, asynchronous copies on side streams, one event per staging buffer."""

    def __init__(self, device: torch.device, streams: int) -> None:
        self.device = device
        self.streams = [torch.cuda.Stream(device) for _ in range(max(1, streams))]
        self.in_flight = len(self.streams)
        self.next = 0

    def alloc_dest(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, device=self.device)

    def start(self) -> None:
        # The caching allocator may hand out memory whose previous owner's kernels are still
        # queued on the current stream; the side streams must not write before those finish.
        current = torch.cuda.current_stream(self.device)
        for s in self.streams:
            s.wait_stream(current)

    def alloc_staging(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def reader_init(self) -> None:
        torch.cuda.set_device(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, event: Any) -> None:
        s = self.streams[self.next % len(self.streams)]
        self.next += 1
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)
            event.record(s)

    def wait(self, event: Any) -> None:
        event.synchronize()  # releases the GIL; a no-op for an event never recorded

    def finish(self) -> None:
        for s in self.streams:
            s.synchronize()


class _SyncStage:
    """Same pipeline with synchronous copies: devices without CUDA streams (and the tests)."""

    in_flight = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def alloc_dest(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, device=self.device)

    def start(self) -> None:
        pass

    def alloc_staging(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8)

    def new_event(self) -> Any:
        return None

    def reader_init(self) -> None:
        pass

    def copy(self, dst: torch.Tensor, src: torch.Tensor, event: Any) -> None:
        dst.copy_(src)

    def wait(self, event: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def _read_staged(
    headers: Sequence[SafetensorsHeader], fds: Sequence[int], chunk: int, readers: int, stage: Any
) -> list[torch.Tensor]:
    flats = [stage.alloc_dest(h.data_len) for h in headers]
    jobs = _plan(headers, chunk)
    if not jobs:
        return flats
    stage.start()
    readers = min(readers, len(jobs))
    nbuf = min(readers + stage.in_flight, len(jobs))
    size = max(n for _, _, n in jobs)
    bufs = [stage.alloc_staging(size) for _ in range(nbuf)]
    views = [_byte_view(b) for b in bufs]
    events = [stage.new_event() for _ in range(nbuf)]

    free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    ready: queue.SimpleQueue[tuple[int, int] | BaseException] = queue.SimpleQueue()
    for b in range(nbuf):
        free.put(b)
    order = iter(range(len(jobs)))
    lock = threading.Lock()
    stop = threading.Event()

    def reader() -> None:
        try:
            stage.reader_init()
            while not stop.is_set():
                with lock:
                    j = next(order, None)
                if j is None:
                    return
                b = free.get()
                if b is None:
                    return
                stage.wait(events[b])  # the copy that last read buffer b has finished
                fi, off, n = jobs[j]
                _pread_into(fds[fi], views[b][:n], headers[fi].data_start + off, headers[fi].path)
                ready.put((j, b))
        except BaseException as exc:  # handed to the issuing thread, which re-raises it
            ready.put(exc)

    threads = [threading.Thread(target=reader, name=f"safetensors-read-{i}", daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    ok = False
    try:
        for _ in range(len(jobs)):
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            j, b = item
            fi, off, n = jobs[j]
            stage.copy(flats[fi][off : off + n], bufs[b][:n], events[b])
            free.put(b)  # after the event is recorded, so the next reader waits on this copy
        stage.finish()
        ok = True
    finally:
        stop.set()
        for _ in threads:
            free.put(None)
        for t in threads:
            t.join()
        if not ok:
            # Copies may still be writing into flats that are about to be freed (and reused).
            try:
                stage.finish()
            except Exception:
                pass
    return flats


# --- page cache helpers (cold measurements) ---------------------------------------------------


def page_cache_resident(path: str | os.PathLike[str]) -> float | None:
    """Fraction of the file's pages in the page cache (mincore), or None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        # A raw mapping that is never touched: mapping faults nothing in, so it does not
        # change what it measures.
        addr = libc.mmap(None, size, mmap_module.PROT_READ, mmap_module.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = (size + mmap_module.PAGESIZE - 1) // mmap_module.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return sum(v & 1 for v in bytes(vec)) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    except (OSError, AttributeError):
        return None
    finally:
        os.close(fd)


def drop_page_cache(path: str | os.PathLike[str], *, allow_global: bool = True) -> dict[str, Any]:
    """Evict one file from the page cache for a cold read; returns what was done and seen.

    fsync first (dirty pages cannot be dropped), then POSIX_FADV_DONTNEED, which needs no
    privileges. Pages still mapped by some process stay. Only if pages remain and we are root
    (and allow_global) does it fall back to `echo 1 > /proc/sys/vm/drop_caches`, which empties
    the whole host's page cache and is often refused inside containers.
    Keys: resident_before/resident_after (fractions or None), fadvise, drop_caches (bool),
    dropped (True/False, None when residency cannot be measured), error (str or None).
    """
    report: dict[str, Any] = {
        "resident_before": page_cache_resident(path),
        "fadvise": False,
        "drop_caches": False,
        "resident_after": None,
        "dropped": None,
        "error": None,
    }
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems refuse fsync on a read-only descriptor; nothing dirty then
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                report["fadvise"] = True
            except OSError as exc:
                report["error"] = f"posix_fadvise: {exc}"
    finally:
        os.close(fd)
    after = page_cache_resident(path)
    if allow_global and (after is None or after > 0.01) and hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            report["drop_caches"] = True
            after = page_cache_resident(path)
        except OSError as exc:
            report["error"] = f"drop_caches: {exc}"
    report["resident_after"] = after
    report["dropped"] = None if after is None else after <= 0.01
    return report
