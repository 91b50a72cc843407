"""One rule for a test whose system dependency is missing: skip locally, fail under CI.

    from tests.support.system_deps import missing
    if shutil.which("node") is None:
        missing("node is not on PATH", install="apt-get install nodejs npm (`make system-packages`)")

On a developer's machine a missing browser, Slurm or node is a skip that says what to install.
CI (CI=true, as .ci/run runs) installs every one of them first (`make system-packages`), so there
a missing one is a broken install step, and the test fails with the same message instead of
passing as a skip. CUDA is the one dependency CI cannot provide: the CUDA skips
(tests/unit/workers) do not come here.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """CI=true (or any value but empty, 0, false, no): how .ci/run and hosted CI runners say so."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, install: str) -> NoReturn:
    """Skip (locally) or fail (under CI) the running test: `what` is missing, `install` provides it."""
    message = f"{what}; install: {install}"
    if in_ci():
        pytest.fail(f"missing system dependency under CI=true (a skip here would hide it): {message}", pytrace=False)
    pytest.skip(message)
