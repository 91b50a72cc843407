"""The Python environment a model version runs in: the worker's own, or a venv built for it.

A version's manifest records the Python it was pushed with, its torch, and the full
`env/requirements.lock`; a bundle may also carry wheels in `env/wheels/`. `plan_for` compares the
lock with what this worker has installed and picks one of three outcomes:

* in-process: every requirement of the lock is satisfied by the worker's installed distributions
  (and the version was pushed with this worker's Python major.minor). The runtime imports the
  version's code into the worker process, as it always has. This is the common case and costs
  nothing extra.
* subprocess: some requirements are not satisfied, but for each of them the bundle carries a
  wheel that matches the pin and is compatible with this interpreter (wheel tags). A venv is
  built for the version (below) and the model runs in a long-lived child process on that venv's
  Python (workers/model_process.py); frames come back through shared memory. A version pushed
  with another Python minor whose lock is otherwise satisfiable also runs here, so whatever
  trips over the interpreter difference crashes a child, not the worker.
* refused: some requirement is satisfied neither by the worker nor by a compatible wheel of the
  bundle (or the Python major differs). `ModelEnvironmentError` names the requirement, what the
  worker has instead and what the bundle carries; the job fails with `model_environment` and the
  worker keeps serving other versions.

Requirement matching uses `packaging` (PEP 440 specifiers: `==`, `>=,<`, `~=`, `!=`, markers,
local versions such as torch's `+cu124` / `+cpu`, which `==2.13.0` accepts as PEP 440 says).
`packaging` is pinned in requirements.txt; should a worker's environment lack it, pip's vendored
copy is used, and with neither a built-in fallback understands `==`/`===` pins only (what
`pip freeze` and pip-tools write) and treats markers as always true, and only pure-Python
(`py3-none-any`) wheels count as compatible. Names compare after PEP 503 normalisation. The
manifest's `torch` field is informational (the pusher's torch); the lock's torch line is the
requirement. The installed distributions are read once per process (importlib.metadata, first
on sys.path wins, as for imports).

Venv layout, under `<cache_dir>/envs/` (`app.core.config.get_settings().cache_dir`):

    envs/<key>/                  python -m venv --without-pip [--system-site-packages]
    envs/<key>/lib/python3.X/site-packages/
        _dreamq_worker_site.pth  the worker's site-packages directories, one per line
        <the bundle's wheels>    installed with pip --no-index --no-deps from env/wheels
    envs/<key>/dreamq-env.json   what was installed from where (for a human)
    envs/<key>/.complete         written last: a venv without it is rebuilt, never trusted
    envs/<key>.lock              filelock: one process builds, the others wait and reuse

Why layer on the worker's environment instead of installing the whole lock: a CUDA torch is
several GB, and most versions differ from the worker only in one or two small packages. The venv
sees the worker's site-packages after its own, so everything the worker already satisfies (torch,
numpy, ...) is shared, and only the conflicting packages come from the bundle's wheels and shadow
the worker's copies. `--system-site-packages` does that when the worker runs on the system
interpreter, but not when the worker itself runs in a venv (the usual case): the new venv's
"system" is then the base interpreter, not the worker's venv. So the worker's site-packages are
listed in a .pth file, and --system-site-packages is used only for a worker on the system
interpreter (in a venv worker it would add the base interpreter's packages, which the worker
itself does not see). The .pth lines are plain paths: `.pth` files inside the worker's
site-packages (editable installs of dreamq itself, for one) are deliberately not processed, so
the child cannot import the project.

The key is the sha256 of the lock's digest together with everything else that decides the venv's
content: the interpreter, the worker's site-packages paths, and the sha256 of each wheel
installed. Versions with the same lock and wheels share one venv; a worker image with another
Python or another site layout gets its own instead of a venv whose paths point at the old one.
Venvs hardcode their own path, so one is built at its final path under the file lock, and
`.complete` is what makes it count; a crash mid-build leaves a directory without the marker that
the next build removes. Venvs are small (the bundle's wheels only) and are not evicted yet.

Failure modes: a requirement no one provides -> ModelEnvironmentError at plan time (no venv is
built); pip failing (a corrupt wheel, a wheel whose metadata disagrees with its name) ->
ModelEnvironmentError with pip's output tail, and the partial venv is removed (the next load of
the version tries again: nothing is cached about a failure). Both reach the job as
`model_environment`. pip itself is the worker's, imported through the .pth (a worker image without
pip falls back to the venv's own ensurepip, which is offline too). Crashes of the model process itself are model_process's business.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.config import get_settings
from workers.model_process import ModelProcess

log = logging.getLogger(__name__)

# Bump when the venv layout changes, so hosts rebuild instead of reusing an old layout.
LAYOUT_VERSION = 1
IN_PROCESS = "in_process"
SUBPROCESS = "subprocess"
_COMPLETE = ".complete"
_PTH = "_dreamq_worker_site.pth"
_BUILD_LOCK_TIMEOUT_S = 1800.0
_PIP_TIMEOUT_S = 900.0


class ModelEnvironmentError(RuntimeError):
    """A version's Python environment cannot be provided on this worker (or its build failed)."""


