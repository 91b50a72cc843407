"""workers/loading.py: bit-exact against safetensors' own loader, whatever the chunking, the
reader count, the file split or the tensor alignment; corrupt files fail with a clear ValueError."""

from __future__ import annotations

import json
import math
import queue
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers import loading
from workers.loading import drop_page_cache, load_safetensors, read_header

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs, infinities, denormals included): any conversion shows."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    n = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def _checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    specs = {
        "f32.weight": ((33, 17), torch.float32),
        "f16.weight": ((64, 31), torch.float16),
        "bf16.weight": ((5, 7, 9), torch.bfloat16),
        "i64.index": ((123,), torch.int64),
        "u8.table": ((1001,), torch.uint8),
        "bool.mask": ((3, 333), torch.bool),
        "i32.ids": ((17,), torch.int32),
        "f64.scale": ((4, 4), torch.float64),
        "scalar.f32": ((), torch.float32),
        "scalar.i64": ((), torch.int64),
        "empty.bf16": ((0, 8), torch.bfloat16),
        "empty.f32": ((0,), torch.float32),
        "big.f32": ((50, 100), torch.float32),  # 20000 bytes: spans many small chunks
    }
    return {name: _random_bits(shape, dtype, gen) for name, (shape, dtype) in specs.items()}


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.is_contiguous(), name
        assert _bits(g) == _bits(w), name


@pytest.fixture
def staged_on_cpu(monkeypatch):
    """Route CPU loads through the staging pipeline (the CUDA path's queues, buffers and
    chunk bookkeeping) with synchronous copies, so it is tested without a GPU."""

    def staged(headers, fds, chunk, readers):
        return loading._read_staged(headers, fds, chunk, readers, loading._SyncStage(torch.device("cpu")))

    monkeypatch.setattr(loading, "_read_direct", staged)


@pytest.mark.parametrize("pipeline", ["direct", "staged"])
@pytest.mark.parametrize(
    ("chunk_mb", "readers"), [(64, None), (64, 1), (4099 / 2**20, 1), (4099 / 2**20, 3), (1 / 2**20, 2)]
)
def test_bit_exact_against_safetensors(tmp_path, request, pipeline, chunk_mb, readers):
    if pipeline == "staged":
        request.getfixturevalue("staged_on_cpu")
    tensors = _checkpoint()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    if chunk_mb == 1 / 2**20:
        # One byte per chunk: every multi-byte element straddles a chunk boundary.
        tensors = {k: v for k, v in tensors.items() if v.numel() * v.element_size() <= 2000}
        save_file(tensors, str(path))
    got = load_safetensors(path, "cpu", chunk_mb=chunk_mb, readers=readers)
    _assert_same(got, load_file(str(path)))
    _assert_same(got, tensors)


class _LaggingCopies(loading._SyncStage):
    """Copies run later on another thread, like DMA after a non_blocking copy_, and each event
    is set when its copy is done: a staging buffer refilled too early shows up as wrong bytes."""

    in_flight = 2

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.worker = threading.Thread(target=self._run, daemon=True)
        self.worker.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            dst, src, event = item
            time.sleep(0.0005)
            dst.copy_(src)
            event.set()

    def new_event(self) -> threading.Event:
        done = threading.Event()
        done.set()  # never recorded: nothing to wait for
        return done

    def copy(self, dst, src, event) -> None:
        event.clear()
        self.todo.put((dst, src, event))

    def wait(self, event) -> None:
        event.wait()

    def finish(self) -> None:
        self.todo.put(None)
        self.worker.join()


@pytest.mark.parametrize("readers", [1, 3])
def test_staging_buffers_are_not_refilled_before_their_copy_ran(tmp_path, monkeypatch, readers):
    def staged(headers, fds, chunk, n):
        return loading._read_staged(headers, fds, chunk, n, _LaggingCopies())

    monkeypatch.setattr(loading, "_read_direct", staged)
    tensors = _checkpoint(12)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    _assert_same(load_safetensors(path, "cpu", chunk_mb=3001 / 2**20, readers=readers), tensors)


