"""A version's Python environment: in-process when the worker satisfies its lock, a venv built
from the bundle's wheels and a model process otherwise, a clear refusal when neither works.

Real processes and a real venv (built once for the module, with --no-index: no network). The
bundle's extra dependency is a wheel built by hand here from tests/fixtures/wheels/.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.support.system_deps import missing
from workers import environments
from workers.environments import ModelEnvironmentError, ensure_environment, plan_for
from workers.model_process import (
    ModelProcess,
    ModelProcessCrashed,
    ModelProcessError,
    SubprocessGenerationCancelled,
)
from workers.repository import build_manifest

ROOT = Path(__file__).resolve().parents[3]
BUNDLES = ROOT / "tests" / "fixtures" / "bundles"
DEP_SOURCE = ROOT / "tests" / "fixtures" / "wheels" / "dreamq_fixture_dep"
SHM = Path("/dev/shm")


def build_wheel(source: Path, out: Path, tag: str = "py3-none-any") -> Path:
    """A wheel written by hand (a zip with METADATA, WHEEL and RECORD): offline, no build tools."""
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files = {
        p.relative_to(source).as_posix(): p.read_bytes()
        for p in sorted(source.rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: dreamq-tests\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    )
    record = [
        f"{rel},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for rel, data in files.items()
    ]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel, data in files.items():
            archive.writestr(zipfile.ZipInfo(rel, (2020, 1, 1, 0, 0, 0)), data)
    return wheel


def make_version(
    bundle: Path,
    dest: Path,
    name: str,
    number: int,
    *,
    wheels: tuple[Path, ...] = (),
    lock: list[str] | None = None,
    python: str | None = None,
) -> tuple[Path, dict]:
    """A version directory as the cache lays it out: the bundle's files plus manifest.json."""
    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for wheel in wheels:
        (dest / "env" / "wheels").mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, dest / "env" / "wheels" / wheel.name)
    if lock is not None:
        (dest / "env" / "requirements.lock").write_text("\n".join(lock) + "\n")
    manifest_bytes, _ = build_manifest(dest, name, number, "test")
    manifest = json.loads(manifest_bytes)
    if python is not None:
        manifest["environment"]["python"] = python
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest, manifest


def tiny_frames(work: Path, width: int, height: int, num_frames: int) -> np.ndarray:
    """What the tiny fixture model paints, computed in this process (from a copy: no __pycache__
    in the fixtures)."""
    import torch

    from workers.runtime import _import_entrypoint

    copy = work / "tiny-reference"
    if not copy.exists():
        shutil.copytree(BUNDLES / "tiny", copy, ignore=shutil.ignore_patterns("__pycache__"))
    cls = _import_entrypoint(copy, "tiny_model:TinyModel", "sha256:" + "0" * 64)
    return cls.load(copy, torch.device("cpu")).generate("x", width=width, height=height, num_frames=num_frames, seed=0)


def shm_blocks(pid: int) -> list[Path]:
    return sorted(SHM.glob(f"dq{pid}_*")) if SHM.is_dir() else []


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("environments")


@pytest.fixture(scope="module")
def wheel(work) -> Path:
    return build_wheel(DEP_SOURCE, work / "wheelhouse")


@pytest.fixture(scope="module")
def env_root(work) -> Path:
    return work / "envs"


@pytest.fixture(scope="module")
def env_version(work, wheel):
    return make_version(BUNDLES / "tiny_env", work / "tiny_env-1", "tiny_env", 1, wheels=(wheel,))


@pytest.fixture(scope="module")
def built(env_version, env_root):
    version_dir, manifest = env_version
    plan = plan_for(manifest, version_dir, root=env_root)
    return plan, ensure_environment(plan)


@pytest.fixture(scope="module")
def proxy(env_version, built):
    version_dir, manifest = env_version
    plan, env = built
    model = ModelProcess(
        python=env.python,
        version_dir=version_dir,
        entrypoint=manifest["model"]["entrypoint"],
        device="cpu",
        label="tiny_env v1",
    )
    model.start()
    yield model
    model.close()


# --- planning ------------------------------------------------------------------------------------


