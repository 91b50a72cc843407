"""`make bench`: every benchmark, one after another, into bench/results.md and bench/results.json.

    .venv/bin/python -m bench.run_all [--quick] [--only intake,control_plane,...] [--skip ...]

Each bench is its own script (run it alone for its full table and options) and is run here as a
subprocess with --json: it prints one JSON object whose entries are
`{"<name>": {"baseline": x, "ours": y, "ratio": y/x, "unit": ..., ...}}` beside the fields of
bench/provenance.py (measured_at, commit, code, command, source_digest). This driver collects
them, adds the run's date, commit and machine, and writes:

  bench/results.json   {"<name>": {...}, "_benches": {...}, "_gpu_files": {...}, "_meta": {...}}
                       every row with every field its bench reported and its provenance; the
                       whole JSON of each bench under _benches (the sweep of model_load, say)
  bench/results.md     the table the README links, one row per entry, goal and whether it is
                       met, then where each row came from (script, command, date, commit)

Ratios are ours/baseline measured in the same run, interleaved in rounds, by each bench; on this
noisy 2-core machine the absolute figures alone mean little. Figures that need a GPU come from
bench/gpu_checks.sh on a GPU machine, stored under bench/results/gpu/ with the date, commit and
source digest they were measured at (in the JSON itself, never the files' modification time).
They are shown in their own section, as results only when their source digest is this tree's
(the same code: committing the results afterwards does not make them stale); otherwise each row
says "not measured on this commit" and the last measurement is shown apart, as history, with
its date, commit and the code that produced it.

A bench that fails or runs past its time limit is reported as such in the table and the run
exits 1 after writing what it has.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.provenance import current_commit, source_digest  # noqa: E402

RESULTS_MD = ROOT / "bench" / "results.md"
RESULTS_JSON = ROOT / "bench" / "results.json"
GPU_RESULTS = ROOT / "bench" / "results" / "gpu"
# The GPU files bench/gpu_checks.sh writes, and the prefix their rows get here.
GPU_FILES = {"model_load.json": "model_load", "gpu_busy.json": "gpu_busy"}
PROVENANCE_FIELDS = ("measured_at", "commit", "code", "command", "source_digest")
NOT_MEASURED = "not measured on this commit"

# name -> (argv after the interpreter, time limit in seconds, argv with --quick). The sum of the limits
# stays under the 15 minutes `make bench` is allowed; the usual total is well below.
BENCHES: dict[str, tuple[list[str], int, list[str]]] = {
    # Usual times here: intake 140 s, control_plane 96 s, latency 67 s, dispatch_scale about
    # 300 s (65 s of it seeding 1M jobs), model_load 61 s.
    "intake": (["bench/intake.py", "--json"], 190, ["bench/intake.py", "--json", "--quick"]),
    "control_plane": (["bench/control_plane.py", "--json"], 140, ["bench/control_plane.py", "--json", "--quick"]),
    "latency": (["bench/latency.py", "--json"], 110, ["bench/latency.py", "--json", "--quick"]),
    "dispatch_scale": (
        ["bench/dispatch_scale.py", "--json", "--decisions", "10240"],
        380,
        ["bench/dispatch_scale.py", "--json", "--quick"],
    ),
    "model_load": (
        ["bench/model_load.py", "--json", "--size-mb", "1024", "--rounds", "3"],
        80,
        ["bench/model_load.py", "--json", "--size-mb", "256", "--rounds", "2"],
    ),
}

# What each entry must reach, as (comparison, value, on which field). Only runs of the shipped
# code have goals: a sweep's settings are never a row here.
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
    "gpu_busy_dit": (">=", 0.95, "ours"),
}


def _last_json_line(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in its output")


def provenance_of(data: dict) -> dict:
    """The provenance a bench stored in its JSON; for the GPU files recorded before benches stored
    any, the `provenance_added` block written from git log (date and commit then stay None)."""
    prov = {k: data.get(k) for k in PROVENANCE_FIELDS}
    if not any(prov.values()):  # benches that store it in each entry (bench/gpu_busy.py)
        inner = next((v for v in data.values() if isinstance(v, dict) and v.get("measured_at")), {})
        prov = {k: inner.get(k) for k in PROVENANCE_FIELDS}
    added = data.get("provenance_added")
    if isinstance(added, dict):
        for key, value in added.items():
            if prov.get(key) is None:
                prov[key] = value
    return prov


def model_load_rows(data: dict, prefix: str = "") -> dict[str, dict]:
    gbps, base = data["gbps"], data["baseline"]
    common = {
        "unit": "GB/s",
        "device": data.get("device_name", data.get("device")),
        "size_bytes": data.get("size_bytes"),
        "rounds": data.get("rounds"),
        "cold_is_cold": data.get("cold_is_cold"),
        "bit_exact": data.get("bit_exact"),
        "options": data.get("options"),
        # False when a flag overrode the loader's defaults; None in files older than the field.
        "shipped_defaults": data.get("shipped_defaults"),
    }
    paired = data.get("ratio_paired") or {}
    return {
        f"{prefix}model_load_cold": {
            "baseline": base["disk_cold"],
            "ours": gbps["ours_cold"],
            "ratio": gbps["ours_cold"] / base["disk_cold"],
            "ratio_paired": paired.get("ours_cold_vs_disk_cold"),
            "baseline_name": "cold disk read",
            **common,
        },
        f"{prefix}model_load_warm": {
            "baseline": base["warm"],
            "ours": gbps["ours_warm"],
            "ratio": gbps["ours_warm"] / base["warm"],
            "ratio_paired": paired.get(f"ours_warm_vs_{base.get('warm_name')}"),
            "baseline_name": base.get("warm_name"),
            "torch_load_warm": gbps.get("torch_load_warm"),
            "safetensors_warm": gbps.get("safetensors_warm"),
            **common,
        },
    }


def normalise(name: str, data: dict) -> dict[str, dict]:
    """Each bench's JSON as entries of {baseline, ours, ratio, unit, ...}, every field kept."""
    if name == "dispatch_scale":
        return {
            f"dispatch_{size}": {
                "baseline": data["baseline"][size],
                "ours": ours,
                "ratio": data["ratio"][size],
                "unit": data.get("unit", "decisions/s"),
                "rounds": data.get("rounds"),
                "decisions": data.get("decisions"),
                "baseline_name": "naive ORDER BY + per-user count(*) + SKIP LOCKED dispatcher",
            }
            for size, ours in data["sizes"].items()
        }
    if name == "model_load":
        return model_load_rows(data)
    # Entries are the dicts with a figure; scalars (total_s, the provenance) and other blocks are
    # the bench's own and stay in _benches.
    return {k: v for k, v in data.items() if isinstance(v, dict) and ("ours" in v or "error" in v)}


