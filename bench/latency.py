"""Latency on an idle pool: accept -> running and accept -> succeeded, against raw Celery.

    .venv/bin/python bench/latency.py [--json] [--quick] [--jobs 240] [--rounds 4]

Jobs go one at a time: each is submitted only once the previous one is done and the pool has
been idle for a moment (IDLE_GAP_S), so every job meets an idle dispatcher and an idle worker.
The model is the noop fixture (tests/fixtures/bundles/noop), so what is measured is the control
plane: the dispatch trigger, the dispatch pass, the broker hop, the claim, and for `succeeded`
the encode/upload of a one-frame clip and the completing transaction.

* ours:     accept = `create_job` committed (when POST /v1/generations would answer 202), then
            `request_dispatch`, as the API does. running = jobs.started_at (set by the claim's
            transaction), succeeded = jobs.finished_at; both from Postgres, same host clock.
* baseline: plain Celery with dreamq's settings (bench/raw_celery.py, one prefork -c 1 worker):
            accept = just before `apply_async`, running = the no-op task's first line,
            succeeded = its last line.

Rounds interleave ours and baseline (order alternating); p50/p99 are over all jobs of a side.
Ratio = ours / baseline (lower is better). Goals: accept -> running p50 <= 20 ms, p99 <= 100 ms.

Services as in bench/live_stack.py (DREAMQ_BENCH_DATABASE_URL / DREAMQ_BENCH_REDIS_URL, else
embedded). Output: a table on stdout; with --json one line
`{"latency_running_p50": {"baseline": .., "ours": .., "ratio": .., "unit": "ms"}, ...p99, succeeded...}` with
the fields of bench/provenance.py (measured_at, commit, code, command, source_digest).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dispatch_scale import pct  # noqa: E402
from bench.live_stack import RAW_QUEUE, Stack, live_stack, log  # noqa: E402
from bench.provenance import provenance  # noqa: E402

IDLE_GAP_S = 0.05
POLL_S = 0.002
GOALS = {"latency_running_p50": 20.0, "latency_running_p99": 100.0}


# Per ours job: accept -> dispatched (trigger + dispatch pass), dispatched -> running (broker hop
# + claim), for the breakdown line.
BREAKDOWN: dict[str, list[float]] = {"to_dispatched": [], "to_running": []}


def ours_round(stack: Stack, n: int, timeout_s: float) -> tuple[list[float], list[float]]:
    from sqlalchemy import text

    from app.db.session import transaction

    user = stack.new_user()
    accepted: dict[uuid.UUID, float] = {}
    for _ in range(n):
        time.sleep(IDLE_GAP_S)
        job_id = stack.submit(user)
        accepted[job_id] = time.time()  # the commit is done: a 202 would go out now
        deadline = time.monotonic() + timeout_s
        while True:
            with transaction() as session:
                state = session.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
            if state == "succeeded":
                break
            if state in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} ended {state}")
            time.sleep(POLL_S)
    with transaction() as session:
        rows = session.execute(
            text(
                "SELECT id, extract(epoch FROM started_at), extract(epoch FROM finished_at), "
                "extract(epoch FROM dispatched_at) FROM jobs WHERE user_id = :u"
            ),
            {"u": user.user_id},
        ).all()
    BREAKDOWN["to_dispatched"] += [(float(r[3]) - accepted[r[0]]) * 1000 for r in rows]
    BREAKDOWN["to_running"] += [(float(r[1]) - float(r[3])) * 1000 for r in rows]
    running = [(float(r[1]) - accepted[r[0]]) * 1000 for r in rows]
    succeeded = [(float(r[2]) - accepted[r[0]]) * 1000 for r in rows]
    return running, succeeded


def baseline_round(stack: Stack, n: int, timeout_s: float) -> tuple[list[float], list[float]]:
    from app.core.redis_client import get_redis
    from bench.raw_celery import noop

    redis = get_redis()
    counter = f"dreamq:bench:raw:{uuid.uuid4().hex}"
    for i in range(n):
        time.sleep(IDLE_GAP_S)
        noop.apply_async((counter, time.time()), queue=RAW_QUEUE)
        deadline = time.monotonic() + timeout_s
        while int(redis.get(counter) or 0) < i + 1:
            if time.monotonic() > deadline:
                raise RuntimeError("baseline task did not run")
            time.sleep(POLL_S)
    entries = [tuple(float(x) for x in e.split()) for e in redis.lrange(f"{counter}:lat", 0, -1)]
    redis.delete(counter, f"{counter}:last", f"{counter}:lat")
    return [(s - a) * 1000 for a, s, _ in entries], [(d - a) * 1000 for a, _, d in entries]


def render(result: dict, extra: dict) -> str:
    lines = [f"{'metric':<24} | {'ours ms':>8} | {'baseline ms':>11} | {'ratio':>6} | goal"]
    lines.append("-" * len(lines[0]))
    for key in ("latency_running_p50", "latency_running_p99", "latency_succeeded_p50", "latency_succeeded_p99"):
        r = result[key]
        goal = GOALS.get(key)
        verdict = "" if goal is None else f"<= {goal:.0f} ms: {'MET' if r['ours'] <= goal else 'NOT MET'}"
        lines.append(f"{key:<24} | {r['ours']:>8.1f} | {r['baseline']:>11.2f} | {r['ratio']:>5.1f}x | {verdict}")
    lines.append(
        f"({extra['jobs']} sequential jobs per side over {extra['rounds']} interleaved rounds, pool idle "
        f"for {IDLE_GAP_S * 1000:.0f} ms before each; ours: accept = commit of the job row, running/succeeded "
        "= started_at/finished_at in Postgres; baseline: accept = before apply_async, running/succeeded = "
        "first/last line of the no-op task)"
    )
    lines.append(
        f"ours accept->running = accept->dispatched p50 {extra['to_dispatched_p50']:.1f} ms (trigger + "
        f"dispatch pass) + dispatched->running p50 {extra['to_running_p50']:.1f} ms (broker hop + claim)"
    )
    lines.append(
        f"ours accept->running p90 {extra['ours_running_p90']:.1f} ms, max {extra['ours_running_max']:.1f} ms; "
        f"total runtime {extra['total_s']:.0f}s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--quick", action="store_true", help="fewer jobs (~1 minute)")
    parser.add_argument("--jobs", type=int, help="jobs per side (default 240, quick 80)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 4, quick 2)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="most one job may take")
    args = parser.parse_args(argv)
    n = args.jobs or (80 if args.quick else 240)
    rounds = args.rounds or (2 if args.quick else 4)
    per_round = max(1, n // rounds)

    prov = provenance(__file__, sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    ours_run, ours_done, base_run, base_done = [], [], [], []
    with live_stack() as stack:
        ours_round(stack, 10, args.timeout_s)  # warm-up: connections, the model's first run, plans
        baseline_round(stack, 10, args.timeout_s)
        for values in BREAKDOWN.values():
            values.clear()
        for r in range(rounds):
            for which in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
                if which == "ours":
                    run, done = ours_round(stack, per_round, args.timeout_s)
                    ours_run += run
                    ours_done += done
                else:
                    run, done = baseline_round(stack, per_round, args.timeout_s)
                    base_run += run
                    base_done += done
                log(
                    f"round {r + 1} {which:<8}: accept->running p50 {pct(run, 50):6.1f} ms p99 {pct(run, 99):6.1f} ms, "
                    f"accept->succeeded p50 {pct(done, 50):6.1f} ms p99 {pct(done, 99):6.1f} ms"
                )
    result = {}
    for key, ours, base in (("running", ours_run, base_run), ("succeeded", ours_done, base_done)):
        for q in (50, 99):
            o, b = pct(ours, q), pct(base, q)
            result[f"latency_{key}_p{q}"] = {
                "baseline": round(b, 2),
                "ours": round(o, 2),
                "ratio": round(o / b, 2) if b else None,
                "unit": "ms",
            }
    extra = {
        "jobs": len(ours_run),
        "rounds": rounds,
        "ours_running_p90": pct(ours_run, 90),
        "ours_running_max": max(ours_run),
        "total_s": time.perf_counter() - started,
        "to_dispatched_p50": pct(BREAKDOWN["to_dispatched"], 50),
        "to_running_p50": pct(BREAKDOWN["to_running"], 50),
    }
    if args.json:
        print(json.dumps({**result, "jobs_per_side": extra["jobs"], "rounds": rounds, **prov}))
        log(render(result, extra))
    else:
        print(render(result, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
