"""The per-host model cache against real S3 (SeaweedFS): blobs, views, locks, pins, LRU bound."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from app.core.config import get_settings
from app.core.storage import s3_client
from app.db.session import transaction
from workers.cache import CacheFull, ModelCache
from workers.repository import IntegrityError, fetch_manifest, push_version, version_prefix

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "tests" / "fixtures" / "bundles" / "tiny"

# A worker process of the same host: records every S3 download it starts (slowed down, so two
# of them really overlap), waits for the go file, then ensures its versions, or pins and sleeps.
CHILD = r"""
import json, sys, time
from pathlib import Path
from app.core.storage import s3_client
from workers.cache import ModelCache

spec = json.loads(sys.argv[1])
client = s3_client()
real = client.download_file

def recorded(bucket, key, filename, **kwargs):
    with open(spec["log"], "a") as log:  # one short O_APPEND write per line: no interleaving
        log.write(key + "\n")
    time.sleep(spec["delay"])
    return real(bucket, key, filename, **kwargs)

client.download_file = recorded
cache = ModelCache(spec["root"], spec["max_bytes"])
if spec["action"] == "pin":
    cache.pin(spec["digest"])
    print("pinned", flush=True)
    time.sleep(120)
print("ready", flush=True)
while not Path(spec["go"]).exists():
    time.sleep(0.005)
