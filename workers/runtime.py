"""GPU worker runtime: device choice and the in-memory LRU of loaded model versions.

CUDA is first touched here, in the process that runs jobs (a Celery prefork child, after
worker_process_init), never in a parent that will fork: a CUDA context does not survive fork.
The GPU set is pinned before any of that by `dreamq worker --gpus`, through CUDA_VISIBLE_DEVICES,
so device index 0 here is always "my GPU".
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.repository import LocalVersionCache

log = logging.getLogger(__name__)


def pick_device() -> "Any":
    """cuda when a GPU is visible, else mps (Apple), else cpu. DREAMQ_DEVICE overrides."""
    import os

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
        return {"free_bytes": int(free), "total_bytes": int(total), "allocated_bytes": int(torch.cuda.memory_allocated(device))}
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


class ModelRuntime:
    """Keeps up to `max_loaded` versions in memory, least recently used evicted first."""

    def __init__(self, cache: LocalVersionCache | None = None, max_loaded: int = 2):
        self.cache = cache or LocalVersionCache()
        self.max_loaded = max_loaded
        self._loaded: "collections.OrderedDict[str, LoadedModel]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._device = None
        self.loads = 0

    @property
    def device(self):
        if self._device is None:
            self._device = pick_device()
        return self._device

    def loaded_versions(self) -> list[str]:
        return [f"{m.name}@{m.number}" for m in self._loaded.values()]

    def get(self, name: str, number: int, digest: str) -> LoadedModel:
        with self._lock:
            hit = self._loaded.get(digest)
            if hit is not None:
                self._loaded.move_to_end(digest)
                return hit
            started = time.perf_counter()
            version_dir = self.cache.ensure(name, number, digest)
            manifest = json.loads((version_dir / "manifest.json").read_text())
            cls = _import_entrypoint(version_dir, manifest["model"]["entrypoint"], digest)
            model = cls.load(version_dir, self.device)
            package = sys.modules[cls.__module__.split(".")[0]]
            cancelled = getattr(package, "GenerationCancelled", None) or getattr(
                sys.modules[cls.__module__], "GenerationCancelled", RuntimeError
            )
            loaded = LoadedModel(name, number, digest, model, time.perf_counter() - started, cancelled)
            self._loaded[digest] = loaded
            self.loads += 1
            while len(self._loaded) > self.max_loaded:
                _, evicted = self._loaded.popitem(last=False)
                log.info("evicted model version", extra={"model": evicted.name, "version": evicted.number})
                del evicted
                self._release_device_memory()
            log.info(
                "loaded model version",
                extra={"model": name, "version": number, "digest": digest, "load_s": round(loaded.load_s, 3), "device": str(self.device)},
            )
            return loaded

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
