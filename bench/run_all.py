"""`make bench`: every benchmark, one after another, into bench/results.md and bench/results.json.

    .venv/bin/python -m bench.run_all [--quick] [--only intake,control_plane,...] [--skip ...]

Each bench is its own script (run it alone for its full table and options) and is run here as a
subprocess with --json: it prints one JSON object whose entries are
`{"<name>": {"baseline": x, "ours": y, "ratio": y/x, "unit": ..., ...}}`. This driver only
collects them, adds the run's date and machine, and writes:

  bench/results.json   {"<name>": {...}, "_meta": {...}}   (every field each bench reported)
  bench/results.md     the table the README links, one row per entry, goal and whether it is met

Ratios are ours/baseline measured in the same run, interleaved, by each bench; on this noisy
2-core machine the absolute figures alone mean little. Figures that need a GPU come from
bench/gpu_checks.sh on a GPU machine (torch, numpy and safetensors are all it needs); when this
machine has no CUDA, the last recorded ones under bench/results/gpu/ are shown in their own
section with their date and device, never mixed into this run's rows.

A bench that fails or runs past its time limit is reported as such in the table and the run
exits 1 after writing what it has.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "results.md"
RESULTS_JSON = ROOT / "bench" / "results.json"
GPU_RESULTS = ROOT / "bench" / "results" / "gpu"

# name -> (argv after the interpreter, time limit in seconds, quick argv). The sum of the limits
# stays under the 15 minutes `make bench` is allowed; the usual total is well below.
BENCHES: dict[str, tuple[list[str], int, list[str]]] = {
    # Usual times here: intake 140 s, control_plane 96 s, latency 67 s, dispatch_scale about
    # 300 s (65 s of it seeding 1M jobs), model_load 61 s.
    "intake": (["bench/intake.py", "--json"], 190, ["--quick"]),
    "control_plane": (["bench/control_plane.py", "--json"], 140, ["--quick"]),
    "latency": (["bench/latency.py", "--json"], 110, ["--quick"]),
    "dispatch_scale": (["bench/dispatch_scale.py", "--json", "--decisions", "10240"], 380, ["--quick"]),
    "model_load": (
        ["bench/model_load.py", "--json", "--size-mb", "1024", "--rounds", "3"],
        80,
        ["--size-mb", "256", "--rounds", "2"],
    ),
}

# What each entry must reach, as (comparison, value, on which field).
GOALS: dict[str, tuple[str, float, str]] = {
    "intake": (">=", 0.6, "ratio"),
    "control_plane": (">=", 0.8, "ratio"),
    "latency_running_p50": ("<=", 20.0, "ours"),
    "latency_running_p99": ("<=", 100.0, "ours"),
    "dispatch_10000": (">=", 2000.0, "ours"),
    "dispatch_100000": (">=", 2000.0, "ours"),
    "dispatch_1000000": (">=", 2000.0, "ours"),
    "model_load_cold": (">=", 0.9, "ratio"),
    # Warm loads are judged against pinned H2D on a GPU; on CPU the baseline is a host memcpy
    # into memory the copy already owns, which no loader allocating fresh buffers can match.
    "gpu_model_load_cold": (">=", 0.9, "ratio"),
    "gpu_model_load_warm": (">=", 0.5, "ratio"),
    "gpu_model_load_warm_cuda_defaults": (">=", 0.5, "ratio"),
    "gpu_busy_dit": (">=", 0.95, "ours"),
}


def _last_json_line(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in its output")


def normalise(name: str, data: dict) -> dict[str, dict]:
    """Each bench's JSON as entries of {baseline, ours, ratio, unit}."""
    if name == "dispatch_scale":
        return {
            f"dispatch_{size}": {
                "baseline": data["baseline"][size],
                "ours": ours,
                "ratio": data["ratio"][size],
                "unit": data.get("unit", "decisions/s"),
                "baseline_name": "naive ORDER BY + per-user count(*) + SKIP LOCKED dispatcher",
            }
            for size, ours in data["sizes"].items()
        }
    if name == "model_load":
        gbps, base = data["gbps"], data["baseline"]
        common = {
            "unit": "GB/s",
            "device": data.get("device_name", data.get("device")),
            "size_bytes": data.get("size_bytes"),
            "cold_is_cold": data.get("cold_is_cold"),
        }
        return {
            "model_load_cold": {
                "baseline": base["disk_cold"],
                "ours": gbps["ours_cold"],
                "ratio": gbps["ours_cold"] / base["disk_cold"],
                "baseline_name": "cold disk read",
                **common,
            },
            "model_load_warm": {
                "baseline": base["warm"],
                "ours": gbps["ours_warm"],
                "ratio": gbps["ours_warm"] / base["warm"],
                "baseline_name": base.get("warm_name"),
                "torch_load_warm": gbps.get("torch_load_warm"),
                **common,
            },
        }
    # Entries are the dict values; a bench's scalar extras (e.g. its total_s) are not rows.
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def goal_text(entry_name: str, entry: dict) -> tuple[str, str]:
    goal = GOALS.get(entry_name)
    if goal is None:
        return "", ""
    op, value, field = goal
    have = entry.get(field)
    if have is None:
        return f"{field} {op} {value:g}", "?"
    met = have >= value if op == ">=" else have <= value
    return f"{field} {op} {value:g}", "met" if met else "**missed**"


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def table(entries: dict[str, dict]) -> list[str]:
    lines = ["| bench | baseline | ours | ratio (ours/baseline) | unit | goal | |", "|---|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        if "error" in entry:
            lines.append(f"| {name} | | | | | | **failed**: {entry['error']} |")
            continue
        goal, met = goal_text(name, entry)
        ratio = entry.get("ratio")
        lines.append(
            f"| {name} | {fmt(entry.get('baseline'))} | {fmt(entry.get('ours'))} | "
            f"{fmt(ratio) + '×' if ratio is not None else ''} | {entry.get('unit', '')} | {goal} | {met} |"
        )
    return lines


def machine() -> str:
    cores = os.cpu_count()
    try:
        mem_kb = int(
            next(
                line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
            ).split()[1]
        )
        mem = f", {mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = ""
    return f"{platform.node()}: {cores} cores{mem}, {platform.machine()}, Python {platform.python_version()}"


def recorded_gpu() -> tuple[list[str], dict]:
    """The last GPU run (bench/gpu_checks.sh), shown apart from this run."""
    entries, lines = {}, []
    load = GPU_RESULTS / "model_load.json"
    busy = GPU_RESULTS / "gpu_busy.json"
    if not load.is_file() and not busy.is_file():
        return [], {}
    device = (
        (GPU_RESULTS / "gpu.txt").read_text().strip().replace("\n", ", ")
        if (GPU_RESULTS / "gpu.txt").is_file()
        else "GPU"
    )
    when = dt.datetime.fromtimestamp(
        max(p.stat().st_mtime for p in (load, busy) if p.is_file()), dt.timezone.utc
    ).date()
    if load.is_file():
        data = json.loads(load.read_text())
        entries.update({f"gpu_{k}": v for k, v in normalise("model_load", data).items()})
        # The sweep's run of the settings that are now the CUDA defaults (workers/loading.py).
        tuned = data.get("gbps", {}).get("sweep_warm_r16_c32_s4")
        if tuned:
            warm = data["baseline"]["warm"]
            entries["gpu_model_load_warm_cuda_defaults"] = {
                "baseline": warm,
                "ours": tuned,
                "ratio": tuned / warm,
                "unit": "GB/s",
                "baseline_name": data["baseline"].get("warm_name"),
                "options": "16 readers, 32 MiB, 4 streams",
            }
    if busy.is_file():
        for name, entry in json.loads(busy.read_text()).items():
            entries[name] = {k: entry.get(k) for k in ("baseline", "ours", "ratio", "unit", "baseline_name")}
    lines = [f"## Recorded on a GPU machine ({device}; `bench/gpu_checks.sh`, files of {when})", ""]
    lines += table(entries)
    return lines, {k: {**v, "recorded": str(when), "device": device} for k, v in entries.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each bench's --quick (about a third of the time)")
    parser.add_argument("--only", default="", help="comma-separated bench names")
    parser.add_argument("--skip", default="", help="comma-separated bench names")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave the results files alone")
    args = parser.parse_args()
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    unknown = (only | skip) - set(BENCHES)
    if unknown:
        parser.error(f"unknown bench(es): {', '.join(sorted(unknown))}; known: {', '.join(BENCHES)}")

    started_at = dt.datetime.now(dt.timezone.utc)
    entries: dict[str, dict] = {}
    timings: dict[str, float] = {}
    failed = False
    for name, (argv, limit, quick_argv) in BENCHES.items():
        if (only and name not in only) or name in skip:
            continue
        cmd = [sys.executable, *argv, *(quick_argv if args.quick else [])]
        print(f"[bench] {name}: {' '.join(cmd[1:])} (limit {limit} s)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=None,
                text=True,
                timeout=limit,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
            )
            if proc.returncode != 0:
                raise RuntimeError(f"exit status {proc.returncode}")
            entries.update(normalise(name, _last_json_line(proc.stdout)))
        except subprocess.TimeoutExpired:
            entries[name] = {"error": f"ran past its {limit} s limit"}
            failed = True
        except (RuntimeError, ValueError, KeyError) as exc:
            entries[name] = {"error": str(exc)}
            failed = True
        timings[name] = round(time.monotonic() - t0, 1)
        print(f"[bench] {name}: {timings[name]} s", file=sys.stderr, flush=True)

    total = round(sum(timings.values()), 1)
    meta = {
        "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "quick": args.quick,
        "seconds": timings,
        "seconds_total": total,
    }
    lines = [
        f"# dreamq benchmarks: {meta['date']}, {meta['machine']}",
        "",
        f"`make bench`{' (--quick)' if args.quick else ''}, {total:.0f} s in all. Ratios are ours/baseline "
        "measured in the same run, interleaved; medians over rounds. What each row measures: the "
        "docstring of `bench/<name>.py`; README, Benchmarks.",
        "",
    ]
    lines += table(entries)
    gpu_lines, gpu_entries = recorded_gpu()
    if gpu_lines:
        lines += ["", *gpu_lines]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS_MD.write_text(text)
        RESULTS_JSON.write_text(json.dumps({**entries, **gpu_entries, "_meta": meta}, indent=2, default=str) + "\n")
        print(f"wrote {RESULTS_MD.relative_to(ROOT)} and {RESULTS_JSON.relative_to(ROOT)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