def test_a_lock_the_worker_satisfies_runs_in_process(work):
    version_dir, manifest = make_version(BUNDLES / "tiny", work / "tiny-1", "tiny", 1)
    plan = plan_for(manifest, version_dir, root=work / "unused")
    assert plan.in_process and plan.env_dir is None and plan.install == ()


def test_a_conflicting_pin_without_a_wheel_names_the_requirement_and_what_the_worker_has(work):
    import numpy

    lock = ["torch==2.13.0", "numpy==1.0.0", "safetensors==0.8.0"]
    version_dir, manifest = make_version(BUNDLES / "tiny", work / "tiny-conflict", "tiny", 7, lock=lock)
    with pytest.raises(ModelEnvironmentError) as caught:
        plan_for(manifest, version_dir, root=work / "unused")
    message = str(caught.value)
    assert "model tiny v7 needs numpy==1.0.0" in message
    assert f"the worker has numpy {numpy.__version__}" in message
    assert "the bundle carries no wheel for it" in message


def test_a_package_the_worker_lacks_and_the_bundle_does_not_carry_is_refused(work):
    version_dir, manifest = make_version(BUNDLES / "tiny_env", work / "tiny_env-nowheel", "tiny_env", 2)
    with pytest.raises(
        ModelEnvironmentError,
        match=r"model tiny_env v2 needs dreamq-fixture-dep==2\.0, the worker has "
        r"nothing and the bundle carries no wheel for it",
    ):
        plan_for(manifest, version_dir, root=work / "unused")


def test_a_wheel_for_another_platform_or_version_does_not_count(work):
    foreign = build_wheel(DEP_SOURCE, work / "foreign", tag="cp27-cp27mu-win32")
    version_dir, manifest = make_version(
        BUNDLES / "tiny_env", work / "tiny_env-foreign", "tiny_env", 3, wheels=(foreign,)
    )
    with pytest.raises(
        ModelEnvironmentError,
        match=r"needs dreamq-fixture-dep==2\.0, the worker has nothing; the "
        r"bundle's dreamq_fixture_dep-2\.0-cp27-cp27mu-win32\.whl do not fit",
    ):
        plan_for(manifest, version_dir, root=work / "unused")
    lock = ["dreamq-fixture-dep>=3,<4"]
    version_dir, manifest = make_version(
        BUNDLES / "tiny_env", work / "tiny_env-range", "tiny_env", 4, wheels=(foreign,), lock=lock
    )
    with pytest.raises(ModelEnvironmentError, match=r"needs dreamq-fixture-dep<4,>=3|needs dreamq-fixture-dep>=3,<4"):
        plan_for(manifest, version_dir, root=work / "unused")


def test_specifier_ranges_markers_local_versions_and_name_normalisation(work):
    import numpy

    lock = [
        "# generated by pip-compile",
        "Torch==2.13.0  # the worker's is 2.13.0+cpu: a local version satisfies a plain pin",
        f"NumPy>={numpy.__version__},<99 \\",
        "    --hash=sha256:" + "ab" * 32,
        "safetensors~=0.8.0",
        'nonexistent-package==1.0; python_version < "3.0"',
    ]
    version_dir, manifest = make_version(BUNDLES / "tiny", work / "tiny-ranges", "tiny", 8, lock=lock)
    assert plan_for(manifest, version_dir, root=work / "unused").in_process


def test_without_packaging_exact_pins_and_pure_python_wheels_still_work(work, wheel, monkeypatch):
    """`packaging` is not a declared dependency: the built-in fallback must cover `==` locks."""
    monkeypatch.setattr(environments, "_PACKAGING", None)
    environments._interpreter_tags.cache_clear()
    try:
        version_dir, manifest = make_version(BUNDLES / "tiny", work / "tiny-fallback", "tiny", 11)
        assert plan_for(manifest, version_dir, root=work / "unused").in_process  # torch 2.13.0+cpu == 2.13.0
        version_dir, manifest = make_version(
            BUNDLES / "tiny_env", work / "tiny_env-fallback", "tiny_env", 11, wheels=(wheel,)
        )
        plan = plan_for(manifest, version_dir, root=work / "unused")
        assert plan.mode == environments.SUBPROCESS and plan.install[0].wheel.version == "2.0"
        version_dir, manifest = make_version(
            BUNDLES / "tiny", work / "tiny-fallback-conflict", "tiny", 12, lock=["numpy==1.0.0"]
        )
        with pytest.raises(ModelEnvironmentError, match="needs numpy==1.0.0, the worker has numpy"):
            plan_for(manifest, version_dir, root=work / "unused")
    finally:
        environments._interpreter_tags.cache_clear()


