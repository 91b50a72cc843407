"""Per-host model cache: content-addressed blobs, verified downloads, LRU bound, pins.

Layout under `root` (one filesystem, so every rename below is atomic and links work):

    blobs/sha256/<hex>              one read-only copy of each file, named by its sha256
    versions/sha256-<hex>/          a version's view: hard links to blobs + manifest.json
    manifests/sha256-<hex>.json     registration: the manifest's exact bytes; mtime = last use
    inuse/sha256-<hex>              pin file: a shared flock per pin
    locks/space.lock                plan, evict, register, delete blobs: one process at a time
    locks/versions/sha256-<hex>.lock, locks/blobs/<hex>.lock, locks/stats.lock
    tmp/                            downloads and staging views before their rename
    stats.json                      host-wide counters (downloads, hits, evictions)

Why blobs and views: versions of one model mostly share files (weights rarely change when only
code does); naming a file by its sha256 downloads it once per host, and links make each version
an ordinary directory the runtime imports from. A blob is downloaded to tmp/, hashed, fsynced,
made read-only and only then renamed into place, so a blob that exists is complete and verified.
A view is staged in tmp/ with manifest.json written last and renamed into versions/; it counts as
complete only while its registration exists too, so a view left by an older cache layout or a
crash between the two steps is rebuilt instead of trusted.

Locking protocol, always taken in this order (eviction never waits on a pin, so no cycle):
  1. pin (inuse/<d>, flock LOCK_SH): held by `ensure` for its whole run and by callers through
     `use`/`pin` while they read the files. flock dies with its process, so a worker killed with
     -9 leaves no pin behind. Eviction takes LOCK_EX|LOCK_NB and skips a version it cannot get.
  2. version lock: one process builds a view; the others wait and then find it complete.
  3. space lock (short): compute usage, evict least recently used unpinned versions, write the
     registration (which reserves the version's bytes before any download), delete blobs that no
     registered version references. Registration under this lock is what keeps the deletion from
     racing a download: every blob being downloaded belongs to a registered, pinned version.
  4. blob lock: one process downloads a given blob; the second waits and then finds it present.
     Never held together with the space lock.
  5. stats lock: leaf.

Usage is the sum of the sizes of the distinct blobs referenced by registered versions (bytes on
disk can only be lower: some are still downloading). A view copied because hard links failed
is not counted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from botocore.exceptions import ClientError
from filelock import FileLock

from app.core.config import get_settings
from app.core.storage import TRANSFER, s3_client
from workers.repository import (
    MANIFEST,
    IntegrityError,
    RepositoryError,
    fetch_manifest_bytes,
    version_prefix,
)

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_KEY = re.compile(r"^sha256-[0-9a-f]{64}$")
_CHUNK = 1024 * 1024
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
# Small files dominate a version's file count (code); a few in flight hide per-request latency.
# Large ones are already split into concurrent parts by the transfer manager.
_PARALLEL_FILES = 4
_COUNTERS = ("downloads", "download_bytes", "hits", "misses", "evictions", "blobs_deleted")


class CacheFull(RepositoryError):
    """The version does not fit in the cache even after evicting every version not in use."""


def _key(digest: str) -> str:
    match = _DIGEST.match(digest)
    if match is None:
        # The digest names directories: anything but sha256:<hex> could escape the cache root.
        raise RepositoryError(f"not a version digest: {digest!r} (expected sha256:<64 hex>)")
    return "sha256-" + match.group(1)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _entries(name: str, number: int, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's files, refusing any entry that could write outside the view or the blobs."""
    seen: set[str] = set()
    entries = []
    for entry in manifest.get("files", []):
        rel, sha, size = entry.get("path"), entry.get("sha256"), entry.get("size")
        pure = PurePosixPath(rel) if isinstance(rel, str) else None
        if (
            pure is None
            or pure.is_absolute()
            or ".." in pure.parts
            or "\\" in rel
            or rel in seen
            or rel == MANIFEST
            or not pure.parts
        ):
            raise IntegrityError(f"{name} v{number}: manifest path {rel!r} is not a safe relative path")
        if not isinstance(sha, str) or not _HEX.match(sha) or not isinstance(size, int) or size < 0:
            raise IntegrityError(f"{name} v{number}: manifest entry {rel} has a malformed sha256 or size")
        seen.add(rel)
        entries.append({"path": pure.as_posix(), "sha256": sha, "size": size})
    return entries