# --- requirement matching: packaging when present, a `==`-only fallback otherwise -------------


def _packaging():
    """(requirements, specifiers, tags, utils, version) modules, or None."""
    for base in ("packaging", "pip._vendor.packaging"):
        try:
            requirements = __import__(f"{base}.requirements", fromlist=["_"])
            specifiers = __import__(f"{base}.specifiers", fromlist=["_"])
            tags = __import__(f"{base}.tags", fromlist=["_"])
            utils = __import__(f"{base}.utils", fromlist=["_"])
            version = __import__(f"{base}.version", fromlist=["_"])
        except ImportError:
            continue
        return requirements, specifiers, tags, utils, version
    return None


_PACKAGING = _packaging()


def canonical_name(name: str) -> str:
    """PEP 503: runs of -, _ and . are one '-', case-insensitive."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Requirement:
    line: str  # as written in the lock (hashes and comments stripped)
    name: str  # canonical
    _spec: Any = field(compare=False, repr=False)  # packaging SpecifierSet, or the pinned version string

    def matches(self, version: str) -> bool:
        if _PACKAGING is not None:
            try:
                return self._spec.contains(version, prereleases=True)
            except Exception:  # an installed version that is not PEP 440 (legacy); no pin can match it
                return False
        if self._spec is None:
            return True
        return _fallback_version_key(version, strip_local="+" not in self._spec) == _fallback_version_key(self._spec)


def _fallback_version_key(version: str, strip_local: bool = False) -> tuple:
    if strip_local:
        version = version.split("+", 1)[0]
    parts = version.strip().lower().split(".")
    # 2.0 == 2.0.0 in PEP 440: trailing zero release segments do not count.
    while len(parts) > 1 and parts[-1] == "0":
        parts.pop()
    return tuple(parts)


_FALLBACK_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?:(===?)\s*([^\s;]+))?\s*(;.*)?$")


def parse_lock(lines: list[str]) -> list[Requirement]:
    """Requirement lines of a lock (pip freeze / pip-tools style), markers evaluated.

    Comments, blank lines, `--hash=` options and continuation backslashes are dropped; other
    option lines (`--index-url`, `-e ...`) say nothing about what must be installed and are
    skipped with a warning. A requirement whose marker is false here does not apply.
    """
    joined: list[str] = []
    pending = ""
    for raw in lines:
        text = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        joined.append(pending + text)
        pending = ""
    if pending:
        joined.append(pending)
    requirements = []
    for text in joined:
        text = re.sub(r"\s--hash[=\s]\S+", "", " " + text).strip()
        if not text:
            continue
        if text.startswith("-"):
            log.warning("ignoring option line in requirements lock", extra={"line": text})
            continue
        if _PACKAGING is not None:
            try:
                req = _PACKAGING[0].Requirement(text)
            except Exception as exc:
                raise ModelEnvironmentError(
                    f"requirements lock line {text!r} is not a valid requirement: {exc}"
                ) from None
            if req.marker is not None and not req.marker.evaluate():
                continue
            requirements.append(Requirement(text, canonical_name(req.name), req.specifier))
        else:
            match = _FALLBACK_LINE.match(text)
            if match is None:
                raise ModelEnvironmentError(
                    f"requirements lock line {text!r}: without the `packaging` library only `name==version` pins are understood"
                )
            requirements.append(Requirement(text, canonical_name(match.group(1)), match.group(4)))
    return requirements


@functools.lru_cache(maxsize=1)
def installed_distributions() -> dict[str, str]:
    """canonical name -> version of what this process can import, first on sys.path winning.

    Cached for the life of the process: a worker's own environment does not change under it.
    """
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata is not None else None
        if name:
            found.setdefault(canonical_name(name), dist.version)
    return found


@functools.lru_cache(maxsize=1)
def _interpreter_tags() -> tuple[list[Any], str]:
    """This interpreter's supported wheel tags, most specific first, and a short description."""
    if _PACKAGING is not None:
        supported = list(_PACKAGING[2].sys_tags())
        return supported, str(supported[0]) if supported else "?"
    major, minor = sys.version_info[:2]
    pure = [f"py{major}{minor}-none-any", f"py{major}-none-any"]
    return pure, f"pure Python only ({pure[0]}; install `packaging` for binary wheels)"


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical
    version: str
    compatible: bool


