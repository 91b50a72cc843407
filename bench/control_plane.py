"""Control-plane throughput: jobs/s through dreamq's whole job path against raw Celery.

    .venv/bin/python bench/control_plane.py [--json] [--quick] [--jobs 500] [--rounds 3]

With a model that takes no time (tests/fixtures/bundles/noop), a job's cost is what the control
plane spends on it, so jobs/s here is the ceiling the control plane puts on one GPU worker.

* ours:     one publisher submits N jobs back to back (create_job + commit + request_dispatch,
            what POST /v1/generations does after auth), while the live stack runs them: the
            dispatcher (Celery `control` queue) releases them to pool `bench.noop` under its
            dispatch limit, one GPU worker (started as `dreamq worker` starts it: prefork,
            concurrency 1, prefetch 1) claims, runs the noop model, and the job is finalized
            (MP4 + thumbnail uploaded, `succeeded` recorded in Postgres).
            Counted: N / (finished_at of the last job - the moment the first submission began),
            from Postgres timestamps once all N are `succeeded`; a round fails loudly if any job
            ends otherwise.
* baseline: one publisher sends N no-op tasks with `apply_async` to one plain Celery worker with
            the same Celery version and settings (bench/raw_celery.py: JSON, acks_late, prefetch
            1, prefork -c 1, events on); each task records its completion in Redis.
            Counted: N / (time the last task ran - the moment the first publish began).

Rounds interleave ours and baseline (order alternating), after a warm-up of each; medians
reported, ratio = ours / baseline (goal >= 0.8).

Services: DREAMQ_BENCH_DATABASE_URL / DREAMQ_BENCH_REDIS_URL if set, else embedded (see
bench/live_stack.py); SeaweedFS embedded. Output: a table on stdout (progress on stderr); with
--json one line `{"control_plane": {"baseline": .., "ours": .., "ratio": .., "unit": "jobs/s", ...}, ...}` with
the fields of bench/provenance.py (measured_at, commit, code, command, source_digest).
"""

from __future__ import annotations

import argparse
import json
import statistics
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

GOAL = 0.8


def ours_round(stack: Stack, n: int, timeout_s: float) -> dict:
    user = stack.new_user()
    started = time.time()
    for _ in range(n):
        stack.submit(user)
    submitted = time.time()
    deadline = time.monotonic() + timeout_s
    while stack.succeeded(user.user_id) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"ours: not all {n} jobs succeeded within {timeout_s:.0f}s: {stack.not_succeeded(user.user_id)}"
            )
        time.sleep(0.02)
    rows = stack.timings(user.user_id)
    last = max(r[3] for r in rows)
    return {
        "rate": n / (last - started),
        "seconds": last - started,
        "submit_rate": n / (submitted - started),
        # Where a job's time went (ms, medians): waiting for a dispatch, in the pool queue, running+finalizing.
        "to_dispatch_ms": statistics.median((r[1] - r[0]) * 1000 for r in rows),
        "in_queue_ms": statistics.median((r[2] - r[1]) * 1000 for r in rows),
        "run_ms": statistics.median((r[3] - r[2]) * 1000 for r in rows),
        "run_p99_ms": pct([(r[3] - r[2]) * 1000 for r in rows], 99),
        "worker_job_ms": (stack.worker_job_s() or float("nan")) * 1000,
    }


def baseline_round(stack: Stack, n: int, timeout_s: float) -> dict:
    from app.core.redis_client import get_redis
    from bench.raw_celery import noop

    redis = get_redis()
    counter = f"dreamq:bench:raw:{uuid.uuid4().hex}"
    started = time.time()
    for _ in range(n):
        noop.apply_async((counter, time.time()), queue=RAW_QUEUE)
    submitted = time.time()
    deadline = time.monotonic() + timeout_s
    while int(redis.get(counter) or 0) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"baseline: {int(redis.get(counter) or 0)} of {n} tasks ran within {timeout_s:.0f}s")
        time.sleep(0.02)
    last = float(redis.get(f"{counter}:last"))
    redis.delete(counter, f"{counter}:last", f"{counter}:lat")
    return {"rate": n / (last - started), "seconds": last - started, "submit_rate": n / (submitted - started)}