print(json.dumps([str(cache.ensure(*version)) for version in spec["versions"]]), flush=True)
"""


def spawn(**spec) -> subprocess.Popen:
    spec = {"delay": 0.0, "max_bytes": 10**9, "action": "ensure", **spec}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def wait_for_line(proc: subprocess.Popen, expected: str) -> None:
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        raise AssertionError(f"child said {line!r}:\n{proc.communicate()[1]}")


def make_bundle(root: Path, tag: str, *, extra: dict[str, bytes] | None = None, code_mark: str | None = None) -> Path:
    bundle = root / tag
    shutil.copytree(TINY, bundle)
    for rel, data in (extra or {}).items():
        (bundle / rel).write_bytes(data)
    if code_mark:
        init = bundle / "code" / "tiny_model" / "__init__.py"
        init.write_text(init.read_text() + f"\nVERSION_MARK = {code_mark!r}\n")
    return bundle


def push(name: str, bundle: Path):
    with transaction() as session:
        return push_version(session, bundle, name, created_by="test")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_view_matches(cache: ModelCache, name: str, pushed) -> dict:
    view = cache.path_for(pushed.digest)
    manifest = fetch_manifest(name, pushed.number, pushed.digest)
    # The view's manifest is the stored one byte for byte: its sha256 is the version's identity.
    assert "sha256:" + sha256(view / "manifest.json") == pushed.digest
    for entry in manifest["files"]:
        path = view / entry["path"]
        assert (sha256(path), path.stat().st_size) == (entry["sha256"], entry["size"])
        blob = cache.blob_path(entry["sha256"])
        assert path.stat().st_ino == blob.stat().st_ino  # a link to the blob, not a copy
        assert not blob.stat().st_mode & 0o222  # read-only
    return manifest


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())


@pytest.fixture()
def name(stack_env) -> str:
    return f"cache-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def recorded_downloads(monkeypatch) -> list[str]:
    client = s3_client()
    real = client.download_file
    keys: list[str] = []

    def recorded(bucket, key, filename, **kwargs):
        keys.append(key)
        return real(bucket, key, filename, **kwargs)

    monkeypatch.setattr(client, "download_file", recorded)
    return keys


def test_ensure_materialises_the_manifest_and_a_second_ensure_is_a_hit(name, tmp_path, recorded_downloads):
    pushed = push(name, TINY)
    cache = ModelCache(tmp_path / "cache")
    view = cache.ensure(name, pushed.number, pushed.digest)
    assert view == cache.path_for(pushed.digest)
    manifest = assert_view_matches(cache, name, pushed)
    assert {"model.json", "code", "weights", "env", "manifest.json"} == {p.name for p in view.iterdir()}
    assert len(recorded_downloads) == len(manifest["files"])
    stats = cache.stats()
    assert (stats["downloads"], stats["hits"], stats["misses"], stats["versions"]) == (len(manifest["files"]), 0, 1, 1)
    assert stats["bytes"] == sum(f["size"] for f in manifest["files"])

    assert cache.ensure(name, pushed.number, pushed.digest) == view
    # Another process's cache object on the same root sees the same host-wide state.
    assert ModelCache(tmp_path / "cache").ensure(name, pushed.number, pushed.digest) == view
    assert len(recorded_downloads) == len(manifest["files"])
    stats = cache.stats()
    assert (stats["downloads"], stats["hits"], stats["misses"]) == (len(manifest["files"]), 2, 1)


def test_a_view_left_by_the_older_per_digest_layout_is_rebuilt_from_blobs(name, tmp_path):
    pushed = push(name, TINY)
    root = tmp_path / "cache"
    # What LocalVersionCache left: full copies, a manifest.json, no blobs, no registration.
    legacy = root / "versions" / pushed.digest.replace(":", "-")
    shutil.copytree(TINY, legacy)
    (legacy / "manifest.json").write_text("{}")
    (root / "versions" / ".partial-abc123").mkdir()
    cache = ModelCache(root)
    assert cache.ensure(name, pushed.number, pushed.digest) == legacy
    assert_view_matches(cache, name, pushed)
    assert sorted(p.name for p in (root / "versions").iterdir()) == [legacy.name]


def test_a_file_shared_by_two_versions_is_downloaded_once(name, tmp_path, recorded_downloads):
    weights = {"weights/big.safetensors": random.Random(1).randbytes(64 * 1024)}
    first = push(name, make_bundle(tmp_path, "a", extra=weights))
    second = push(name, make_bundle(tmp_path, "b", extra=weights, code_mark="two"))
    cache = ModelCache(tmp_path / "cache")
    one = cache.ensure(name, first.number, first.digest)
    n_first = len(recorded_downloads)
    two = cache.ensure(name, second.number, second.digest)
    # Only the changed code file came down for version 2.
    assert recorded_downloads[n_first:] == [version_prefix(name, 2) + "code/tiny_model/__init__.py"]
    assert_view_matches(cache, name, first)
    assert_view_matches(cache, name, second)
    assert (one / "weights/big.safetensors").stat().st_ino == (two / "weights/big.safetensors").stat().st_ino
    assert "VERSION_MARK" in (two / "code/tiny_model/__init__.py").read_text()
    assert "VERSION_MARK" not in (one / "code/tiny_model/__init__.py").read_text()
    stats = cache.stats()
    assert (stats["downloads"], stats["blobs"], stats["versions"]) == (n_first + 1, n_first + 1, 2)


def test_a_corrupted_object_is_refused_and_leaves_nothing_behind(name, tmp_path):
    pushed = push(name, TINY)
    bucket, key = get_settings().models_bucket, version_prefix(name, 1) + "weights/tiny.safetensors"
    original = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    s3_client().put_object(Bucket=bucket, Key=key, Body=b"\x00" * len(original))
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(IntegrityError) as caught:
        cache.ensure(name, 1, pushed.digest)
    message = str(caught.value)
    assert "weights/tiny.safetensors" in message
    assert hashlib.sha256(original).hexdigest() in message  # what the manifest says
    assert hashlib.sha256(b"\x00" * len(original)).hexdigest() in message  # what came down
    # The other files downloaded fine, but only this version wanted them: gone too.
    for part in ("blobs", "versions", "manifests", "tmp"):
        assert files_under(tmp_path / "cache" / part) == [], part
    assert not cache.path_for(pushed.digest).exists()

    s3_client().put_object(Bucket=bucket, Key=key, Body=original)
    cache.ensure(name, 1, pushed.digest)
    assert_view_matches(cache, name, pushed)


def test_workers_racing_for_versions_download_each_file_once(name, tmp_path):
    weights = {"weights/big.safetensors": random.Random(2).randbytes(256 * 1024)}
    bundle = make_bundle(tmp_path, "a", extra=weights)
    # Same files, two versions: different digests (so different version locks), the same blobs.
    first, second = push(name, bundle), push(name, bundle)
    root, log, go = tmp_path / "cache", tmp_path / "downloads.log", tmp_path / "go"
    plan = [[first], [first], [second]]
    procs = [
        spawn(
            root=str(root), log=str(log), go=str(go), delay=0.3, versions=[[name, v.number, v.digest] for v in versions]
        )
        for versions in plan
    ]
    for proc in procs:
        wait_for_line(proc, "ready")
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    cache = ModelCache(root)
    assert results == [[str(cache.path_for(first.digest))]] * 2 + [[str(cache.path_for(second.digest))]]

    manifest = assert_view_matches(cache, name, first)
    assert_view_matches(cache, name, second)
    downloaded = [line.split("/", 3)[3] for line in log.read_text().splitlines()]  # models/<name>/<n>/<path>
    # Each file came from S3 exactly once on this host, whichever process and version fetched it.
    assert sorted(downloaded) == sorted(f["path"] for f in manifest["files"])
    stats = cache.stats()
    assert (stats["downloads"], stats["misses"], stats["hits"]) == (len(manifest["files"]), 2, 1)


@pytest.fixture(scope="module")
def lru_versions(stack_env, tmp_path_factory):
    """Four versions: the tiny bundle's files shared, plus a 32 KiB weights file of their own."""
    name = f"lru-{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("lru-bundles")
    pushed = [
        push(
            name,
            make_bundle(root, f"v{i}", extra={"weights/own.safetensors": random.Random(10 + i).randbytes(32 * 1024)}),
        )
        for i in range(1, 5)
    ]
    manifest = fetch_manifest(name, 1, pushed[0].digest)
    own = {f["path"]: f for f in manifest["files"]}.pop("weights/own.safetensors")
    shared = sum(f["size"] for f in manifest["files"]) - own["size"]
    own_sha = {
        v.number: {f["path"]: f["sha256"] for f in fetch_manifest(name, v.number, v.digest)["files"]}[
            "weights/own.safetensors"
        ]
        for v in pushed
    }
    shared_shas = [f["sha256"] for f in manifest["files"] if f["path"] != "weights/own.safetensors"]
    return {
        "name": name,
        "versions": pushed,
        "shared": shared,
        "own": own["size"],
        "own_sha": own_sha,
        "shared_shas": shared_shas,
    }