def _wheel(path: Path) -> Wheel | None:
    supported, _ = _interpreter_tags()
    if _PACKAGING is not None:
        try:
            name, version, _build, wheel_tags = _PACKAGING[3].parse_wheel_filename(path.name)
        except Exception:
            log.warning("ignoring a file in env/wheels that is not a valid wheel name", extra={"path": str(path)})
            return None
        return Wheel(path, canonical_name(str(name)), str(version), bool(set(wheel_tags) & set(supported)))
    parts = path.name[: -len(".whl")].split("-")
    if len(parts) not in (5, 6):
        return None
    tags = {
        f"{py}-{abi}-{plat}"
        for py in parts[-3].split(".")
        for abi in parts[-2].split(".")
        for plat in parts[-1].split(".")
    }
    return Wheel(path, canonical_name(parts[0]), parts[1], bool(tags & set(supported)))


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Missing:
    requirement: Requirement
    installed: str | None  # the worker's version, None when it has no such distribution
    wheel: Wheel | None  # a compatible wheel of the bundle that satisfies it, if any
    rejected: tuple[Wheel, ...] = ()  # wheels with the right name that do not fit (version or tags)


@dataclass(frozen=True)
class Plan:
    mode: str  # IN_PROCESS or SUBPROCESS
    model: str
    version: int
    reason: str
    lock_digest: str  # sha256 of the lock's requirement lines
    python: str  # the Python the version was pushed with ("" when the manifest does not say)
    install: tuple[Missing, ...] = ()  # what the venv installs from the bundle's wheels
    env_dir: Path | None = None

    @property
    def in_process(self) -> bool:
        return self.mode == IN_PROCESS


def default_root() -> Path:
    return Path(get_settings().cache_dir) / "envs"


def _worker_site_dirs() -> list[str]:
    """The worker's site-packages directories, in its own order (what the venv layers on)."""
    dirs = []
    for entry in site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else []):
        if entry not in dirs and os.path.isdir(entry):
            dirs.append(entry)
    return dirs


def _file_sha256(version_dir: Path, rel: str, manifest: dict[str, Any]) -> str:
    # The manifest already holds each file's sha256 (verified by the cache); hash only without it.
    for entry in manifest.get("files", []):
        if entry.get("path") == rel and entry.get("sha256"):
            return str(entry["sha256"])
    digest = hashlib.sha256()
    with (version_dir / rel).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_missing(label: str, missing: Missing) -> str:
    have = f"{missing.requirement.name} {missing.installed}" if missing.installed else "nothing"
    carried = ""
    if missing.rejected:
        _, tag = _interpreter_tags()
        carried = (
            "; the bundle's "
            + ", ".join(w.path.name for w in missing.rejected)
            + (f" do not fit (pin or wheel tags; this interpreter is {tag})")
        )
        return f"{label} needs {missing.requirement.line}, the worker has {have}{carried}"
    return f"{label} needs {missing.requirement.line}, the worker has {have} and the bundle carries no wheel for it"


