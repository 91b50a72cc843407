"""Run every dispatch policy on every trace and print the comparison table (markdown).

    .venv/bin/python bench/simulate_all.py [--jobs 2] [--seed 0] [--scale 1.0] [--plots]

Writes the same table to bench/out/simulation.md (and, with --plots, one PNG per run of each
tier's oldest dispatchable wait / W to bench/out/). Each cell is `within W / max wait/W /
starved windows`. Below the table it checks the `slo` acceptance criteria against the anchors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.core.tiers import TIER_ORDER  # noqa: E402
from app.scheduling.policy import POLICIES  # noqa: E402
from app.scheduling.sim import report  # noqa: E402
from app.scheduling.sim.simulator import simulate  # noqa: E402
from app.scheduling.sim.traces import TRACES  # noqa: E402
from app.scheduling.tiers import DEFAULT_TIERS  # noqa: E402

OUT = ROOT / "bench" / "out"


def _run(args: tuple[str, str, int, float, bool]) -> dict:
    trace, policy, seed, scale, plots = args
    res = simulate(trace, policy, seed=seed, scale=scale)
    if plots:
        OUT.mkdir(parents=True, exist_ok=True)
        report.plot_timeline(
            res.timeline,
            DEFAULT_TIERS,
            str(OUT / f"{trace}-{policy}.png"),
            title=f"{trace} / {policy}: oldest dispatchable wait / W",
        )
    return res.summary


def check_criteria(results: list[dict]) -> list[str]:
    """The `slo` acceptance criteria, one line each, prefixed PASS or FAIL."""
    by = {(r["trace"], r["policy"]): r for r in results}
    lines = []
    for trace in TRACES:
        slo = by.get((trace, "slo"))
        strict = by.get((trace, "strict"))
        if slo is None:
            continue
        if strict is not None:
            for tier in ("api", "enterprise"):
                a = slo["tiers"][tier]["within_slo"]
                b = strict["tiers"][tier]["within_slo"]
                ok = a >= b - 0.02
                lines.append(
                    f"{'PASS' if ok else 'FAIL'} {trace}: {tier} within W {a:.4f} vs strict {b:.4f} (>= strict - 0.02)"
                )
        starved = {t: m["starved_windows"] for t, m in slo["tiers"].items() if m["starved_windows"]}
        lines.append(f"{'PASS' if not starved else 'FAIL'} {trace}: slo starved windows {starved or 0}")
        if trace == "steady":
            low = {t: m["within_slo"] for t, m in slo["tiers"].items() if m["within_slo"] < 0.99}
            lines.append(f"{'PASS' if not low else 'FAIL'} steady: every tier >= 99% within W {low or ''}".rstrip())
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--plots", action="store_true")
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--policies", default=",".join(POLICIES))
    args = ap.parse_args(argv)
    traces = [t for t in args.traces.split(",") if t]
    policies = [p for p in args.policies.split(",") if p]
    # longest runs first so the pool stays busy
    work = [(t, p, args.seed, args.scale, args.plots) for t in traces for p in policies]
    work.sort(key=lambda w: (w[0] != "launch-day",))
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            results = list(ex.map(_run, work))
    else:
        results = [_run(w) for w in work]
    order = {(t, p): i for i, (t, p) in enumerate((t, p) for t in traces for p in policies)}
    results.sort(key=lambda r: order[(r["trace"], r["policy"])])
    elapsed = time.perf_counter() - t0

    lines = [
        "# Dispatch policies on simulated traces",
        "",
        f"seed {args.seed}, scale {args.scale}; each cell: within W / max wait÷W / starved 10-min windows "
        f"(W: " + ", ".join(f"{n} {DEFAULT_TIERS[n].slo_s:g}s" for n in TIER_ORDER) + ").",
        "",
        report.format_table(results, TIER_ORDER),
        "",
        "p50 / p99 wait (s):",
        "",
        "| trace | policy | " + " | ".join(TIER_ORDER) + " |",
        "|---|---|" + "---:|" * len(TIER_ORDER),
    ]
    for r in results:
        cells = [f"{r['tiers'][n]['p50_wait_s']:.0f} / {r['tiers'][n]['p99_wait_s']:.0f}" for n in TIER_ORDER]
        lines.append(f"| {r['trace']} | {r['policy']} | " + " | ".join(cells) + " |")
    lines += ["", "Criteria for `slo`:", ""]
    lines += [f"- {c}" for c in check_criteria(results)]
    lines += ["", f"total wall {elapsed:.1f} s with {args.jobs} process(es)"]
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "simulation.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
