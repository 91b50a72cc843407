"""The worker's in-memory LRU of loaded versions: bounded by memory, never evicting one in use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from workers.runtime import ModelRuntime

TINY = Path(__file__).resolve().parents[2] / "fixtures" / "bundles" / "tiny"


class DirCache:
    """Version directories already on disk (the S3-backed cache is tested on its own)."""

    def __init__(self, versions: dict[str, Path]):
        self.versions = versions
        self.pins: dict[str, int] = {}

    def ensure(self, name, number, digest):
        return self.versions[digest]

    def pin(self, digest):
        self.pins[digest] = self.pins.get(digest, 0) + 1
        cache = self

        class Pin:
            def release(self):
                cache.pins[digest] -= 1

        return Pin()


@pytest.fixture()
def versions(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMQ_DEVICE", "cpu")
    out = {}
    for index in range(3):
        target = tmp_path / f"v{index}"
        shutil.copytree(TINY, target)
        manifest = {"model": json.loads((TINY / "model.json").read_text()), "environment": {}}
        (target / "manifest.json").write_text(json.dumps(manifest))
        out[f"sha256:{index:064d}"] = target
    return out


def test_memory_budget_evicts_least_recently_used_and_releases_its_pin(versions):
    digests = list(versions)
    cache = DirCache(versions)
    # Room for two copies of the tiny weights (176 bytes each), not three.
    runtime = ModelRuntime(cache=cache, max_loaded=10, max_bytes=400)
    runtime.get("tiny", 1, digests[0])
    runtime.get("tiny", 2, digests[1])
    runtime.get("tiny", 1, digests[0])  # touch v1: v2 is now the least recently used
    runtime.get("tiny", 3, digests[2])
    assert runtime.loaded_digests() == [digests[0], digests[2]]
    assert cache.pins == {digests[0]: 1, digests[1]: 0, digests[2]: 1}
    assert (runtime.loads, runtime.evictions) == (3, 1)


def test_a_version_in_use_is_never_evicted(versions):
    digests = list(versions)
    runtime = ModelRuntime(cache=DirCache(versions), max_loaded=1)
    with runtime.using("tiny", 1, digests[0]) as running:
        # A promote arrives mid-job: the next version loads beside the running one.
        runtime.get("tiny", 2, digests[1])
        assert set(runtime.loaded_digests()) == {digests[0], digests[1]}
        frames = running.model.generate("x", width=16, height=16, num_frames=2, seed=0)
        assert frames.shape == (2, 16, 16, 3)
    # Once the job has ended the old version goes at the next load.
    runtime.get("tiny", 3, digests[2])
    assert digests[0] not in runtime.loaded_digests()