def render(result: dict) -> str:
    cp = result["control_plane"]
    lines = [
        f"{'round':>5} | {'ours jobs/s':>11} | {'baseline':>8} | {'ours submit/s':>13} | {'to dispatch':>11} | "
        f"{'in queue':>8} | {'run+final':>9}",
    ]
    lines.append("-" * len(lines[0]))
    for i, (o, b) in enumerate(zip(cp["rounds_ours"], cp["rounds_baseline"]), 1):
        lines.append(
            f"{i:>5} | {o['rate']:>11.1f} | {b['rate']:>8.1f} | {o['submit_rate']:>13.1f} | "
            f"{o['to_dispatch_ms']:>9.1f}ms | {o['in_queue_ms']:>6.1f}ms | {o['run_ms']:>7.1f}ms"
        )
    lines.append(
        f"median: ours {cp['ours']:.1f} jobs/s, baseline {cp['baseline']:.1f} tasks/s, "
        f"ratio {cp['ratio']:.2f} (goal >= {GOAL}: {'MET' if cp['ratio'] >= GOAL else 'NOT MET'})"
    )
    lines.append(
        f"({cp['jobs']} jobs per round, {len(cp['rounds_ours'])} interleaved rounds; ours counted from the "
        "first submission to the last job recorded succeeded in Postgres; to dispatch / in queue / "
        "run+final are per-job medians: created->dispatched, dispatched->started, started->finished)"
    )
    lines.append(f"total runtime {result['total_s']:.0f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller rounds (~1 minute)")
    parser.add_argument("--jobs", type=int, help="jobs per round (default 500, quick 200)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="most one round may take")
    args = parser.parse_args(argv)
    n = args.jobs or (200 if args.quick else 500)
    rounds = args.rounds or (2 if args.quick else 3)

    prov = provenance(__file__, sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    with live_stack() as stack:
        user = stack.new_user()
        for _ in range(20):  # warm-up: imports, connections, the model's first run, prepared plans
            stack.submit(user)
        baseline_round(stack, 50, args.timeout_s)
        deadline = time.monotonic() + args.timeout_s
        while stack.succeeded(user.user_id) < 20:
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up jobs did not succeed: {stack.not_succeeded(user.user_id)}")
            time.sleep(0.05)
        ours, base = [], []
        for r in range(rounds):
            for which in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
                if which == "ours":
                    ours.append(ours_round(stack, n, args.timeout_s))
                    m = ours[-1]
                    log(
                        f"round {r + 1} ours    : {m['rate']:7.1f} jobs/s (submit {m['submit_rate']:.0f}/s; per job: "
                        f"to dispatch {m['to_dispatch_ms']:.1f} ms, in queue {m['in_queue_ms']:.1f} ms, "
                        f"run+finalize {m['run_ms']:.1f} ms; worker job_s {m['worker_job_ms']:.1f} ms)"
                    )
                else:
                    base.append(baseline_round(stack, n, args.timeout_s))
                    log(
                        f"round {r + 1} baseline: {base[-1]['rate']:7.1f} tasks/s (publish {base[-1]['submit_rate']:.0f}/s)"
                    )
    ours_rate = statistics.median(m["rate"] for m in ours)
    base_rate = statistics.median(m["rate"] for m in base)
    result = {
        "control_plane": {
            "baseline": round(base_rate, 1),
            "ours": round(ours_rate, 1),
            "ratio": round(ours_rate / base_rate, 3),
            "unit": "jobs/s",
            "jobs": n,
            "rounds": rounds,
            "goal": GOAL,
            "rounds_ours": [{k: round(v, 2) for k, v in m.items()} for m in ours],
            "rounds_baseline": [{k: round(v, 2) for k, v in m.items()} for m in base],
        },
        "total_s": round(time.perf_counter() - started, 1),
        **prov,
    }
    if args.json:
        print(json.dumps(result))
        log(render(result))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
