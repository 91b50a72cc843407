"""Luma's official TypeScript/JavaScript client (`lumaai` on npm, unmodified) against a running dreamq.

The npm package is pinned in tests/fixtures/node/package.json and package-lock.json (one version,
in one place) and installed with `npm ci` into .dreamq/node-cache/<hash of the two files>, once
per lock. tests/fixtures/node/luma_client.mjs then does what a user of the client does against
the gunicorn API and the session's real workers (the same fixtures as the Python client's test,
tests/e2e/conftest.py): ping, credits, create, get until completed, download assets.video, list,
delete, an unknown model (BadRequestError 400) and a bad key (AuthenticationError 401). It prints
one JSON line of what it saw; this test asserts on it and decodes the video it downloaded.

When node or npm is missing, or `npm ci` cannot reach the registry, the test skips locally and
fails under CI=true, naming what to install (tests.support.system_deps; `make system-packages`
installs Debian's nodejs and npm); any other failure (an install that fails for another reason,
the script, an assertion) fails the test everywhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from app.core.media import decode_video, probe_video
from tests.support.frames import dominant_colour, motion_direction
from tests.support.system_deps import missing

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "fixtures" / "node"
CACHE = ROOT / ".dreamq" / "node-cache"
PINNED = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["lumaai"]
# What npm prints when it cannot reach the registry (DNS, refused, reset, unreachable, offline).
NETWORK_ERRORS = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "EHOSTUNREACH",
    "ENOTCACHED",
    "npm error network",
    "npm ERR! network",
)
INSTALL_TIMEOUT_S = 180
NODE_INSTALL = "apt-get install nodejs npm (`make system-packages` does, as root)"
REGISTRY_ACCESS = "network access to the npm registry for `npm ci` (once per lock: .dreamq/node-cache keeps it)"


def node_and_npm() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        absent = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        missing(f"{absent} not on PATH (Luma's TypeScript client, lumaai on npm, runs on node)", install=NODE_INSTALL)
    return node, npm


@pytest.fixture(scope="session")
def lumaai_node() -> tuple[str, Path]:
    """(node, the directory whose node_modules holds the pinned lumaai), installed once per lock."""
    node, npm = node_and_npm()
    manifest = [(NODE_DIR / name).read_bytes() for name in ("package.json", "package-lock.json")]
    target = CACHE / hashlib.sha256(b"\0".join(manifest)).hexdigest()[:16]
    if (target / "node_modules" / "lumaai" / "package.json").is_file():
        return node, target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=CACHE))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(NODE_DIR / name, staging / name)
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            missing(
                f"npm ci of lumaai@{PINNED} did not finish in {INSTALL_TIMEOUT_S} s: no network to the npm registry?",
                install=REGISTRY_ACCESS,
            )
        output = result.stdout + result.stderr
        if result.returncode != 0:
            if any(marker in output for marker in NETWORK_ERRORS):
                why = [line for line in output.splitlines() if any(m in line for m in NETWORK_ERRORS)][:3]
                missing(f"npm ci of lumaai@{PINNED} cannot reach the npm registry: {' | '.join(why)}", REGISTRY_ACCESS)
            pytest.fail(f"npm ci of lumaai@{PINNED} failed (exit {result.returncode}):\n{output[-3000:]}")
        try:
            staging.rename(target)  # atomic: a concurrent run sees all of it or none
        except OSError:
            if not (target / "node_modules" / "lumaai" / "package.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return node, target


def run_client(node: str, install: Path, workdir: Path, **args) -> dict:
    """Run luma_client.mjs with `args`; the JSON line it printed. ESM resolves packages next to the
    script, not through NODE_PATH, so the script runs from a copy beside a link to node_modules."""
    script = workdir / "luma_client.mjs"
    shutil.copy(NODE_DIR / "luma_client.mjs", script)
    (workdir / "node_modules").symlink_to(install / "node_modules", target_is_directory=True)
    result = subprocess.run(
        [node, str(script), json.dumps(args)], cwd=workdir, capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output (exit {result.returncode}):\n{result.stderr[-3000:]}"
    seen = json.loads(lines[-1])
    assert result.returncode == 0 and "error" not in seen, (
        f"exit {result.returncode}: {seen.get('error')}\nsaw: {seen}\nstderr: {result.stderr[-3000:]}"
    )
    return seen


def test_the_official_typescript_client(lumaai_node, api_url, mapped, make_user, tmp_path):
    node, install = lumaai_node
    _, key = make_user("api")
    video = tmp_path / "video.mp4"
    seen = run_client(
        node,
        install,
        tmp_path,
        baseURL=f"{api_url}/dream-machine/v1",
        authToken=key,
        videoPath=str(video),
        timeoutMs=45_000,
    )
    assert seen["clientVersion"] == PINNED

    assert seen["ping"] == {"message": "pong"}
    assert seen["credits"]["credit_balance"] > 0

    created = seen["created"]
    assert created["state"] == "queued" and created["model"] == "ray-2" and created["generation_type"] == "video"
    done = seen["done"]
    assert done["id"] == created["id"] and done["state"] == "completed", done
    assert done["failure_reason"] is None and done["model"] == "ray-2"
    assert done["request"]["prompt"] == "a red circle moving right" and done["request"]["aspect_ratio"] == "16:9"
    assert dt.datetime.fromisoformat(done["created_at"]).tzinfo is not None
    assert done["assets"]["video"].startswith("http") and done["assets"]["image"].startswith("http")

    # The video the client's user downloaded: a real H.264 MP4 of what was asked for.
    assert seen["video"]["status"] == 200 and seen["video"]["contentType"] == "video/mp4", seen["video"]
    assert seen["video"]["ftyp"] == "ftyp" and seen["video"]["length"] == video.stat().st_size
    data = video.read_bytes()
    info = probe_video(data)
    # 16:9 from the demo model's 128 px default short side; 2 s at its 12 fps.
    assert (info.format, info.codec, info.width, info.height, info.frames) == (
        "mov,mp4,m4a,3gp,3g2,mj2",
        "h264",
        228,
        128,
        24,
    )
    frames = decode_video(data, width=info.width, height=info.height, num_frames=info.frames)
    assert dominant_colour(frames) == "red" and motion_direction(frames) == "right"

    assert seen["listed"]["ids"] == [created["id"]] and seen["listed"]["has_more"] is False
    assert seen["deleted"]["threw"] is False, seen["deleted"]
    assert seen["afterDelete"]["isNotFound"] and seen["afterDelete"]["status"] == 404, seen["afterDelete"]
    assert seen["listedAfterDelete"] == []

    unknown = seen["unknownModel"]
    assert unknown["isBadRequest"] and unknown["isAPIError"] and unknown["status"] == 400, unknown
    assert "'ray-99' is not a model this server serves" in unknown["body"]["detail"]
    bad_key = seen["badKey"]
    assert bad_key["isAuthentication"] and bad_key["status"] == 401, bad_key
    assert bad_key["body"]["detail"]


@pytest.mark.parametrize(
    ("ci", "outcome", "says"),
    [
        ("true", pytest.fail.Exception, "missing system dependency under CI=true"),
        ("", pytest.skip.Exception, "node and npm not on PATH"),
    ],
    ids=["ci-fails", "local-skips"],
)
def test_without_node_on_path_ci_fails_and_a_local_run_skips(monkeypatch, tmp_path, ci, outcome, says):
    """The rule of tests.support.system_deps, on the node lookup this file's fixture makes."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: neither node nor npm
    monkeypatch.setenv("CI", ci)
    # Caught by hand: a skip escaping pytest.raises would make this test a skip, not a failure.
    try:
        node_and_npm()
    except (pytest.fail.Exception, pytest.skip.Exception) as raised:
        seen, message = type(raised), str(raised)
    else:
        raise AssertionError("node_and_npm() returned with neither node nor npm on PATH")
    assert seen is outcome, f"{seen.__name__}: {message}"
    assert says in message and f"install: {NODE_INSTALL}" in message, message
