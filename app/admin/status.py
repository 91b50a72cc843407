"""`dreamq status`: the operator snapshot (app/observability/snapshot.py) as terminal text.

The numbers are take_snapshot()'s, the same ones /dashboard and /metrics show; this module only
lays them out: tiers with an urgency bar against W (the bar is full at urgency 1, where the
tier's promise breaks), pools with in-flight against the dispatch limit, workers, failures.
"""

from __future__ import annotations

from app.observability.snapshot import Snapshot

BAR = 20


def urgency_bar(urgency: float, width: int = BAR) -> str:
    """`[#####.....]` filled up to urgency 1 (W reached); past it, `!` marks how far past."""
    filled = min(int(round(min(urgency, 1.0) * width)), width)
    bar = "#" * filled + "." * (width - filled)
    return f"[{bar}]" + ("!" * min(int(urgency), 5) if urgency >= 1 else "")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(snapshot: Snapshot) -> str:
    lines = [
        f"dreamq status at {snapshot.taken_at}",
        "",
        "TIERS  urgency = oldest queued wait / W (1.0 = promise broken)",
    ]
    lines.append(
        f"  {'tier':<11}{'W':>7}{'queued':>8}{'disp':>6}{'run':>6}{'oldest':>8}  {'urgency':<{BAR + 13}}{'SLO 1h':>8}"
    )
    for t in snapshot.tiers:
        attainment = f"{t.attainment * 100:.1f}%" if t.attainment is not None else "-"
        lines.append(
            f"  {t.name:<11}{_age(t.slo_s):>7}{t.queued:>8}{t.dispatched:>6}{t.running:>6}"
            f"{_age(t.oldest_wait_s):>8}  {urgency_bar(t.urgency):<{BAR + 7}} {t.urgency:>5.2f}{attainment:>8}"
        )
    lines += ["", "POOLS  in flight = dispatched (waiting in its queues) against the effective limit"]
    if not snapshot.pools:
        lines.append("  (none)")
    for p in snapshot.pools:
        state = "" if p.enabled else "  DRAINED"
        lines.append(
            f"  {p.name:<28} {p.cluster_kind:<9} dispatched {p.dispatched:>4}/{p.effective_limit:<4} "
            f"(limit {p.dispatch_limit}) running {p.running:>3}  workers {p.live_workers}{state}"
        )
    lines += ["", "WORKERS"]
    if not snapshot.workers:
        lines.append("  (none in the last hour)")
    for w in snapshot.workers:
        stale = "  STALE" if w.stale else ""
        job = f"job {w.current_job_id}" if w.current_job_id else "-"
        loaded = ", ".join(w.loaded) or "-"
        lines.append(
            f"  {w.id:<32} {w.state:<9} {w.pool or '-':<24} {w.device:<20} {job:<42} "
            f"loaded {loaded}  beat {_age(w.heartbeat_age_s)} ago{stale}"
        )
    lines += ["", "RECENT FAILURES"]
    if not snapshot.failures:
        lines.append("  (none in the last day)")
    for f in snapshot.failures[:10]:
        lines.append(
            f"  {f.finished_at or '-':<33} {f.id} {f.tier:<10} {f.model:<12} {f.code or '-'}: {(f.message or '')[:80]}"
        )
    return "\n".join(lines)