def plan_for(manifest: dict[str, Any], version_dir: Path, *, root: Path | None = None) -> Plan:
    """How this version runs on this worker; ModelEnvironmentError when it cannot."""
    name = str(manifest.get("name", "?"))
    number = int(manifest.get("version", 0) or 0)
    label = f"model {name} v{number}"
    environment = manifest.get("environment") or {}
    lock_lines = [str(line) for line in environment.get("requirements_lock") or []]
    lock_digest = hashlib.sha256("\n".join(lock_lines).encode()).hexdigest()
    pushed_python = str(environment.get("python") or "")
    here = platform.python_version()

    python_note = ""
    if pushed_python:
        pushed = tuple(pushed_python.split(".")[:2])
        ours = tuple(here.split(".")[:2])
        if pushed[:1] != ours[:1]:
            raise ModelEnvironmentError(
                f"{label} was pushed with Python {pushed_python}; this worker runs Python {here} and builds "
                "environments only with its own interpreter"
            )
        if pushed != ours:
            python_note = f"pushed with Python {pushed_python}, the worker runs {here}"

    requirements = parse_lock(lock_lines)
    installed = installed_distributions()
    wheels_dir = version_dir / "env" / "wheels"
    wheels = (
        [w for w in (_wheel(p) for p in sorted(wheels_dir.glob("*.whl"))) if w is not None]
        if wheels_dir.is_dir()
        else []
    )

    missing: list[Missing] = []
    for req in requirements:
        have = installed.get(req.name)
        if have is not None and req.matches(have):
            continue
        candidates = [w for w in wheels if w.name == req.name]
        fitting = [w for w in candidates if w.compatible and req.matches(w.version)]
        best = _best_wheel(fitting)
        missing.append(Missing(req, have, best, tuple(w for w in candidates if w is not best)))

    unprovided = [m for m in missing if m.wheel is None]
    if unprovided:
        first = unprovided[0]
        message = _describe_missing(label, first)
        if len(unprovided) > 1:
            message += (
                f" (and {len(unprovided) - 1} more: " + ", ".join(m.requirement.line for m in unprovided[1:]) + ")"
            )
        if python_note:
            message += f" ({python_note})"
        raise ModelEnvironmentError(message)

    if not missing and not python_note:
        return Plan(IN_PROCESS, name, number, "the worker's environment satisfies the lock", lock_digest, pushed_python)

    key_material = json.dumps(
        {
            "layout": LAYOUT_VERSION,
            "lock": lock_digest,
            "python": [os.path.realpath(getattr(sys, "_base_executable", sys.executable)), here],
            "site": _worker_site_dirs(),
            "wheels": sorted(
                (
                    m.requirement.name,
                    _file_sha256(version_dir, m.wheel.path.relative_to(version_dir).as_posix(), manifest),
                )
                for m in missing
                if m.wheel is not None
            ),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:32]
    reasons = [f"{m.requirement.line} from {m.wheel.path.name}" for m in missing if m.wheel is not None]
    reason = "venv with " + (", ".join(reasons) if reasons else "nothing extra")
    if python_note:
        reason += f" ({python_note})"
    return Plan(
        SUBPROCESS,
        name,
        number,
        reason,
        lock_digest,
        pushed_python,
        tuple(missing),
        (root if root is not None else default_root()) / key,
    )


def _best_wheel(wheels: list[Wheel]) -> Wheel | None:
    if not wheels:
        return None
    if _PACKAGING is not None:
        parse = _PACKAGING[4].Version
        return max(wheels, key=lambda w: parse(w.version))
    return wheels[-1]


# --- building the venv -------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltEnvironment:
    path: Path
    python: Path
    built: bool  # False: an existing complete venv was reused
    seconds: float


def venv_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _clean_env() -> dict[str, str]:
    # The worker's PIP_* / PYTHON* settings (an index URL, a user install, a PYTHONPATH) must not
    # change how a version's venv is built: the build is a function of the plan only.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(command: list[str], what: str, label: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, env=_clean_env())
    except subprocess.TimeoutExpired:
        raise ModelEnvironmentError(
            f"building the environment of {label}: {what} took over {_PIP_TIMEOUT_S:.0f} s"
        ) from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-2000:]
        raise ModelEnvironmentError(
            f"building the environment of {label}: {what} failed (exit {done.returncode}): {tail}"
        )
    return done.stdout