def test_python_versions(work, wheel):
    version_dir, manifest = make_version(BUNDLES / "tiny", work / "tiny-py2", "tiny", 9, python="2.7.18")
    with pytest.raises(ModelEnvironmentError, match=r"model tiny v9 was pushed with Python 2\.7\.18; this worker runs"):
        plan_for(manifest, version_dir, root=work / "unused")
    # Another minor whose lock is satisfiable here: not in the worker process, but in a venv.
    other = f"3.{sys.version_info.minor + 1}.0"
    version_dir, manifest = make_version(BUNDLES / "tiny", work / "tiny-py-minor", "tiny", 10, python=other)
    plan = plan_for(manifest, version_dir, root=work / "unused")
    assert plan.mode == environments.SUBPROCESS and f"pushed with Python {other}" in plan.reason
    # ... and one that is not satisfiable says both.
    version_dir, manifest = make_version(BUNDLES / "tiny_env", work / "tiny_env-py-minor", "tiny_env", 5, python=other)
    with pytest.raises(ModelEnvironmentError, match=rf"carries no wheel for it \(pushed with Python {other}"):
        plan_for(manifest, version_dir, root=work / "unused")


# --- the venv ------------------------------------------------------------------------------------


def test_the_venv_is_built_once_per_lock_and_reused(env_version, env_root, built, work, wheel):
    version_dir, manifest = env_version
    plan, env = built
    assert plan.mode == environments.SUBPROCESS
    assert [m.requirement.line for m in plan.install] == ["dreamq-fixture-dep==2.0"]
    assert env.built and (env.path / ".complete").is_file() and env.path.parent == env_root
    again = plan_for(manifest, version_dir, root=env_root)
    assert again.env_dir == plan.env_dir
    assert ensure_environment(again).built is False  # cache hit
    # Another version with the same lock and wheel shares the venv.
    other_dir, other_manifest = make_version(BUNDLES / "tiny_env", work / "tiny_env-9", "tiny_env", 9, wheels=(wheel,))
    assert plan_for(other_manifest, other_dir, root=env_root).env_dir == plan.env_dir
    # Only the bundle's package is in the venv; torch and numpy come from the worker.
    site = next(env.path.glob("lib/python*/site-packages"))
    assert sorted(p.name for p in site.iterdir()) == [
        "_dreamq_worker_site.pth",
        "dreamq_fixture_dep",
        "dreamq_fixture_dep-2.0.dist-info",
    ]


def test_a_venv_without_its_marker_is_rebuilt(work, wheel):
    version_dir, manifest = make_version(
        BUNDLES / "tiny_env", work / "tiny_env-rebuild", "tiny_env", 6, wheels=(wheel,)
    )
    plan = plan_for(manifest, version_dir, root=work / "envs-rebuild")
    first = ensure_environment(plan)
    (first.path / ".complete").unlink()
    (first.path / "half-written").write_text("left by a crash")
    second = ensure_environment(plan)
    assert second.built and not (second.path / "half-written").exists()


# --- the model process -----------------------------------------------------------------------------


def test_generate_in_the_venv_returns_the_frames_and_reports_every_step(proxy, built, work):
    plan, env = built
    assert proxy.child_info["prefix"] == str(env.path)
    steps = []
    frames = proxy.generate(
        "a prompt",
        width=64,
        height=48,
        num_frames=5,
        seed=3,
        on_step=lambda done, total: steps.append((done, total)) or True,
    )
    assert steps == [(i, 5) for i in range(1, 6)]
    expected = tiny_frames(work, 64, 48, 5)
    expected[:, 0, 0, 0] = 2  # dreamq_fixture_dep.VALUE, from the bundle's wheel
    assert frames.dtype == np.uint8 and frames.shape == (5, 48, 64, 3)
    np.testing.assert_array_equal(frames, expected)
    pid = proxy.pid
    again = proxy.generate("a prompt", width=32, height=32, num_frames=2, seed=3)
    assert again.shape == (2, 32, 32, 3) and proxy.pid == pid and proxy.starts == 1
    assert shm_blocks(pid) == []


