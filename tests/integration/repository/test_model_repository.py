"""Model repository against real S3 (SeaweedFS) and Postgres: write-once, digests, loading."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from app.core.config import get_settings
from app.core.storage import s3_client
from app.db.models import Model, ModelAlias, ModelVersion
from app.db.session import transaction
from workers.cache import ModelCache
from workers.repository import (
    BundleError,
    IntegrityError,
    VersionExists,
    fetch_manifest,
    push_version,
    verify_remote,
    version_prefix,
)
from workers.runtime import ModelRuntime

TINY = Path(__file__).resolve().parents[2] / "fixtures" / "bundles" / "tiny"


@pytest.fixture()
def model_name(stack_env) -> str:
    return f"repo-{uuid.uuid4().hex[:8]}"


def push(name: str, bundle: Path = TINY):
    with transaction() as session:
        return push_version(session, bundle, name, created_by="test")


def objects(prefix: str) -> list[str]:
    listing = s3_client().list_objects_v2(Bucket=get_settings().models_bucket, Prefix=prefix)
    return sorted(obj["Key"][len(prefix) :] for obj in listing.get("Contents", []))


def test_push_writes_every_file_and_a_manifest_of_their_digests(model_name):
    pushed = push(model_name)
    assert pushed.number == 1 and pushed.digest.startswith("sha256:")
    keys = objects(version_prefix(model_name, 1))
    assert keys == sorted(
        [
            "manifest.json",
            "model.json",
            "code/tiny_model/__init__.py",
            "weights/tiny.safetensors",
            "env/requirements.lock",
        ]
    )
    manifest = fetch_manifest(model_name, 1, pushed.digest)
    assert {f["path"] for f in manifest["files"]} == set(keys) - {"manifest.json"}
    assert manifest["environment"]["torch"] == "2.13.0"
    assert manifest["environment"]["requirements_lock"] == ["torch==2.13.0", "numpy==2.4.6", "safetensors==0.8.0"]
    with transaction() as session:
        model = session.scalar(select(Model).where(Model.name == model_name))
        alias = session.get(ModelAlias, (model.id, "prod"))
        version = session.get(ModelVersion, alias.version_id)
        assert (version.number, version.digest) == (1, pushed.digest)
    assert verify_remote(model_name, 1, pushed.digest) == []


def test_versions_are_numbered_and_never_written_twice(model_name):
    assert push(model_name).number == 1
    assert push(model_name).number == 2
    # Someone wrote version 3's manifest behind the registry's back: the push refuses to
    # overwrite it rather than replace an existing version.
    s3_client().put_object(
        Bucket=get_settings().models_bucket, Key=version_prefix(model_name, 3) + "manifest.json", Body=b"{}"
    )
    with pytest.raises(VersionExists, match="immutable"):
        push(model_name)
    with transaction() as session:
        numbers = session.scalars(select(ModelVersion.number).join(Model).where(Model.name == model_name)).all()
    assert sorted(numbers) == [1, 2]


def test_an_interrupted_push_leaves_no_visible_version(model_name, monkeypatch):
    client = s3_client()
    real_upload = client.upload_file
    calls = []

    def flaky(filename, bucket, key, **kwargs):
        calls.append(key)
        if len(calls) == 3:
            raise ConnectionError("network dropped mid-push")
        return real_upload(filename, bucket, key, **kwargs)

    monkeypatch.setattr(client, "upload_file", flaky)
    with pytest.raises(ConnectionError):
        push(model_name)
    monkeypatch.undo()
    assert "manifest.json" not in objects(version_prefix(model_name, 1))
    with transaction() as session:
        assert session.scalar(select(Model).where(Model.name == model_name)) is None
    # The next push takes number 1 and overwrites the orphaned files.
    assert push(model_name).number == 1


def test_a_corrupted_weight_is_refused_by_the_cache_and_by_verify(model_name, tmp_path):
    pushed = push(model_name)
    key = version_prefix(model_name, 1) + "weights/tiny.safetensors"
    s3_client().put_object(Bucket=get_settings().models_bucket, Key=key, Body=b"\x00" * 176)
    problems = verify_remote(model_name, 1, pushed.digest)
    assert len(problems) == 1 and problems[0].startswith("weights/tiny.safetensors: sha256")
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match=r"weights/tiny.safetensors has sha256 .* manifest says"):
        cache.ensure(model_name, 1, pushed.digest)
    # Nothing half-downloaded is left looking like a usable version.
    assert not cache.path_for(pushed.digest).exists()
    assert [p.name for p in (tmp_path / "cache" / "versions").iterdir()] == []


def test_a_tampered_manifest_is_refused(model_name, tmp_path):
    pushed = push(model_name)
    key = version_prefix(model_name, 1) + "manifest.json"
    body = json.loads(s3_client().get_object(Bucket=get_settings().models_bucket, Key=key)["Body"].read())
    body["files"][0]["sha256"] = "0" * 64
    s3_client().put_object(Bucket=get_settings().models_bucket, Key=key, Body=json.dumps(body).encode())
    with pytest.raises(IntegrityError, match="manifest digest"):
        ModelCache(tmp_path / "cache").ensure(model_name, 1, pushed.digest)


def test_bundles_with_pickles_or_missing_parts_are_refused(model_name, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(TINY, bad)
    (bad / "weights" / "extra.pt").write_bytes(b"pickle")
    with pytest.raises(BundleError, match="pickled checkpoints are refused"):
        push(model_name, bad)
    (bad / "weights" / "extra.pt").unlink()
    (bad / "model.json").unlink()
    with pytest.raises(BundleError, match="model.json is missing"):
        push(model_name, bad)


def test_two_versions_of_one_package_load_side_by_side(model_name, tmp_path):
    first = push(model_name)
    second_bundle = tmp_path / "v2"
    shutil.copytree(TINY, second_bundle)
    init = second_bundle / "code" / "tiny_model" / "__init__.py"
    init.write_text(init.read_text().replace("class TinyModel:", "VERSION_MARK = 2\n\n\nclass TinyModel:"))
    second = push(model_name, second_bundle)
    runtime = ModelRuntime(ModelCache(tmp_path / "cache"), max_loaded=2)
    a = runtime.get(model_name, 1, first.digest)
    b = runtime.get(model_name, 2, second.digest)
    assert type(a.model).__module__ != type(b.model).__module__
    import sys

    assert sys.modules[type(b.model).__module__].VERSION_MARK == 2
    assert not hasattr(sys.modules[type(a.model).__module__], "VERSION_MARK")
    frames = a.model.generate("x", width=16, height=16, num_frames=2, seed=0)
    assert frames.shape == (2, 16, 16, 3)
    assert runtime.get(model_name, 1, first.digest) is a and runtime.loads == 2


def test_concurrent_pushes_of_the_same_version_one_wins(model_name, stack_env):
    """Push B starts while push A is inside its critical section, and waits for it; A wins, B is refused.

    The test holds A at the end of its critical section (uploads and manifest done, the registry
    row not yet written) by holding the model's row FOR UPDATE: A's insert of the version row
    waits on it (its foreign key check). B is started only then, and must end up waiting on A
    (pg_blocking_pids), not finish: that is the overlap, seen by Postgres rather than inferred
    from timing. Then the gate opens.
    """
    import multiprocessing
    import queue

    from sqlalchemy import text

    from app.db.session import get_engine
    from tests.integration.repository.concurrent_push import push_when_told

    with transaction() as session:
        session.add(Model(id=uuid.uuid4(), name=model_name, description=""))
    spawn = multiprocessing.get_context("spawn")
    pushers = {}
    for who in ("a", "b"):
        ready, go, messages = spawn.Event(), spawn.Event(), spawn.Queue()
        process = spawn.Process(
            target=push_when_told, args=(stack_env.env, str(TINY), model_name, 7, ready, go, messages), daemon=True
        )
        process.start()
        pushers[who] = {"process": process, "ready": ready, "go": go, "messages": messages}

    def report(who: str, key: str) -> dict:
        while key not in (message := pushers[who]["messages"].get(timeout=60)):
            pass
        return message

    def backend(who: str) -> int:
        return report(who, "backend")["backend"]

    def blockers(conn, pid: int) -> list[int]:
        return conn.execute(text("SELECT pg_blocking_pids(:p)"), {"p": pid}).scalar_one()

    def wait_until_blocked_by(conn, who: str, pid: int, blocker: int) -> None:
        """Until Postgres says `pid` waits on `blocker`; fails at once if a push finished instead."""
        deadline = time.monotonic() + 60
        while blocker not in blockers(conn, pid):
            for other, pusher in pushers.items():
                if not pusher["process"].is_alive():
                    pytest.fail(f"push {other} ended while push {who} should be waiting: {drain(other)}")
            assert time.monotonic() < deadline, f"push {who} never waited on {blocker}"
            time.sleep(0.05)

    def drain(who: str) -> list[dict]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(pushers[who]["messages"].get(timeout=1))
        return out

    try:
        for pusher in pushers.values():
            assert pusher["ready"].wait(120), "a pusher process did not start"
        with get_engine().connect() as gate:
            gate_pid = gate.execute(text("SELECT pg_backend_pid()")).scalar_one()
            gate.execute(text("SELECT id FROM models WHERE name = :n FOR UPDATE"), {"n": model_name})
            pushers["a"]["go"].set()
            a_pid = backend("a")
            wait_until_blocked_by(gate, "a", a_pid, gate_pid)
            # Held after its uploads: the manifest is out, the registry row is not.
            assert "manifest.json" in objects(version_prefix(model_name, 7))
            pushers["b"]["go"].set()
            b_pid = backend("b")
            wait_until_blocked_by(gate, "b", b_pid, a_pid)
            gate.rollback()  # the gate opens: A commits, then B gets its turn
        results = {who: report(who, "outcome") for who in pushers}
    finally:
        for pusher in pushers.values():
            pusher["go"].set()
            pusher["process"].join(30)
            if pusher["process"].is_alive():
                pusher["process"].kill()
    a, b = results["a"], results["b"]
    assert a["started"] < b["started"] < a["ended"], results  # B's push began inside A's
    assert a["outcome"] == "ok", results
    # The documented outcome (workers/repository.py push_version): refused before it uploads a byte.
    assert b["outcome"].startswith("VersionExists:") and "version 7" in b["outcome"] and b["uploaded"] == 0, results
    with transaction() as session:
        rows = session.scalars(select(ModelVersion).join(Model).where(Model.name == model_name)).all()
    assert [v.number for v in rows] == [7]
    assert a["uploaded"] == rows[0].size_bytes > 0
    assert verify_remote(model_name, 7, rows[0].digest) == []
    assert fetch_manifest(model_name, 7, rows[0].digest)["created_by"] == f"pid {pushers['a']['process'].pid}"
    with pytest.raises(VersionExists, match="numbers only grow"):
        with transaction() as session:
            push_version(session, TINY, model_name, number=5)