def sweep_lines(data: dict) -> list[str]:
    """model_load's sweep (other loader settings, same rounds) as its own table: never rows."""
    sweep = data.get("sweep") or {}
    warm_name = data.get("baseline", {}).get("warm_name", "pinned_h2d")
    settings = [
        (e["readers"], e["chunk_mb"], e["streams"], e["gbps"], e.get(f"ratio_vs_{warm_name}"))
        for e in sweep.get("warm", [])
    ]
    interleaved = bool(settings)
    if not settings:  # files from before the `sweep` key: gbps.sweep_warm_r16_c32_s4 and the like
        warm = data.get("baseline", {}).get("warm")
        for key, value in data.get("gbps", {}).items():
            m = re.fullmatch(r"sweep_warm_r(\d+)_c([\d.]+)_s(\d+)", key)
            if m:
                r, c, s = m.groups()
                settings.append((int(r), float(c), int(s), value, value / warm if warm else None))
    if not settings:
        return []
    lines = [
        "",
        "Sweep of loader settings, warm (`--sweep-warm`, "
        + ("timed in the same interleaved rounds as ours" if interleaved else "timed after ours, in a block of its own")
        + f"; other settings than ours, so no goal; ours ran with {data.get('options')}):",
        "",
        f"| readers | chunk MiB | streams | GB/s | vs {warm_name} |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r, c, s, value, ratio in settings:
        lines.append(f"| {r} | {c:g} | {s} | {fmt(value)} | {fmt(ratio) + '×' if ratio is not None else ''} |")
    return lines


def goal_text(entry_name: str, entry: dict) -> tuple[str, str]:
    goal = GOALS.get(entry_name)
    if goal is None:
        return "", ""
    op, value, field = goal
    text = f"{field} {op} {value:g}"
    if entry.get("status") == NOT_MEASURED:
        return text, NOT_MEASURED
    if entry.get("shipped_defaults") is False:
        return text, "not the shipped defaults (options overridden)"
    have = entry.get(field)
    if have is None:
        return text, "?"
    met = have >= value if op == ">=" else have <= value
    return text, "met" if met else "**missed**"


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


def table(entries: dict[str, dict], then: bool = False) -> list[str]:
    """The rows; then=True for history: whether a goal was met is said of that measurement."""
    lines = ["| bench | baseline | ours | ratio (ours/baseline) | unit | goal | |", "|---|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        if "error" in entry:
            lines.append(f"| {name} | | | | | | **failed**: {entry['error']} |")
            continue
        goal, met = goal_text(name, entry)
        if then and met:
            met += " (then)"
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


def same_code(prov: dict, here: dict) -> tuple[bool, str]:
    """Whether a stored figure measured the code of this tree, and why (or why not)."""
    digest, commit = prov.get("source_digest"), prov.get("commit")
    if digest:
        if digest == here["source_digest"]:
            return True, "its source digest is this tree's"
        return (
            False,
            f"the code differs from this tree's (source digest {digest[7:19]}, here {here['source_digest'][7:19]})",
        )
    if not commit or commit == "unknown":
        return False, "the file stores no commit and no source digest"
    if commit == here["commit"] and not commit.endswith("-dirty"):
        return True, "its commit is this tree's"
    return False, f"it was measured on {commit[:12]}, this tree is {here['commit'][:12]}"


def describe(prov: dict) -> str:
    parts = [f"measured at: {prov.get('measured_at') or 'not stored'}", f"commit: {prov.get('commit') or 'not stored'}"]
    if prov.get("recorded_in_commit"):
        parts.append(f"first recorded in {prov['recorded_in_commit'][:7]} ({prov.get('recorded_at')})")
    text = ", ".join(parts)
    if prov.get("command"):
        text += f"; command: `{prov['command']}`"
    if prov.get("code"):
        text += f"; code: {prov['code']}"
    return text


def entry_notes(name: str, entry: dict) -> list[str]:
    """What a reader must know to weigh a GPU figure: assumed round trips, time by phase."""
    notes = []
    sleeps = entry.get("sleeps")
    if sleeps:
        assumed = ", ".join(f"{k} {v:g}" for k, v in sleeps.items())
        notes.append(
            f"  - `{name}`: the round trips to Postgres and S3 were `time.sleep`s of assumed durations ({assumed}), "
            "in a replay of the job loop, not the shipped worker code; sleeps hold no CPU or GIL"
        )
    for key, value in entry.items():
        if not (isinstance(value, dict) and ("phase" in key or key == "steps_s")):
            continue
        # {phase: figure}, or {"baseline": {phase: figure}, "ours": {...}}
        groups = value.items() if all(isinstance(v, dict) for v in value.values()) else [("", value)]
        for side, figures in groups:
            parts = ", ".join(f"{k} {fmt(v)}" for k, v in figures.items() if isinstance(v, (int, float)))
            notes.append(f"  - `{name}` {key}{' ' + side if side else ''}: {parts}")
    return notes


def recorded_gpu(here: dict) -> tuple[list[str], dict, dict]:
    """The last GPU run (bench/gpu_checks.sh), apart from this run: results only when measured on
    this tree's code, else "not measured on this commit" and the last figures as history."""
    files = {f: GPU_RESULTS / f for f in GPU_FILES if (GPU_RESULTS / f).is_file()}
    if not files:
        return [], {}, {}
    device = (
        (GPU_RESULTS / "gpu.txt").read_text().strip().replace("\n", ", ")
        if (GPU_RESULTS / "gpu.txt").is_file()
        else "GPU"
    )
    raw: dict[str, dict] = {}
    shown: dict[str, dict] = {}  # the rows of the table: figures, or NOT_MEASURED
    stored: dict[str, dict] = {}  # every row as its file has it, with provenance
    history: list[str] = []
    current_lines: list[str] = []
    for fname, path in files.items():
        data = json.loads(path.read_text())
        raw[fname] = data
        prov = provenance_of(data)
        ok, why = same_code(prov, here)
        rows = model_load_rows(data, "gpu_") if GPU_FILES[fname] == "model_load" else normalise("gpu_busy", data)
        for name, entry in rows.items():
            full = {**entry, **{k: v for k, v in prov.items() if v is not None}, "file": f"bench/results/gpu/{fname}"}
            stored[name] = {**full, "current": ok, "why": why}
            shown[name] = full if ok else {"status": NOT_MEASURED, "unit": entry.get("unit")}
        lines = current_lines if ok else history
        lines.append(f"- `bench/results/gpu/{fname}` ({why}): {describe(prov)}")
        for name, entry in rows.items():
            lines += entry_notes(name, entry)
        if GPU_FILES[fname] == "model_load":
            sweep = sweep_lines(data)
            if sweep:
                lines += ["", *("  " + ln if ln else "" for ln in sweep[1:]), ""]
    lines = [f"## Recorded on a GPU machine ({device}; `bench/gpu_checks.sh`)", ""]
    lines += table(shown)
    if current_lines:
        lines += ["", "Measured on this tree's code:", "", *current_lines]
    if history:
        old = {k: v for k, v in stored.items() if not v["current"]}
        lines += [
            "",
            f"### Last measurements (history: {NOT_MEASURED}, not results of this tree)",
            "",
            *history,
            "",
            *table(old, then=True),
        ]
    results = {
        name: (
            {**stored[name], "device_txt": device}
            if stored[name]["current"]
            else {
                "status": NOT_MEASURED,
                "unit": stored[name].get("unit"),
                "history": {**stored[name], "device_txt": device},
            }
        )
        for name in stored
    }
    return lines, results, raw


def provenance_table(benches: dict[str, dict]) -> list[str]:
    lines = ["| bench | code | command | measured at (UTC) | commit |", "|---|---|---|---|---|"]
    for name, prov in benches.items():
        lines.append(
            f"| {name} | {prov.get('code') or ''} | `{prov.get('command') or ''}` | {prov.get('measured_at') or ''} | "
            f"{prov.get('commit') or ''} |"
        )
    return lines


def render(entries: dict[str, dict], raw: dict[str, dict], meta: dict, here: dict) -> tuple[str, dict]:
    """bench/results.md's text and bench/results.json's object for one run."""
    lines = [
        f"# dreamq benchmarks: {meta['date']}, {meta['machine']}",
        "",
        f"`{meta['command']}` on commit {here['commit']}, {meta['seconds_total']:.0f} s in all. Ratios are "
        "ours/baseline measured in the same run, interleaved in rounds; medians over rounds. What each row measures: "
        "the docstring of `bench/<name>.py`; docs/benchmarks.md.",
        "",
    ]
    lines += table(entries)
    if "model_load" in raw:
        lines += sweep_lines(raw["model_load"])
    if meta["benches"]:
        lines += ["", "Where each row came from (stored in its bench's JSON):", "", *provenance_table(meta["benches"])]
    gpu_lines, gpu_entries, gpu_raw = recorded_gpu(here)
    if gpu_lines:
        lines += ["", *gpu_lines]
    out = {**entries, **gpu_entries, "_benches": raw, "_gpu_files": gpu_raw, "_meta": meta}
    return "\n".join(lines) + "\n", out


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
    here = {"commit": current_commit(), "source_digest": source_digest()}
    entries: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    benches: dict[str, dict] = {}
    timings: dict[str, float] = {}
    failed = False
    for name, (argv, limit, quick_argv) in BENCHES.items():
        if (only and name not in only) or name in skip:
            continue
        cmd = [sys.executable, *(quick_argv if args.quick else argv)]
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
            data = _last_json_line(proc.stdout)
            raw[name] = data
            prov = provenance_of(data)
            if not prov.get("measured_at"):  # a bench that stores none: say so rather than guess silently
                prov = {
                    "measured_at": started_at.isoformat(timespec="seconds"),
                    "commit": here["commit"],
                    "code": argv[0],
                    "command": shlex.join(["python", *cmd[1:]]),
                    "source_digest": here["source_digest"],
                    "provenance_from": "bench/run_all.py (the bench stored none)",
                }
            benches[name] = prov
            for row, entry in normalise(name, data).items():
                entries[row] = {**entry, **{k: v for k, v in prov.items() if k in PROVENANCE_FIELDS}}
        except subprocess.TimeoutExpired:
            entries[name] = {"error": f"ran past its {limit} s limit"}
            failed = True
        except (RuntimeError, ValueError, KeyError) as exc:
            entries[name] = {"error": str(exc)}
            failed = True
        timings[name] = round(time.monotonic() - t0, 1)
        print(f"[bench] {name}: {timings[name]} s", file=sys.stderr, flush=True)

    total = round(sum(timings.values()), 1)
    command = shlex.join(["python", "-m", "bench.run_all", *sys.argv[1:]])
    meta = {
        "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "measured_at": started_at.isoformat(timespec="seconds"),
        "commit": here["commit"],
        "source_digest": here["source_digest"],
        "code": "bench/run_all.py",
        "command": command,
        "machine": machine(),
        "quick": args.quick,
        "seconds": timings,
        "seconds_total": total,
        "benches": benches,
    }
    text, out = render(entries, raw, meta, here)
    print(text)
    if not args.no_write:
        RESULTS_MD.write_text(text)
        RESULTS_JSON.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {RESULTS_MD.relative_to(ROOT)} and {RESULTS_JSON.relative_to(ROOT)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
