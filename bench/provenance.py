"""Where a bench figure came from: when it was measured, on which commit, by which code.

Every bench's JSON carries `provenance(__file__)`'s fields, and bench/run_all.py writes them
into bench/results.json and bench/results.md:

    measured_at    UTC, ISO 8601 (seconds)
    commit         `git rev-parse HEAD`, with "-dirty" when the tree has changes other than the
                   results files themselves; on a machine with the working tree but no .git (the
                   GPU machine), DREAMQ_BENCH_COMMIT if set, else "unknown"
    code           the bench script, relative to the repository
    command        the command line that ran it
    source_digest  sha256 of the code a figure depends on (SOURCE_ROOTS, results files left out),
                   computed from the files themselves, so it also identifies the code where git
                   is not available or the tree was dirty: bench/run_all.py treats a figure as a
                   measurement of the current tree only when its digest equals the current one

Standard library only: bench/model_load.py loads this file by path on a bare GPU machine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a measurement depends on: the shipped code, the benches, the schema and the pins.
SOURCE_ROOTS = ("app", "tasks", "workers", "bench", "migrations")
SOURCE_FILES = ("pyproject.toml", "setup.cfg", "requirements.txt", "requirements-dev.txt")
# Outputs of the benches: writing them must not change the digest or make the commit "dirty".
RESULT_PATHS = ("bench/results", "bench/results.md", "bench/results.json", "bench/out")
_SKIP_DIRS = {"__pycache__", ".pytest_cache", "node_modules", ".mypy_cache", ".ruff_cache"}


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def current_commit() -> str:
    """HEAD, "-dirty" when anything but the results files differs from it (untracked files too)."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return os.environ.get("DREAMQ_BENCH_COMMIT") or "unknown"
    excludes = [f":(exclude){p}" for p in RESULT_PATHS]
    status = _git("status", "--porcelain", "--", ".", *excludes)
    return head.strip() + ("-dirty" if status is None or status.strip() else "")


def _is_result(rel: str) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in RESULT_PATHS)


def source_digest() -> str:
    h = hashlib.sha256()
    paths: list[Path] = [ROOT / f for f in SOURCE_FILES if (ROOT / f).is_file()]
    for top in SOURCE_ROOTS:
        for dirpath, dirnames, filenames in os.walk(ROOT / top):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            paths += [Path(dirpath) / f for f in filenames if not f.endswith((".pyc", ".pyo"))]
    for path in sorted(paths, key=lambda p: p.relative_to(ROOT).as_posix()):
        rel = path.relative_to(ROOT).as_posix()
        if _is_result(rel) or not path.is_file():
            continue
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def provenance(script: str | os.PathLike[str], argv: list[str] | None = None) -> dict[str, str]:
    """The fields every bench's JSON carries (see the module docstring)."""
    path = Path(script).resolve()
    try:
        code = path.relative_to(ROOT).as_posix()
    except ValueError:
        code = str(path)
    args = sys.argv[1:] if argv is None else argv
    return {
        "measured_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "commit": current_commit(),
        "code": code,
        "command": shlex.join(["python", code, *args]),
        "source_digest": source_digest(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps({"commit": current_commit(), "source_digest": source_digest()}))