def ensure_environment(plan: Plan) -> BuiltEnvironment:
    """The plan's venv, built now unless a complete one exists. Safe across processes."""
    from filelock import FileLock

    if plan.in_process or plan.env_dir is None:
        raise ValueError("an in-process plan has no environment to build")
    env_dir = plan.env_dir
    python = venv_python(env_dir)
    started = time.perf_counter()
    if (env_dir / _COMPLETE).is_file():
        return BuiltEnvironment(env_dir, python, False, time.perf_counter() - started)
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(env_dir.parent / f"{env_dir.name}.lock"), timeout=_BUILD_LOCK_TIMEOUT_S):
        if (env_dir / _COMPLETE).is_file():  # another process built it while we waited
            return BuiltEnvironment(env_dir, python, False, time.perf_counter() - started)
        try:
            _build(plan, env_dir, python)
        except BaseException:
            shutil.rmtree(env_dir, ignore_errors=True)
            raise
    seconds = time.perf_counter() - started
    log.info(
        "built model environment",
        extra={
            "model": plan.model,
            "version": plan.version,
            "env": str(env_dir),
            "build_s": round(seconds, 3),
            "reason": plan.reason,
        },
    )
    return BuiltEnvironment(env_dir, python, True, seconds)


def _build(plan: Plan, env_dir: Path, python: Path) -> None:
    import venv

    label = f"model {plan.model} v{plan.version}"
    if env_dir.exists():  # a crash mid-build left it without its marker
        shutil.rmtree(env_dir)
    # The venv must see exactly the worker's site-packages. A worker on the system interpreter gets
    # them from --system-site-packages; a worker in a venv (the usual case) gets them from the .pth,
    # and then the base interpreter's site-packages, which the worker does not see, stay out too.
    # --without-pip: ensurepip costs seconds per venv; the worker's pip is visible through the .pth.
    worker_is_system = sys.prefix == sys.base_prefix
    venv.EnvBuilder(system_site_packages=worker_is_system, with_pip=False, symlinks=os.name != "nt", clear=True).create(
        env_dir
    )
    purelib = _run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        "locating site-packages",
        label,
    ).strip()
    site_dirs = _worker_site_dirs()
    Path(purelib, _PTH).write_text("".join(f"{d}\n" for d in site_dirs))
    wheels = [str(m.wheel.path) for m in plan.install if m.wheel is not None]
    if wheels:
        probe = subprocess.run([str(python), "-I", "-c", "import pip"], capture_output=True, env=_clean_env())
        if probe.returncode != 0:  # a worker image without pip: ensurepip works offline
            _run([str(python), "-I", "-m", "ensurepip", "--default-pip"], "ensurepip", label)
        # The exact wheels the plan validated, never an index: --no-index, and --no-deps because the
        # lock is complete (its other lines are satisfied by the worker or by these wheels).
        # --ignore-installed: the worker's copy of a package is visible through the .pth and must be
        # shadowed, not uninstalled (pip would refuse to touch it anyway: outside this venv).
        _run(
            [
                str(python),
                "-I",
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--ignore-installed",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--no-warn-script-location",
                "--quiet",
                "--only-binary",
                ":all:",
                "--find-links",
                str(Path(wheels[0]).parent),
                *wheels,
            ],
            "pip install " + " ".join(Path(w).name for w in wheels),
            label,
        )
    (env_dir / "dreamq-env.json").write_text(
        json.dumps(
            {
                "model": plan.model,
                "version": plan.version,
                "lock_digest": plan.lock_digest,
                "reason": plan.reason,
                "installed": [
                    {"requirement": m.requirement.line, "wheel": m.wheel.path.name} for m in plan.install if m.wheel
                ],
                "worker_site": site_dirs,
                "python": sys.version.split()[0],
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )
    marker = env_dir / f"{_COMPLETE}.tmp"
    marker.write_text(plan.lock_digest + "\n")
    os.replace(marker, env_dir / _COMPLETE)


def start_model_process(plan: Plan, version_dir: Path, manifest: dict[str, Any], device: Any):
    """Build (or reuse) the plan's venv, start the model's process on it, wait until it loaded."""
    env = ensure_environment(plan)
    proxy = ModelProcess(
        python=env.python,
        version_dir=version_dir,
        entrypoint=manifest["model"]["entrypoint"],
        device=str(device),
        label=f"{plan.model} v{plan.version}",
    )
    proxy.start()
    return proxy