def test_input_video_travels_in_shared_memory_and_stdout_prints_are_harmless(proxy):
    video = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    frames = proxy.generate("chatty", width=32, height=32, num_frames=3, seed=0, input_video=video)
    np.testing.assert_array_equal(frames[:, 1, 1, :], video[:, 1, 1, :])
    assert proxy.starts == 1


def test_cancel_stops_at_a_step_boundary_and_keeps_the_process(proxy):
    pid = proxy.pid
    seen = []

    def stop_at_two(done, total):
        seen.append(done)
        return done < 2

    with pytest.raises(proxy.cancelled_exc):
        proxy.generate("a prompt", width=32, height=32, num_frames=6, seed=0, on_step=stop_at_two)
    assert proxy.cancelled_exc is SubprocessGenerationCancelled
    assert seen == [1, 2] and proxy.pid == pid
    assert proxy.generate("a prompt", width=32, height=32, num_frames=1, seed=0).shape == (1, 32, 32, 3)


def test_an_exception_in_on_step_stops_the_model_and_reaches_the_caller(proxy):
    pid = proxy.pid

    def broken(done, total):
        raise ValueError("progress store unavailable")

    with pytest.raises(ValueError, match="progress store unavailable"):
        proxy.generate("a prompt", width=32, height=32, num_frames=4, seed=0, on_step=broken)
    assert proxy.pid == pid
    assert proxy.generate("a prompt", width=32, height=32, num_frames=1, seed=0).shape == (1, 32, 32, 3)


def test_an_exception_in_the_model_is_reported_and_the_process_keeps_serving(proxy):
    pid = proxy.pid
    with pytest.raises(ModelProcessError, match="RuntimeError: tiny model exploded on purpose") as caught:
        proxy.generate("explode", width=32, height=32, num_frames=2, seed=0)
    assert "Traceback" in caught.value.child_traceback and not isinstance(caught.value, ModelProcessCrashed)
    assert proxy.pid == pid


def test_a_crash_is_a_clear_error_and_the_next_generate_restarts_the_process(proxy):
    pid = proxy.pid
    starts = proxy.starts
    with pytest.raises(ModelProcessCrashed) as caught:
        proxy.generate("segfault", width=32, height=32, num_frames=2, seed=0)
    message = str(caught.value)
    assert f"pid {pid}" in message and "SIGKILL" in message and "about to die" in message
    assert proxy.pid is None
    frames = proxy.generate("a prompt", width=32, height=32, num_frames=2, seed=0)
    assert frames.shape == (2, 32, 32, 3) and frames[0, 0, 0, 0] == 2
    assert proxy.pid not in (None, pid) and proxy.starts == starts + 1
    assert shm_blocks(pid) == []


def test_a_load_failure_names_the_error(env_version, built, work):
    version_dir, manifest = env_version
    broken = work / "tiny_env-broken"
    shutil.copytree(version_dir, broken)
    (broken / "weights" / "tiny.safetensors").write_bytes(b"not a checkpoint")
    model = ModelProcess(
        python=built[1].python, version_dir=broken, entrypoint=manifest["model"]["entrypoint"], label="tiny_env broken"
    )
    with pytest.raises(ModelProcessError, match="tiny_env broken failed to load in its process: .*Error"):
        model.start()
    assert model.pid is None


def test_close_during_a_generate_waits_for_it(built, env_version, monkeypatch):
    version_dir, manifest = env_version
    monkeypatch.setenv("DREAMQ_TINY_STEP_S", "0.05")
    model = ModelProcess(python=built[1].python, version_dir=version_dir, entrypoint=manifest["model"]["entrypoint"])
    model.start()
    proc = model._proc
    started = threading.Event()
    result = {}

    def run():
        result["frames"] = model.generate(
            "a prompt", width=16, height=16, num_frames=10, seed=0, on_step=lambda done, total: started.set() or True
        )

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    model.close()  # returns at once; the process goes when the generate returns
    thread.join(30)
    assert result["frames"].shape == (10, 16, 16, 3)
    assert proc.poll() is not None and model.pid is None


