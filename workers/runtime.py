"""GPU worker runtime: device choice and the in-memory LRU of loaded model versions.

CUDA is first touched here, in the process that runs jobs (a Celery prefork child, after
worker_process_init), never in a parent that will fork: a CUDA context does not survive fork.
The GPU set is pinned before any of that by `dreamq worker --gpus`, through CUDA_VISIBLE_DEVICES,
so device index 0 here is always "my GPU".
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from app.observability.metrics import count_eviction, observe_model_load
from workers import environments
from workers.cache import ModelCache

log = logging.getLogger(__name__)


def pick_device() -> "Any":
    """cuda when a GPU is visible, else mps (Apple), else cpu. DREAMQ_DEVICE overrides."""
    import torch

    forced = os.environ.get("DREAMQ_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_memory(device) -> dict[str, int]:
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {
            "free_bytes": int(free),
            "total_bytes": int(total),
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
        }
    return {}


def _import_entrypoint(version_dir: Path, entrypoint: str, digest: str):
    """Import the version's own code under a module name unique to its digest.

    Two versions of one model usually share a package name; importing both under that name
    would make the second silently reuse the first's modules. A per-digest name keeps them apart
    in one process.
    """
    module_path, _, attr = entrypoint.partition(":")
    top, _, rest = module_path.partition(".")
    unique = f"dreamq_model_{digest.split(':')[-1][:16]}_{top}"
    package_dir = version_dir / "code" / top
    if unique not in sys.modules:
        init = package_dir / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location(unique, init, submodule_search_locations=[str(package_dir)])
        else:
            spec = importlib.util.spec_from_file_location(unique, version_dir / "code" / f"{top}.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {top} from {version_dir / 'code'}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
    module = importlib.import_module(f"{unique}.{rest}") if rest else sys.modules[unique]
    return getattr(module, attr)


@dataclass
class LoadedModel:
    name: str
    number: int
    digest: str
    model: Any
    load_s: float
    cancelled_exc: type[BaseException]
    # Bytes of weights: what this version costs in (device) memory, for the runtime's budget.
    weight_bytes: int = 0
    # Keeps the version's files in the host cache while it is loaded (another worker's download
    # must not evict the files of a model this process may re-read or run from).
    pin: Any = None
    # Jobs running on it right now; a version in use is never evicted.
    in_use: int = 0


def _weights_bytes(version_dir: Path) -> int:
    return sum(p.stat().st_size for p in (version_dir / "weights").glob("*") if p.is_file())


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class ModelRuntime:
    """The versions this worker holds in memory: an LRU bounded by count and by memory.

    A new version is loaded on demand (each job names its exact version, so a promote or a
    rollback is picked up by the next job, without a restart). To make room the least recently
    used versions are released, never one a job is running on: with one job per worker process
    the old version is only released once the job that uses it has ended. The memory bound is
    the device's free memory on CUDA (weights x LOAD_HEADROOM must fit) and
    DREAMQ_LOADED_MODELS_MAX_BYTES elsewhere.
    """

    # Activations and the CUDA context need room beyond the weights themselves.
    LOAD_HEADROOM = 1.5

    def __init__(self, cache: ModelCache | None = None, max_loaded: int | None = None, max_bytes: int | None = None):
        self.cache = cache or ModelCache()
        self.max_loaded = max_loaded or int(os.environ.get("DREAMQ_MAX_LOADED_MODELS", "2"))
        self.max_bytes = max_bytes or int(os.environ.get("DREAMQ_LOADED_MODELS_MAX_BYTES", str(8 * 1024**3)))
        self._loaded: "collections.OrderedDict[str, LoadedModel]" = collections.OrderedDict()
        self._lock = threading.RLock()
        self._device = None
        self.loads = 0
        self.evictions = 0

    @property
    def device(self):
        if self._device is None:
            self._device = pick_device()
        return self._device

    def loaded_versions(self) -> list[str]:
        return [f"{m.name}@{m.number}" for m in self._loaded.values()]

    def loaded_digests(self) -> list[str]:
        return list(self._loaded)

    @contextlib.contextmanager
    def using(self, name: str, number: int, digest: str) -> Iterator[LoadedModel]:
        """The loaded version, marked in use for the duration (so it is never evicted under a job)."""
        loaded = self.get(name, number, digest)
        with self._lock:
            loaded.in_use += 1
        try:
            yield loaded
        finally:
            with self._lock:
                loaded.in_use -= 1

    def get(self, name: str, number: int, digest: str) -> LoadedModel:
        with self._lock:
            hit = self._loaded.get(digest)
            if hit is not None:
                self._loaded.move_to_end(digest)
                return hit
            started = time.perf_counter()
            pin = self.cache.pin(digest)
            try:
                version_dir = self.cache.ensure(name, number, digest)
                manifest = json.loads((version_dir / "manifest.json").read_text())
                # In this process when the worker's environment satisfies the version's lock;
                # else in a child on a venv built from the bundle's wheels; else
                # ModelEnvironmentError naming the missing requirement (workers/environments.py).
                # Decided before making room, so a version that cannot run evicts nothing.
                plan = environments.plan_for(manifest, version_dir)
                weight_bytes = _weights_bytes(version_dir)
                self._make_room(weight_bytes)
                model, cancelled = self._load(version_dir, manifest, plan, digest)
            except BaseException:
                pin.release()
                raise
            loaded = LoadedModel(
                name,
                number,
                digest,
                model,
                time.perf_counter() - started,
                cancelled,
                weight_bytes=weight_bytes,
                pin=pin,
            )
            self._loaded[digest] = loaded
            self.loads += 1
            observe_model_load(name, loaded.load_s)
            log.info(
                "loaded model version",
                extra={
                    "model": name,
                    "version": number,
                    "digest": digest,
                    "load_s": round(loaded.load_s, 3),
                    "device": str(self.device),
                    "weight_bytes": weight_bytes,
                    "resident": self.loaded_versions(),
                },
            )
            return loaded

    def _load(self, version_dir: Path, manifest: dict, plan, digest: str) -> tuple[Any, type[BaseException]]:
        if not plan.in_process:
            model = environments.start_model_process(plan, version_dir, manifest, self.device)
            return model, model.cancelled_exc
        cls = _import_entrypoint(version_dir, manifest["model"]["entrypoint"], digest)
        if _accepts(cls.load, "load_weights"):
            # The staged, overlapped loader (workers/loading.py) for models that take it; imported
            # here because it imports torch, which a worker whose models run in their own venv
            # never needs in this process.
            from workers.loading import load_safetensors

            model = cls.load(version_dir, self.device, load_weights=load_safetensors)
        else:
            model = cls.load(version_dir, self.device)
        package = sys.modules[cls.__module__.split(".")[0]]
        cancelled = getattr(package, "GenerationCancelled", None) or getattr(
            sys.modules[cls.__module__], "GenerationCancelled", RuntimeError
        )
        return model, cancelled  # type: ignore[return-value]  # found by name: an exception class

    def _budget_ok(self, incoming: int) -> bool:
        if len(self._loaded) + 1 > self.max_loaded:
            return False
        if self.device.type == "cuda":
            import torch

            free, _total = torch.cuda.mem_get_info(self.device)
            return free >= incoming * self.LOAD_HEADROOM
        return sum(m.weight_bytes for m in self._loaded.values()) + incoming <= self.max_bytes

    def _make_room(self, incoming: int) -> None:
        while self._loaded and not self._budget_ok(incoming):
            victim = next((d for d, m in self._loaded.items() if m.in_use == 0), None)
            if victim is None:
                break  # everything loaded is running a job: load anyway rather than fail the job
            self._evict(victim)

    def _evict(self, digest: str) -> None:
        evicted = self._loaded.pop(digest)
        log.info("evicted model version", extra={"model": evicted.name, "version": evicted.number})
        count_eviction(evicted.name)
        if callable(getattr(evicted.model, "close", None)):  # a model in its own process: stop it
            evicted.model.close()
        if evicted.pin is not None:
            evicted.pin.release()
        self.evictions += 1
        del evicted
        self._release_device_memory()

    def _release_device_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


_runtime: ModelRuntime | None = None


def get_runtime() -> ModelRuntime:
    global _runtime
    if _runtime is None:
        _runtime = ModelRuntime()
    return _runtime