class Pin:
    """One process's claim that a version is in use; release it, or use it as a context manager."""

    def __init__(self, cache: "ModelCache", key: str, fd: int):
        self._cache = cache
        self.key = key
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Released means it was just used: the most honest recency for LRU.
        self._cache._touch(self.key)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None
        self._cache._forget_pin(self)

    def __enter__(self) -> "Pin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelCache:
    """Verified local copies of model versions, shared by every worker process of one host."""

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None, *, lock_timeout_s: float = 3600.0):
        settings = get_settings()
        self.root = Path(root) if root is not None else Path(settings.cache_dir)
        self.max_bytes = int(settings.model_cache_max_bytes if max_bytes is None else max_bytes)
        self.lock_timeout_s = lock_timeout_s
        self.blobs = self.root / "blobs" / "sha256"
        self.versions = self.root / "versions"
        self.manifests = self.root / "manifests"
        self.inuse = self.root / "inuse"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        for path in (
            self.blobs,
            self.versions,
            self.manifests,
            self.inuse,
            self.tmp,
            self.locks / "versions",
            self.locks / "blobs",
        ):
            path.mkdir(parents=True, exist_ok=True)
        self._pins: dict[str, list[Pin]] = {}
        self._pins_lock = threading.Lock()

    # -- paths ---------------------------------------------------------------------------------

    def path_for(self, digest: str) -> Path:
        return self.versions / _key(digest)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def _registration(self, key: str) -> Path:
        return self.manifests / f"{key}.json"

    def _complete(self, key: str) -> bool:
        return (self.versions / key / MANIFEST).is_file() and self._registration(key).is_file()

    def _touch(self, key: str) -> None:
        # Explicit nanoseconds: the filesystem's own timestamps are only jiffy-grained, which
        # could order two uses in quick succession arbitrarily.
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._registration(key), ns=(now, now))

    # -- pins ----------------------------------------------------------------------------------

    def pin(self, digest: str) -> Pin:
        """Mark `digest` in use by this process until `release()` (or `unpin`, or process exit)."""
        key = _key(digest)
        path = self.inuse / key
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                # Blocks only while an eviction of this very version holds it exclusively.
                fcntl.flock(fd, fcntl.LOCK_SH)
                held = os.fstat(fd)
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
            except BaseException:
                os.close(fd)
                raise
            # An evicter unlinks the pin file while holding it: a pin on that old inode would
            # protect nothing, so start over on the file now at the path.
            if current is not None and (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev):
                break
            os.close(fd)
        pin = Pin(self, key, fd)
        with self._pins_lock:
            self._pins.setdefault(key, []).append(pin)
        return pin

    def unpin(self, digest: str) -> None:
        """Release the most recent pin this process took on `digest`."""
        with self._pins_lock:
            pins = self._pins.get(_key(digest))
            pin = pins[-1] if pins else None
        if pin is None:
            raise RepositoryError(f"{digest} is not pinned by this process")
        pin.release()

    def _forget_pin(self, pin: Pin) -> None:
        with self._pins_lock:
            pins = self._pins.get(pin.key, [])
            if pin in pins:
                pins.remove(pin)
            if not pins:
                self._pins.pop(pin.key, None)

    @contextlib.contextmanager
    def use(self, digest: str) -> Iterator[Path]:
        """`with cache.use(digest): path = cache.ensure(...)`: no eviction while inside."""
        pin = self.pin(digest)
        try:
            yield self.path_for(digest)
        finally:
            pin.release()

    # -- ensure --------------------------------------------------------------------------------

    def ensure(self, name: str, number: int, digest: str, progress: Callable[[int], None] | None = None) -> Path:
        """The directory of a complete, verified copy of the version, downloading what is missing.

        `progress` receives byte counts as they arrive (from the transfer manager's threads,
        serialised here).
        """
        key = _key(digest)
        view = self.versions / key
        with self.pin(digest):
            if self._complete(key):
                self._touch(key)
                self._count(hits=1)
                return view
            with FileLock(str(self.locks / "versions" / f"{key}.lock"), timeout=self.lock_timeout_s):
                if self._complete(key):
                    self._touch(key)
                    self._count(hits=1)
                    return view
                self._build(name, number, digest, key, progress)
                self._count(misses=1)
        return view

    def missing_bytes(self, name: str, number: int, digest: str) -> int:
        """Bytes `ensure` would download now (for a progress bar's length)."""
        if self._complete(_key(digest)):
            return 0
        manifest = json.loads(fetch_manifest_bytes(name, number, digest))
        blobs = {e["sha256"]: e["size"] for e in _entries(name, number, manifest)}
        return sum(size for sha, size in blobs.items() if not self.blob_path(sha).exists())

    def _build(self, name: str, number: int, digest: str, key: str, progress: Callable[[int], None] | None) -> None:
        manifest_bytes = fetch_manifest_bytes(name, number, digest)
        entries = _entries(name, number, json.loads(manifest_bytes))
        # We hold this version's lock: anything staged for it is a dead builder's leftover.
        for stale in self.tmp.glob(f"view-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if (self.versions / key).exists():
            # Not complete (we checked), so unregistered: a view of the older per-digest layout or
            # one whose registration was rolled back. Nobody can be using it; it blocks the rename.
            self._discard(self.versions / key)
        with self._space_lock():
            self._reserve(name, number, key, manifest_bytes, entries)
        staging = self.tmp / f"view-{key}-{uuid.uuid4().hex[:8]}"
        try:
            self._download_blobs(name, number, entries, progress)
            for entry in entries:
                target = staging / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blob_path(entry["sha256"]), target)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        raise
                    # Filesystems without hard links (some network mounts): a copy still works,
                    # it just costs the space twice.
                    shutil.copyfile(self.blob_path(entry["sha256"]), target)
                    os.chmod(target, _READ_ONLY)
            # manifest.json last: a view that has one has every file.
            self._write_file(staging / MANIFEST, manifest_bytes)
            _fsync_dir(staging)
            os.replace(staging, self.versions / key)
            _fsync_dir(self.versions)
            self._touch(key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            # Give back the reservation and whatever blobs only this version wanted, so a failed
            # download leaves the cache as it found it.
            with self._space_lock():
                _unlink(self._registration(key))
                self._collect(self._registered())
            raise
        log.info("model version cached", extra={"model": name, "version": number, "digest": digest})

    # -- space: reserve, evict, collect --------------------------------------------------------

    @contextlib.contextmanager
    def _space_lock(self) -> Iterator[None]:
        with FileLock(str(self.locks / "space.lock"), timeout=self.lock_timeout_s):
            yield

    def _registered(self) -> dict[str, dict[str, int]]:
        """Registered versions -> {sha256: size} of their blobs (under the space lock)."""
        known: dict[str, dict[str, int]] = {}
        for path in self.manifests.iterdir():
            if path.name.startswith("."):
                _unlink(path)  # a registration write interrupted (they happen under this lock)
                continue
            try:
                files = json.loads(path.read_bytes())["files"]
                known[path.stem] = {f["sha256"]: int(f["size"]) for f in files}
            except (ValueError, KeyError, TypeError, OSError):
                _unlink(path)  # unreadable: treat as never registered, so its blobs can go
        return known

    def _reserve(self, name: str, number: int, key: str, manifest_bytes: bytes, entries: list[dict[str, Any]]) -> None:
        mine = {e["sha256"]: e["size"] for e in entries}
        need = sum(mine.values())
        if need > self.max_bytes:
            raise CacheFull(
                f"{name} v{number} needs {need} bytes but the model cache {self.root} holds at most "
                f"{self.max_bytes} (raise DREAMQ_MODEL_CACHE_MAX_BYTES)"
            )
        known = self._registered()
        if known.pop(key, None) is not None:
            _unlink(self._registration(key))  # a dead builder's: rewritten below if the version fits

        def usage() -> int:
            blobs = dict(mine)
            for files in known.values():
                blobs.update(files)
            return sum(blobs.values())

        evicted = []
        pinned = []
        try:
            if usage() > self.max_bytes:
                for other in sorted(known, key=self._last_used):
                    if usage() <= self.max_bytes:
                        break
                    if self._evict(other):
                        del known[other]
                        evicted.append(other)
                    else:
                        pinned.append(other)
            if usage() > self.max_bytes:
                raise CacheFull(
                    f"{name} v{number} does not fit in the model cache {self.root}: with it the cache would hold "
                    f"{usage()} of at most {self.max_bytes} bytes, and the versions that would have to go are in use "
                    f"({', '.join(pinned) or 'none'})"
                )
            self._write_file(self._registration(key), manifest_bytes, read_only=False)
            self._touch(key)
            known[key] = mine
        finally:
            # Also after CacheFull: what was evicted is gone either way.
            self._collect(known)
        if evicted:
            log.info("evicted model versions", extra={"digests": evicted, "for": f"{name} v{number}"})

    def _last_used(self, key: str) -> int:
        try:
            return self._registration(key).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _discard(self, path: Path) -> None:
        # Out of versions/ in one step, so no reader ever sees half a view.
        doomed = self.tmp / f"evict-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _evict(self, key: str, *, count: bool = True) -> bool:
        """Remove one version's view and registration unless someone pins it (space lock held)."""
        path = self.inuse / key
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    return False
                raise
            if (self.versions / key).exists():
                self._discard(self.versions / key)
            _unlink(self._registration(key))
            # No pin exists, so no builder holds the version lock: both files can go. A pinner
            # waiting on this inode notices it was unlinked and retries (see pin()).
            _unlink(self.locks / "versions" / f"{key}.lock")
            _unlink(path)
        finally:
            os.close(fd)
        if count:
            self._count(evictions=1)
        return True

    def _collect(self, known: dict[str, dict[str, int]]) -> None:
        """Delete what no registered version needs (space lock held)."""
        referenced: set[str] = set()
        for files in known.values():
            referenced.update(files)
        deleted = 0
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                _unlink(blob)
                # Only a builder of a registered version takes a blob's lock: none can hold this one.
                _unlink(self.locks / "blobs" / f"{blob.name}.lock")
                deleted += 1
        for entry in self.tmp.iterdir():
            name = entry.name
            owner = name.split("-", 1)[1].rsplit("-", 1)[0] if "-" in name else ""
            if (
                name.startswith("evict-")
                or (name.startswith("blob-") and owner.split(".")[0] not in referenced)
                or (name.startswith("view-") and owner not in known)
            ):
                # Unregistered: no live builder (they register first), so these are leftovers.
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    _unlink(entry)
        for entry in self.versions.iterdir():
            if entry.name in known:
                continue
            if _KEY.match(entry.name):
                self._evict(entry.name, count=False)  # a view of the older layout; unless pinned
            else:
                shutil.rmtree(entry, ignore_errors=True)  # the older layout's .partial-* staging
        for entry in self.inuse.iterdir():
            if entry.name not in known and _KEY.match(entry.name):
                self._evict(entry.name, count=False)  # drops the lock files, if nobody holds them
        if deleted:
            self._count(blobs_deleted=deleted)

    # -- downloads -----------------------------------------------------------------------------

    def _download_blobs(
        self, name: str, number: int, entries: list[dict[str, Any]], progress: Callable[[int], None] | None
    ) -> None:
        first_entry: dict[str, dict[str, Any]] = {}
        for entry in entries:
            first_entry.setdefault(entry["sha256"], entry)
        wanted = [e for sha, e in first_entry.items() if not self.blob_path(sha).exists()]
        if not wanted:
            return
        callback = None
        if progress is not None:
            progress_lock = threading.Lock()

            def callback(n: int) -> None:
                with progress_lock:
                    progress(n)

        if len(wanted) == 1:
            self._download_blob(name, number, wanted[0], callback)
            return
        pool = ThreadPoolExecutor(max_workers=min(_PARALLEL_FILES, len(wanted)), thread_name_prefix="model-cache")
        try:
            futures = [pool.submit(self._download_blob, name, number, e, callback) for e in wanted]
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            # One bad file fails the version: skip the queued ones, but let running ones finish,
            # so none is still writing when the caller cleans up.
            pool.shutdown(wait=True, cancel_futures=True)
        failures = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if failures:
            integrity = [e for e in failures if isinstance(e, IntegrityError)]
            raise (integrity or failures)[0]  # type: ignore[misc]  # failures holds no None

    def _download_blob(
        self, name: str, number: int, entry: dict[str, Any], callback: Callable[[int], None] | None
    ) -> None:
        sha = entry["sha256"]
        final = self.blob_path(sha)
        if final.exists():
            return
        with FileLock(str(self.locks / "blobs" / f"{sha}.lock"), timeout=self.lock_timeout_s):
            if final.exists():
                return  # another worker fetched it while we waited
            for stale in self.tmp.glob(f"blob-{sha}-*"):
                _unlink(stale)  # a dead downloader's; we hold the lock, so nobody else's
            partial = self.tmp / f"blob-{sha}-{uuid.uuid4().hex[:8]}"
            try:
                self._fetch(name, number, entry, partial, callback)
                actual, size = self._hash(partial)
                if actual != sha or size != entry["size"]:
                    raise IntegrityError(
                        f"{name} v{number}: {entry['path']} has sha256 {actual} ({size} bytes), manifest says "
                        f"{sha} ({entry['size']} bytes) (refusing to load a corrupted or tampered version)"
                    )
                with open(partial, "rb") as handle:
                    os.fsync(handle.fileno())
                os.chmod(partial, _READ_ONLY)
                os.replace(partial, final)
                _fsync_dir(self.blobs)
            except BaseException:
                _unlink(partial)
                raise
        log.info(
            "downloaded model file", extra={"model": name, "version": number, "path": entry["path"], "bytes": size}
        )

    def _fetch(
        self, name: str, number: int, entry: dict[str, Any], target: Path, callback: Callable[[int], None] | None
    ) -> None:
        key = version_prefix(name, number) + entry["path"]
        self._count(downloads=1, download_bytes=entry["size"])
        try:
            # The transfer manager splits large files into ranged GETs run concurrently (TRANSFER).
            s3_client().download_file(
                get_settings().models_bucket, key, str(target), Config=TRANSFER, Callback=callback
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise IntegrityError(
                    f"{name} v{number}: {entry['path']} is listed in the manifest but missing from storage"
                ) from None
            raise

    @staticmethod
    def _hash(path: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def _write_file(self, path: Path, data: bytes, *, read_only: bool = True) -> None:
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if read_only:
                os.chmod(partial, _READ_ONLY)
            os.replace(partial, path)
        except BaseException:
            _unlink(partial)
            raise

    # -- stats ---------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        # Persisted, because the interesting numbers are per host (several worker processes).
        path = self.root / "stats.json"
        with FileLock(str(self.locks / "stats.lock"), timeout=60):
            try:
                counters = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                counters = {}
            for name, delta in deltas.items():
                counters[name] = counters.get(name, 0) + delta
            partial = path.with_name(f".stats.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            partial.write_text(json.dumps(counters))
            os.replace(partial, path)

    def stats(self) -> dict[str, int]:
        """What is on disk now plus host-wide counters since the cache was created."""
        try:
            counters = json.loads((self.root / "stats.json").read_text())
        except (FileNotFoundError, ValueError):
            counters = {}
        sizes = []
        for blob in self.blobs.iterdir():
            with contextlib.suppress(FileNotFoundError):
                sizes.append(blob.stat().st_size)
        versions = sum(1 for entry in self.versions.iterdir() if self._complete(entry.name))
        return {
            "bytes": sum(sizes),
            "max_bytes": self.max_bytes,
            "blobs": len(sizes),
            "versions": versions,
            **{name: int(counters.get(name, 0)) for name in _COUNTERS},
        }