def test_chunks_straddle_tensor_boundaries(tmp_path):
    tensors = _checkpoint(1)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    chunk = 4099
    spans = [e for e in header.tensors if e.begin // chunk != max(e.begin, e.end - 1) // chunk]
    assert spans, "the plan should put some tensor across a chunk boundary"
    assert any(e.end - e.begin > chunk for e in header.tensors), "some tensor should exceed one chunk"
    _assert_same(load_safetensors(path, "cpu", chunk_mb=chunk / 2**20, readers=2), tensors)


@pytest.mark.parametrize("pipeline", ["direct", "staged"])
def test_multiple_files(tmp_path, request, pipeline):
    if pipeline == "staged":
        request.getfixturevalue("staged_on_cpu")
    full = _checkpoint(2)
    names = sorted(full)
    shards = [names[0::3], names[1::3], names[2::3]]
    paths = []
    for i, shard in enumerate(shards):
        p = tmp_path / f"model-{i:05d}-of-00003.safetensors"
        save_file({k: full[k] for k in shard}, str(p))
        paths.append(p)
    got = load_safetensors(paths, "cpu", chunk_mb=8192 / 2**20, readers=3)
    _assert_same(got, full)
    # A file holding nothing at all is fine too.
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    assert load_safetensors([empty], "cpu") == {}
    _assert_same(load_safetensors([*paths, empty], "cpu"), full)


def test_same_name_in_two_files_is_refused(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2)}, str(a))
    save_file({"w": torch.ones(2)}, str(b))
    with pytest.raises(ValueError, match="'w' is in both"):
        load_safetensors([a, b], "cpu")


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * ((9 + len(raw)) % 2)  # trailing spaces are legal: make the data start odd
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("pipeline", ["direct", "staged"])
def test_misaligned_offsets_are_copied_not_viewed(tmp_path, request, pipeline):
    if pipeline == "staged":
        request.getfixturevalue("staged_on_cpu")
    gen = torch.Generator().manual_seed(3)
    b = torch.tensor([7], dtype=torch.uint8)
    f = _random_bits((3, 5), torch.float32, gen)
    h = _random_bits((9,), torch.bfloat16, gen)
    i = _random_bits((2,), torch.int64, gen)
    parts, header, off = [], {}, 0
    for name, t in (("byte", b), ("f32", f), ("bf16", h), ("i64", i)):
        raw = _bits(t)
        header[name] = {
            "dtype": {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [off, off + len(raw)],
        }
        parts.append(raw)
        off += len(raw)
    path = tmp_path / "odd.safetensors"
    _write_raw(path, header, b"".join(parts))  # odd data start and odd offsets
    assert read_header(path).data_start % 2 == 1
    want = {"byte": b, "f32": f, "bf16": h, "i64": i}
    for chunk_mb in (64, 7 / 2**20):
        got = load_safetensors(path, "cpu", chunk_mb=chunk_mb, readers=2)
        _assert_same(got, want)


def test_tensors_are_writable_independent_and_outlive_the_file(tmp_path):
    tensors = _checkpoint(4)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    got = load_safetensors(path, "cpu")
    path.unlink()  # nothing refers to the file any more
    got["f32.weight"].fill_(1.5)
    got["scalar.i64"].fill_(-1)
    assert torch.all(got["f32.weight"] == 1.5)
    assert got["scalar.i64"].item() == -1
    rest = {k: v for k, v in tensors.items() if k not in ("f32.weight", "scalar.i64")}
    _assert_same({k: got[k] for k in rest}, rest)
    # Tensors of one file share one buffer (documented lifetime): same storage, disjoint bytes.
    storages = {got[k].untyped_storage().data_ptr() for k in rest if got[k].numel()}
    assert len(storages) == 1


def test_mmap_is_bit_exact_copy_on_write_and_cpu_only(tmp_path):
    tensors = _checkpoint(10)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    got = load_safetensors(path, "cpu", mmap=True)
    _assert_same(got, tensors)
    got["f32.weight"].fill_(2.0)  # private mapping: the file must not change
    assert path.read_bytes() == before
    odd = tmp_path / "odd.safetensors"
    f = _random_bits((10,), torch.float32, torch.Generator().manual_seed(11))
    _write_raw(
        odd,
        {
            "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "f": {"dtype": "F32", "shape": [10], "data_offsets": [1, 41]},
        },
        b"\x09" + _bits(f),
    )
    _assert_same(load_safetensors(odd, "cpu", mmap=True), {"b": torch.tensor([9], dtype=torch.uint8), "f": f})
    empty = tmp_path / "empty.safetensors"
    save_file({"e": torch.empty(0)}, str(empty))
    _assert_same(load_safetensors(empty, "cpu", mmap=True), {"e": torch.empty(0)})
    with pytest.raises(ValueError, match="only makes sense for the cpu"):
        load_safetensors(path, "meta", mmap=True)


CORRUPT = [
    (b"\x01\x02\x03", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 2**40) + b"{}", "exceeds the"),
    (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
    (struct.pack("<Q", 4) + b"{x:1", "not UTF-8 JSON"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "not UTF-8 JSON"),
    (struct.pack("<Q", 2) + b"[]", "expected a JSON object"),
]


def _header_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


CORRUPT += [
    (
        _header_bytes({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "unsupported dtype 'F99'",
    ),
    (_header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8"),
    (_header_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated file"),
    (_header_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape must be"),
    (_header_bytes({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4), "shape must be"),
    (_header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "begin <= end"),
    (_header_bytes({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "data_offsets must be"),
    (_header_bytes({"w": [1, 2]}, b""), "entry is not an object"),
    (_header_bytes({"__metadata__": {"a": 1}}, b""), "__metadata__"),
    (
        _header_bytes(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        "overlap",
    ),
]


@pytest.mark.parametrize(("content", "message"), CORRUPT, ids=[m for _, m in CORRUPT])
def test_corrupt_header_raises_clear_value_error(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_safetensors(path, "cpu")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("pipeline", ["direct", "staged"])
def test_reader_failure_propagates_and_threads_stop(tmp_path, request, monkeypatch, pipeline):
    if pipeline == "staged":
        request.getfixturevalue("staged_on_cpu")
    tensors = _checkpoint(5)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    real = loading._pread_into
    calls = iter(range(10**6))

    def flaky(fd, view, offset, p):
        if next(calls) == 4:
            raise OSError(5, "Input/output error")
        return real(fd, view, offset, p)

    monkeypatch.setattr(loading, "_pread_into", flaky)
    before = threading.active_count()
    with pytest.raises(OSError, match="Input/output error"):
        load_safetensors(path, "cpu", chunk_mb=1024 / 2**20, readers=3)
    assert threading.active_count() == before


def test_file_truncated_after_the_header_was_read(tmp_path, monkeypatch):
    tensors = _checkpoint(6)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    real = loading._read_header_fd

    def then_truncate(fd, p):
        h = real(fd, p)
        with open(p, "r+b") as f:
            f.truncate(h.data_start + 100)
        return h

    monkeypatch.setattr(loading, "_read_header_fd", then_truncate)
    with pytest.raises(ValueError, match="unexpected end of file"):
        load_safetensors(path, "cpu")


def test_drop_page_cache_reports_what_it_did(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_checkpoint(7), str(path))
    load_safetensors(path, "cpu")
    # allow_global=False: a test must never empty the whole host's page cache.
    report = drop_page_cache(path, allow_global=False)
    assert set(report) >= {"resident_before", "resident_after", "fadvise", "drop_caches", "dropped", "error"}
    assert report["drop_caches"] is False
    if report["resident_after"] is not None and report["fadvise"]:
        # Our load keeps no mapping of the file, so nothing pins its pages (tmpfs cannot drop).
        assert report["dropped"] or report["resident_after"] > 0.99


@CUDA
@pytest.mark.parametrize(
    ("chunk_mb", "streams", "readers"), [(64, 2, None), (4099 / 2**20, 1, 1), (4099 / 2**20, 3, 4)]
)
def test_cuda_bit_exact(tmp_path, chunk_mb, streams, readers):
    tensors = _checkpoint(8)
    names = sorted(tensors)
    paths = []
    for i, shard in enumerate((names[::2], names[1::2])):
        p = tmp_path / f"s{i}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(p))
        paths.append(p)
    got = load_safetensors(paths, "cuda", chunk_mb=chunk_mb, streams=streams, readers=readers)
    assert all(t.device.type == "cuda" for t in got.values())
    want = {}
    for p in paths:
        want.update(load_file(str(p), device="cuda"))
    _assert_same(got, want)
    _assert_same(got, tensors)


@CUDA
def test_cuda_misaligned_and_reuse_after_free(tmp_path):
    gen = torch.Generator().manual_seed(9)
    f = _random_bits((1000,), torch.float32, gen)
    header = {
        "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [1000], "data_offsets": [1, 4001]},
    }
    path = tmp_path / "odd.safetensors"
    _write_raw(path, header, b"\x05" + _bits(f))
    for _ in range(3):
        # Memory freed by queued kernels on the current stream gets reused by the next load.
        junk = torch.full((1 << 20,), 7.0, device="cuda")
        junk.mul_(3)
        del junk
        got = load_safetensors(path, "cuda:0", chunk_mb=1000 / 2**20, readers=2)
        _assert_same(got, {"b": torch.tensor([5], dtype=torch.uint8), "f": f})