# --- through the runtime and the task ----------------------------------------------------------------


class _DirCache:
    """ModelRuntime's cache, reduced to handing out version directories already on disk."""

    def __init__(self, versions: dict[str, Path]):
        self.versions = versions

    def ensure(self, name: str, number: int, digest: str) -> Path:
        return self.versions[digest]

    def pin(self, digest: str) -> "_NoPin":
        return _NoPin()


class _NoPin:
    """Nothing to evict in a directory-backed cache: a pin only needs to be releasable."""

    def release(self) -> None:
        pass


def test_the_runtime_routes_each_version_and_closes_an_evicted_process(env_version, env_root, work, monkeypatch):
    from workers.runtime import ModelRuntime

    monkeypatch.setattr(environments, "default_root", lambda: env_root)
    monkeypatch.setenv("DREAMQ_DEVICE", "cpu")
    tiny_dir, _ = make_version(BUNDLES / "tiny", work / "tiny-runtime", "tiny", 1)
    conflict_dir, _ = make_version(BUNDLES / "tiny", work / "tiny-runtime-conflict", "tiny", 2, lock=["numpy==1.0.0"])
    digests = {"sha256:" + c * 64: d for c, d in zip("abc", (env_version[0], tiny_dir, conflict_dir))}
    env_digest, tiny_digest, conflict_digest = digests
    runtime = ModelRuntime(cache=_DirCache(digests), max_loaded=1)

    loaded = runtime.get("tiny_env", 1, env_digest)
    assert isinstance(loaded.model, ModelProcess) and loaded.cancelled_exc is SubprocessGenerationCancelled
    proc = loaded.model._proc
    with pytest.raises(loaded.cancelled_exc):
        loaded.model.generate("a prompt", width=32, height=32, num_frames=3, seed=0, on_step=lambda d, t: False)

    with pytest.raises(ModelEnvironmentError, match="model tiny v2 needs numpy==1.0.0"):
        runtime.get("tiny", 2, conflict_digest)
    assert runtime.loaded_versions() == ["tiny_env@1"]  # the refusal changed nothing

    in_process = runtime.get("tiny", 1, tiny_digest)  # evicts tiny_env: its process is stopped
    assert not isinstance(in_process.model, ModelProcess) and in_process.cancelled_exc.__name__ == "GenerationCancelled"
    assert proc.poll() is not None and loaded.model.pid is None


def test_the_task_fails_the_job_with_model_environment_and_carries_on(monkeypatch):
    import workers.runtime
    from app.jobs import execution
    from workers import executor

    class Refusing:
        loads = 0

        @contextlib.contextmanager
        def using(self, name, number, digest):
            raise ModelEnvironmentError("model tiny v2 needs numpy==1.0.0, the worker has numpy 2.4.6 and ...")
            yield

    failed = []
    monkeypatch.setattr(workers.runtime, "get_runtime", lambda: Refusing())
    monkeypatch.setattr(execution, "fail", lambda job, worker_id, code, message: failed.append((code, message)))
    job = execution.ClaimedJob(
        id=None,
        user_id=None,
        tier="free",
        kind="generate",
        prompt="x",
        params={},
        model="tiny",
        version=2,
        digest="sha256:" + "0" * 64,
        upload_key=None,
        attempts=1,
        dispatch_seq=1,
    )
    executor.run_claimed(job, "worker-1")
    assert failed == [("model_environment", "model tiny v2 needs numpy==1.0.0, the worker has numpy 2.4.6 and ...")]


def test_no_shared_memory_is_left_behind():
    if not SHM.is_dir():
        missing(
            "no /dev/shm (the model process hands results over in POSIX shared memory)",
            install="a tmpfs at /dev/shm (mount -t tmpfs tmpfs /dev/shm; Docker mounts one)",
        )
    assert [p.name for p in SHM.glob(f"dq{os.getpid()}i_*")] == []