def test_lru_evicts_the_least_recently_used_version_that_is_not_in_use(lru_versions, tmp_path):
    name, (v1, v2, v3, v4) = lru_versions["name"], lru_versions["versions"]
    max_bytes = lru_versions["shared"] + 2 * lru_versions["own"] + lru_versions["own"] // 2  # room for two
    cache = ModelCache(tmp_path / "cache", max_bytes)

    def present(*versions) -> None:
        held = {v.number for v in versions}
        for v in (v1, v2, v3, v4):
            assert cache.path_for(v.digest).exists() == (v.number in held), f"v{v.number}"
            assert cache.blob_path(lru_versions["own_sha"][v.number]).exists() == (v.number in held), (
                f"v{v.number} blob"
            )
        for sha in lru_versions["shared_shas"]:
            assert cache.blob_path(sha).exists()  # shared by whatever remains: never evicted
        assert cache.stats()["bytes"] <= max_bytes

    def ensure(v) -> Path:
        return cache.ensure(name, v.number, v.digest)

    ensure(v1), ensure(v2)
    present(v1, v2)
    ensure(v3)
    present(v2, v3)
    assert cache.stats()["evictions"] == 1
    # Least recently *used*, not least recently added: touching v2 makes v3 the one to go.
    ensure(v2)
    ensure(v1)
    present(v1, v2)
    assert_view_matches(cache, name, v2)

    with cache.use(v2.digest):  # v2 is now the least recently used, but pinned
        ensure(v3)
        present(v2, v3)
        cache.pin(v3.digest)
        with pytest.raises(CacheFull, match="in use"):
            ensure(v4)
        present(v2, v3)  # and nothing of v4 was left behind
        assert files_under(tmp_path / "cache" / "tmp") == []
        cache.unpin(v3.digest)
    ensure(v4)
    assert cache.path_for(v4.digest).exists() and cache.stats()["versions"] == 2
    assert cache.stats()["bytes"] <= max_bytes

    with pytest.raises(CacheFull, match="holds at most 1000"):
        ModelCache(tmp_path / "small", 1000).ensure(name, v1.number, v1.digest)


def test_a_pin_held_by_a_killed_process_no_longer_blocks_eviction(lru_versions, tmp_path):
    name, (v1, v2, *_) = lru_versions["name"], lru_versions["versions"]
    root = tmp_path / "cache"
    cache = ModelCache(root, lru_versions["shared"] + lru_versions["own"] + 1024)  # room for one
    cache.ensure(name, v1.number, v1.digest)
    worker = spawn(root=str(root), log=str(tmp_path / "log"), go="", action="pin", digest=v1.digest)
    try:
        wait_for_line(worker, "pinned")
        with pytest.raises(CacheFull, match="in use"):
            cache.ensure(name, v2.number, v2.digest)
        assert cache.path_for(v1.digest).exists()
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.communicate(timeout=10)
    assert worker.returncode == -signal.SIGKILL
    cache.ensure(name, v2.number, v2.digest)
    assert not cache.path_for(v1.digest).exists()
    assert_view_matches(cache, name, v2)


def test_large_files_come_down_in_concurrent_parts_with_progress(name, tmp_path):
    big = os.urandom(20 * 1024 * 1024)  # over TRANSFER's 16 MiB multipart threshold
    pushed = push(name, make_bundle(tmp_path, "big", extra={"weights/big.safetensors": big}))
    client = s3_client()
    ranges: list[str] = []

    def record(params, **_):
        if params.get("Key", "").endswith("weights/big.safetensors"):
            ranges.append(params.get("Range", ""))

    client.meta.events.register("before-parameter-build.s3.GetObject", record)
    try:
        cache = ModelCache(tmp_path / "cache")
        seen: list[int] = []
        started = time.perf_counter()
        cache.ensure(name, pushed.number, pushed.digest, progress=seen.append)
        elapsed = time.perf_counter() - started
    finally:
        client.meta.events.unregister("before-parameter-build.s3.GetObject", record)
    assert len(ranges) >= 2 and all(r.startswith("bytes=") for r in ranges), ranges
    assert sum(seen) == pushed.size_bytes
    assert_view_matches(cache, name, pushed)
    print(f"20 MiB version cached in {elapsed:.2f}s")

    from app.cli import main

    result = CliRunner().invoke(main, ["models", "pull", name, "1", "--cache-dir", str(tmp_path / "cli-cache")])
    assert result.exit_code == 0, result.output
    pulled = json.loads(result.stdout)
    assert pulled["path"] == str(ModelCache(tmp_path / "cli-cache").path_for(pushed.digest))
    assert pulled["downloaded_bytes"] == pushed.size_bytes
    assert_view_matches(ModelCache(tmp_path / "cli-cache"), name, pushed)
