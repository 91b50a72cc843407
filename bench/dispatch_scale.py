"""Dispatch throughput against a large backlog: is the live dispatcher flat in the backlog size?

    .venv/bin/python bench/dispatch_scale.py [--json] [--quick] [--sizes 10000,100000,1000000]
                                             [--decisions 20000] [--rounds 3] [--details out.json]

For each size N (grown in one database: 10k -> 100k -> 1M) it seeds N queued jobs on one model,
spread over the five tiers (api 5%, enterprise 10%, unlimited 25%, light 20%, free 40%), N/50
users (about 1% of each tier's users are heavy and hold 20% of its jobs), created over the last
hour, with every real index in place (VACUUM ANALYZE after seeding). One pool with a huge
dispatch_limit and enough live fake workers that room is never the limit.

Then, interleaved over several rounds (median reported):

* ours:     `Dispatcher.run_pass` + commit, then `CeleryPublisher.release` (Celery -> Redis) and the
            ledger record (Redis), exactly what `tasks.dispatch.dispatch_once` does.
* baseline: the naive dispatcher most people write first (ORDER BY rank, created_at with a
            correlated count(*) for the per-user cap, LIMIT 512 FOR UPDATE SKIP LOCKED), then an
            UPDATE to dispatched with the same job_events rows, same publish.

Decisions/s = jobs dispatched / time spent dispatching (pass + commit + publish + ledger). After
every pass the bench plays the workers: released jobs go back to queued as new submissions
(created_at = now()), untimed, so the backlog stays at exactly N and nobody's in-flight count grows.
Published messages are deleted from Redis between measurements (untimed).

Services: DREAMQ_BENCH_DATABASE_URL / DREAMQ_BENCH_REDIS_URL if set (a fresh database
`dreamq_bench_<random>` is created there and dropped at the end; only this run's Redis keys are
touched), else embedded Postgres and Redis in a temp dir, stopped at the end.

Output: a table on stdout (progress on stderr); with --json only
`{"sizes": {"10000": ours/s, ...}, "baseline": {...}, "ratio": {...}, "unit": "decisions/s", ...}` with the
fields of bench/provenance.py (measured_at, commit, code, command, source_digest).
`--details PATH` writes everything (per-pass breakdown, EXPLAIN plans) as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import event, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.sql.elements import TextClause  # noqa: E402

from bench.provenance import provenance  # noqa: E402

TIER_MIX = (("api", 0.05), ("enterprise", 0.10), ("unlimited", 0.25), ("light", 0.20), ("free", 0.40))
JOBS_PER_USER = 50
HEAVY_EVERY = 5  # every 5th job of a tier belongs to one of its heavy users (20% of the tier)
HEAVY_PER_USERS = 100  # one heavy user per 100 users of the tier (at least one)
SEED_CHUNK = 100_000
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
GOAL = 2000.0
BASELINE_BATCH = 512
LIVE_WORKERS = 1000  # x DISPATCH_PER_WORKER: room is never the limit
DISPATCH_LIMIT = 10_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


# -- services ----------------------------------------------------------------------------


class Services:
    """Postgres + Redis for the bench: given by env, or embedded in a temp dir."""

    def __init__(self) -> None:
        self.tmp: str | None = None
        self.pg = None
        self.redis_server = None
        self.admin_url: str | None = None  # external Postgres: where to drop our database
        self.database: str | None = None
        self.db_url = ""
        self.redis_url = ""
        self.redis_external = False

    def _tmpdir(self) -> Path:
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix="dreamq-bench-")
        return Path(self.tmp)

    def start(self) -> None:
        from app.db.session import normalize_url

        given_db = os.environ.get("DREAMQ_BENCH_DATABASE_URL", "")
        given_redis = os.environ.get("DREAMQ_BENCH_REDIS_URL", "")
        if given_db:
            import psycopg

            base = make_url(normalize_url(given_db))
            self.database = f"dreamq_bench_{secrets.token_hex(4)}"
            self.admin_url = base.set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
            self.db_url = base.set(database=self.database).render_as_string(hide_password=False)
            log(f"postgres: {base.set(database=self.database).render_as_string()} (created)")
        else:
            from app.stack.embedded import EmbeddedPostgres

            started = time.perf_counter()
            self.pg = EmbeddedPostgres(self._tmpdir() / "pg", port=0, database="dreamq_bench")
            self.pg.start()
            self.db_url = self.pg.url
            log(f"postgres: embedded at {self.pg.url} ({time.perf_counter() - started:.1f}s to start)")
        if given_redis:
            self.redis_url = given_redis
            self.redis_external = True
            log(f"redis: {given_redis}")
        else:
            from app.stack.embedded import EmbeddedRedis

            self.redis_server = EmbeddedRedis(self._tmpdir() / "redis", port=0)
            self.redis_server.start()
            self.redis_url = self.redis_server.url
            log(f"redis: embedded at {self.redis_url}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            from app.db.session import dispose_all

            dispose_all()
        if self.admin_url and self.database:
            try:
                import psycopg

                with psycopg.connect(self.admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                log(f"dropped database {self.database}")
            except Exception as exc:  # report, never mask the bench's own error
                log(f"could not drop database {self.database}: {exc}")
        for server in (self.redis_server, self.pg):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def configure_app(services: Services) -> None:
    """Point the app's settings, engines and Redis client at the bench services."""
    os.environ["DATABASE_URL"] = services.db_url
    os.environ["CELERY_BROKER_URL"] = services.redis_url
    os.environ["DREAMQ_REDIS_URL"] = services.redis_url
    # The naive baseline at 1M rows must not be cut by the app's 30 s statement timeout.
    os.environ.setdefault("DREAMQ_DB_STATEMENT_TIMEOUT_MS", "600000")
    import app.core.config
    import app.core.redis_client
    import app.db.session

    app.core.config.reload_settings()
    app.db.session.dispose_all()
    app.core.redis_client.reset()


# -- statement timing --------------------------------------------------------------------


class SqlTimer:
    """Times every statement sent through the engine while `active`, labelled by SQL constant."""

    def __init__(self, engine, modules: list[Any]) -> None:
        self.engine = engine
        self.labels: dict[str, str] = {}
        for module in modules:
            for name, value in vars(module).items():
                if isinstance(value, TextClause):
                    label = name.strip("_").lower().removesuffix("_sql")
                    self.labels[str(value.compile(dialect=engine.dialect))] = label
                    self.labels[value.text] = label
        self.active = False
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.captured: dict[str, tuple[str, Any]] = {}
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def label(self, statement: str) -> str:
        found = self.labels.get(statement)
        if found:
            return found
        return "sql:" + " ".join(statement.split())[:40]

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if not self.active:
            return
        elapsed = time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())
        label = self.label(statement)
        self.totals[label] += elapsed
        self.counts[label] += 1
        self.captured[label] = (statement, parameters)

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


class Stopwatch:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - started

        return timed


# -- the bench ----------------------------------------------------------------------------

_NEW_USERS = text(
    """
    INSERT INTO users (id, name, tier)
    SELECT CAST(md5(:prefix || :tier || '-' || g) AS uuid), :prefix || :tier || '-' || g, :tier
    FROM generate_series(CAST(:lo AS int), CAST(:hi AS int) - 1) g
    ON CONFLICT DO NOTHING
    """
)

_NEW_JOBS = text(
    """
    INSERT INTO jobs (id, user_id, tier, kind, prompt, params, model_id, model_version_id, max_attempts,
                      created_at, updated_at)
    SELECT gen_random_uuid(),
           CAST(md5(:prefix || :tier || '-' ||
                    CASE WHEN g % :heavy_every = 0 THEN (g / :heavy_every) % :heavy
                         ELSE floor(random() * :users)::int END) AS uuid),
           :tier, 'text_to_video', 'a bench prompt', '{}'::jsonb, :model, :version, 3,
           now() - random() * interval '1 hour', now()
    FROM generate_series(1, CAST(:n AS int)) g
    """
)

# What the bench's fake workers do after each pass (untimed): the released jobs come back as new
# submissions, so the backlog stays at N and no user's in-flight count builds up.
_REQUEUE = text(
    """
    UPDATE jobs SET state = 'queued', pool_id = NULL, dispatched_at = NULL, created_at = now(), updated_at = now()
    WHERE id = ANY(CAST(:ids AS uuid[]))
    """
)

_BASELINE_PICK = text(
    """
    SELECT j.id FROM jobs j JOIN tiers t ON t.name = j.tier
    WHERE j.state = 'queued' AND j.model_id = :model
      AND (SELECT count(*) FROM jobs u WHERE u.user_id = j.user_id AND u.state IN ('dispatched', 'running'))
          < t.concurrency_cap
    ORDER BY t.rank, j.created_at
    LIMIT :limit
    FOR UPDATE OF j SKIP LOCKED
    """
)

_BASELINE_APPLY = text(
    """
    WITH upd AS (
        UPDATE jobs SET state = 'dispatched', pool_id = :pool, dispatched_at = now(), updated_at = now(),
                        dispatch_seq = dispatch_seq + 1
        WHERE id = ANY(CAST(:ids AS uuid[])) AND state = 'queued'
        RETURNING id, tier, dispatch_seq
    ), ev AS (
        INSERT INTO job_events (job_id, from_state, to_state, detail)
        SELECT id, 'queued', 'dispatched', jsonb_build_object('pool', CAST(:pool_name AS text), 'reason', 'naive')
        FROM upd
    )
    SELECT id, tier, dispatch_seq FROM upd
    """
)


class Bench:
    def __init__(self, services: Services, args: argparse.Namespace) -> None:
        from app.core.redis_client import get_redis
        from app.db.session import get_engine
        from app.scheduling import dispatcher as dispatcher_mod
        from tasks.publisher import CeleryPublisher

        self.args = args
        self.services = services
        self.engine = get_engine()
        self.redis = get_redis()
        self.dmod = dispatcher_mod
        self.publish_releases = CeleryPublisher().release
        self.run_id = secrets.token_hex(4)
        self.prefix = f"bench-{self.run_id}-"
        self.cluster = f"bench-{self.run_id}"
        self.model = "video"
        self.ledger_prefix = f"dreamq:bench:{self.run_id}:ledger:"
        self.timer = SqlTimer(self.engine, [dispatcher_mod, sys.modules[__name__]])
        self.watch = Stopwatch()
        # Time the pure policy and the ledger read inside run_pass (the bench's own process only).
        dispatcher_mod.plan_dispatch = self.watch.wrap("plan_dispatch", dispatcher_mod.plan_dispatch)
        self.seeded: dict[str, int] = {t: 0 for t, _ in TIER_MIX}
        self.users: dict[str, int] = {t: 0 for t, _ in TIER_MIX}

    # -- setup --

    def setup(self) -> None:
        from app.db.migrate import upgrade
        from app.db.session import transaction
        from app.seed import seed_tiers

        started = time.perf_counter()
        upgrade(self.services.db_url)
        with transaction() as session:
            seed_tiers(session)
            self.cluster_id = session.execute(
                text("INSERT INTO clusters (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": self.cluster}
            ).scalar_one()
            self.model_id = session.execute(
                text("INSERT INTO models (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": self.model}
            ).scalar_one()
            self.version_id = session.execute(
                text(
                    "INSERT INTO model_versions (id, model_id, number, digest, manifest, size_bytes) "
                    "VALUES (gen_random_uuid(), :m, 1, :d, '{}'::jsonb, 0) RETURNING id"
                ),
                {"m": self.model_id, "d": f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}"},
            ).scalar_one()
            self.pool_id = session.execute(
                text(
                    "INSERT INTO pools (id, cluster_id, model_id, dispatch_limit) "
                    "VALUES (gen_random_uuid(), :c, :m, :l) RETURNING id"
                ),
                {"c": self.cluster_id, "m": self.model_id, "l": DISPATCH_LIMIT},
            ).scalar_one()
            # Heartbeats a day ahead stay fresh for the whole run (live = heartbeat > now() - 30 s).
            session.execute(
                text(
                    "INSERT INTO workers (id, pool_id, hostname, pid, device, state, heartbeat_at) "
                    "SELECT :prefix || 'w' || g || '@bench', :p, 'bench', g, 'cpu', 'idle', now() + interval '1 day' "
                    "FROM generate_series(1, :n) g"
                ),
                {"prefix": self.prefix, "p": self.pool_id, "n": LIVE_WORKERS},
            )
        self.pool_name = f"{self.cluster}.{self.model}"
        log(f"schema + pool ready in {time.perf_counter() - started:.1f}s")

    def grow_to(self, size: int) -> float:
        """Add users and queued jobs until the backlog is `size` jobs; returns seconds spent."""
        from app.db.session import transaction

        started = time.perf_counter()
        for tier, share in TIER_MIX:
            target = int(round(size * share))
            users = max(1, target // JOBS_PER_USER)
            heavy = max(1, users // HEAVY_PER_USERS)
            with transaction() as session:
                session.execute(text("SET LOCAL synchronous_commit = off"))
                session.execute(_NEW_USERS, {"prefix": self.prefix, "tier": tier, "lo": self.users[tier], "hi": users})
            self.users[tier] = max(self.users[tier], users)
            while self.seeded[tier] < target:
                n = min(SEED_CHUNK, target - self.seeded[tier])
                with transaction() as session:
                    session.execute(text("SET LOCAL synchronous_commit = off"))
                    session.execute(
                        _NEW_JOBS,
                        {
                            "prefix": self.prefix,
                            "tier": tier,
                            "heavy_every": HEAVY_EVERY,
                            "heavy": heavy,
                            "users": users,
                            "model": self.model_id,
                            "version": self.version_id,
                            "n": n,
                        },
                    )
                self.seeded[tier] += n
        inserted = time.perf_counter() - started
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) jobs")
            conn.exec_driver_sql("ANALYZE users")
            queued = conn.exec_driver_sql("SELECT count(*) FROM jobs WHERE state = 'queued'").scalar_one()
            nusers = conn.exec_driver_sql("SELECT count(DISTINCT user_id) FROM jobs").scalar_one()
        elapsed = time.perf_counter() - started
        log(
            f"[{size:>9,}] seeded: {queued:,} queued jobs, {nusers:,} users with jobs "
            f"(insert {inserted:.1f}s, vacuum+analyze {elapsed - inserted:.1f}s)"
        )
        if queued != size:
            raise RuntimeError(f"backlog is {queued}, expected {size}")
        return elapsed

    # -- between passes (untimed) --

    def requeue(self, job_ids: list) -> None:
        if not job_ids:
            return
        from app.db.session import transaction

        with transaction() as session:
            session.execute(_REQUEUE, {"ids": job_ids})

    def purge_redis(self) -> None:
        """Drop the messages this run published (and keep Redis small)."""
        keys = list(self.redis.scan_iter(match=f"{self.cluster}.*", count=1000))
        if keys:
            self.redis.delete(*keys)

    def new_dispatcher(self):
        store = self.dmod.LedgerStore(self.redis, key_prefix=self.ledger_prefix)
        store.load = self.watch.wrap("ledger_load", store.load)
        return self.dmod.Dispatcher(clusters=[self.cluster], ledger_store=store, max_batch=self.dmod.MAX_BATCH)

    # -- one pass each --

    def ours_pass(self, dispatcher) -> dict:
        from app.db.session import transaction

        self.timer.active = True
        t0 = time.perf_counter()
        with transaction() as session:
            result = dispatcher.run_pass(session)
        t1 = time.perf_counter()
        self.publish_releases(result.releases)
        t2 = time.perf_counter()
        dispatcher.ledger_store.record(result.now, result.per_tier())
        t3 = time.perf_counter()
        self.timer.active = False
        return {
            "released": [r.job_id for r in result.releases],
            "tiers": result.per_tier(),
            "db": t1 - t0,
            "pass_ms": float(getattr(result, "ms", (t1 - t0) * 1000)),
            "publish": t2 - t1,
            "ledger": t3 - t2,
            "total": t3 - t0,
            "planned": getattr(result, "planned", len(result.releases)),
            "candidates": getattr(result, "candidates", 0),
            "room": getattr(result, "room", 0),
        }

    def baseline_pass(self) -> dict:
        from app.db.session import transaction

        Release = self.dmod.Release
        self.timer.active = True
        t0 = time.perf_counter()
        with transaction() as session:
            ids = list(session.execute(_BASELINE_PICK, {"model": self.model_id, "limit": BASELINE_BATCH}).scalars())
            rows = (
                session.execute(_BASELINE_APPLY, {"ids": ids, "pool": self.pool_id, "pool_name": self.pool_name}).all()
                if ids
                else []
            )
        releases = [Release(r.id, f"{self.pool_name}.{r.tier}", r.dispatch_seq, r.tier) for r in rows]
        t1 = time.perf_counter()
        self.publish_releases(releases)
        t2 = time.perf_counter()
        self.timer.active = False
        tiers: dict[str, int] = {}
        for r in releases:
            tiers[r.tier] = tiers.get(r.tier, 0) + 1
        return {
            "released": [r.job_id for r in releases],
            "tiers": tiers,
            "db": t1 - t0,
            "pass_ms": (t1 - t0) * 1000,
            "publish": t2 - t1,
            "ledger": 0.0,
            "total": t2 - t0,
            "planned": len(releases),
        }

    def measure(self, one_pass: Callable[[], dict], target: int, cap_s: float, min_passes: int = 1) -> dict:
        passes: list[dict] = []
        decisions = 0
        spent = 0.0
        started = time.perf_counter()
        empty = 0
        while decisions < target and (time.perf_counter() - started < cap_s or len(passes) < min_passes):
            p = one_pass()
            self.requeue(p["released"])
            passes.append(p)
            decisions += len(p["released"])
            spent += p["total"]
            empty = empty + 1 if not p["released"] else 0
            if empty >= 5:
                break
        self.purge_redis()
        db = sum(p["db"] for p in passes)
        tiers: dict[str, int] = defaultdict(int)
        for p in passes:
            for t, n in p["tiers"].items():
                tiers[t] += n
        return {
            "decisions": decisions,
            "passes": len(passes),
            "seconds": spent,
            "rate": decisions / spent if spent else 0.0,
            "rate_db_only": decisions / db if db else 0.0,
            "per_pass": decisions / len(passes) if passes else 0.0,
            "pass_ms": [p["total"] * 1000 for p in passes],
            "db_ms": [p["db"] * 1000 for p in passes],
            "publish_s": sum(p["publish"] for p in passes),
            "ledger_s": sum(p["ledger"] for p in passes),
            "db_s": db,
            "inside_run_pass_s": sum(p["pass_ms"] for p in passes) / 1000,
            "tiers": dict(tiers),
            "wall_with_requeue_s": time.perf_counter() - started,
            "candidates": sum(p.get("candidates", 0) for p in passes),
        }

    # -- EXPLAIN --

    def explain(self, label: str, statement: str, params: Any, analyze: bool = True) -> str:
        opts = "ANALYZE, BUFFERS" if analyze else "COSTS"
        with self.engine.connect() as conn:
            try:
                rows = conn.exec_driver_sql(f"EXPLAIN ({opts}) {statement}", params).all()
            finally:
                conn.rollback()  # EXPLAIN ANALYZE of the apply/pick statements really ran them
        return "\n".join(r[0] for r in rows)

    @staticmethod
    def index_summary(plan: str) -> dict:
        def count(pattern: str) -> int:
            return sum(1 for line in plan.splitlines() if pattern in line)

        summary = {}
        for index in ("ix_jobs_queued_heads", "ix_jobs_queued_oldest"):
            summary[index] = {
                "index_scan": count(f"Index Scan using {index}"),
                "index_only_scan": count(f"Index Only Scan using {index}"),
            }
        summary["seq_scan_jobs"] = count("Seq Scan on jobs")
        summary["execution_ms"] = next(
            (
                float(line.split(":")[1].split()[0])
                for line in plan.splitlines()
                if line.strip().startswith("Execution Time")
            ),
            None,
        )
        return summary

    # -- per size --

    def run_size(self, size: int) -> dict:
        out: dict[str, Any] = {"size": size}
        out["seed_s"] = self.grow_to(size)
        dispatcher = self.new_dispatcher()
        target = self.args.decisions
        # Warm up: caches, the cursor rotation, the baseline plan.
        for _ in range(3):
            self.requeue(self.ours_pass(dispatcher)["released"])
        self.requeue(self.baseline_pass()["released"])
        self.purge_redis()

        # EXPLAIN (ANALYZE, BUFFERS) of every statement of one real pass, with its real parameters.
        self.timer.captured.clear()
        self.requeue(self.ours_pass(dispatcher)["released"])
        plans: dict[str, str] = {}
        explain_ms: dict[str, float | None] = {}
        for label, (statement, params) in sorted(self.timer.captured.items()):
            if label == "tiers":
                continue
            plans[label] = self.explain(label, statement, params)
            explain_ms[label] = self.index_summary(plans[label])["execution_ms"]
        heads_label = next((lbl for lbl in plans if "head" in lbl), None)
        out["index_use"] = self.index_summary(plans[heads_label]) if heads_label else {}
        baseline_stmt = str(_BASELINE_PICK.compile(dialect=self.engine.dialect))
        plans["baseline_pick (no ANALYZE)"] = self.explain(
            "baseline", baseline_stmt, {"model": self.model_id, "limit": BASELINE_BATCH}, analyze=False
        )
        out["plans"] = plans
        out["explain_ms"] = explain_ms
        self.purge_redis()

        ours_runs, base_runs = [], []
        self.timer.reset()
        self.watch.totals.clear()
        for r in range(self.args.rounds):
            order = ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")
            for which in order:
                if which == "ours":
                    m = self.measure(lambda: self.ours_pass(dispatcher), target, self.args.ours_cap_s)
                    ours_runs.append(m)
                    # Statement timings of ours only: snapshot them now.
                    sql_totals = dict(self.timer.totals)
                    sql_counts = dict(self.timer.counts)
                    self._accumulate(out, sql_totals, sql_counts)
                    self.timer.reset()
                else:
                    m = self.measure(self.baseline_pass, target, self.args.baseline_cap_s, min_passes=2)
                    base_runs.append(m)
                    self.timer.reset()
                log(
                    f"[{size:>9,}] round {r + 1} {which:<8}: {m['rate']:>8,.0f} decisions/s "
                    f"({m['decisions']:,} in {m['passes']} passes, {m['per_pass']:.0f}/pass, "
                    f"pass p50 {pct(m['pass_ms'], 50):.1f} ms, db-only {m['rate_db_only']:,.0f}/s)"
                )
        out["ours"] = ours_runs
        out["baseline"] = base_runs
        out["ours_rate"] = statistics.median(m["rate"] for m in ours_runs)
        out["ours_rate_db_only"] = statistics.median(m["rate_db_only"] for m in ours_runs)
        out["baseline_rate"] = statistics.median(m["rate"] for m in base_runs)
        out["baseline_rate_db_only"] = statistics.median(m["rate_db_only"] for m in base_runs)
        all_pass = [ms for m in ours_runs for ms in m["pass_ms"]]
        out["ours_p50_ms"], out["ours_p99_ms"] = pct(all_pass, 50), pct(all_pass, 99)
        base_pass = [ms for m in base_runs for ms in m["pass_ms"]]
        out["baseline_p50_ms"] = pct(base_pass, 50)
        out["ratio"] = out["ours_rate"] / out["baseline_rate"] if out["baseline_rate"] else float("inf")
        out["breakdown_ms"] = self._breakdown(out, ours_runs)
        return out

    def _accumulate(self, out: dict, sql_totals: dict, sql_counts: dict) -> None:
        acc = out.setdefault("_sql", defaultdict(float))
        for k, v in sql_totals.items():
            acc[k] += v
        cnt = out.setdefault("_sql_n", defaultdict(int))
        for k, v in sql_counts.items():
            cnt[k] += v

    def _breakdown(self, out: dict, runs: list[dict]) -> dict:
        """Mean ms per pass of ours, by component."""
        passes = sum(m["passes"] for m in runs)
        if not passes:
            return {}
        sql = out.pop("_sql", {})
        out.pop("_sql_n", None)
        per = {f"sql {k}": v * 1000 / passes for k, v in sorted(sql.items())}
        plan = self.watch.totals.get("plan_dispatch", 0.0) * 1000 / passes
        load = self.watch.totals.get("ledger_load", 0.0) * 1000 / passes
        inside = sum(m["inside_run_pass_s"] for m in runs) * 1000 / passes
        per["plan_dispatch (python)"] = plan
        per["ledger load (redis)"] = load
        per["other python in run_pass"] = inside - sum(v for k, v in per.items() if k.startswith("sql ")) - plan - load
        per["commit + session close"] = sum(m["db_s"] for m in runs) * 1000 / passes - inside
        per["publish (celery -> redis)"] = sum(m["publish_s"] for m in runs) * 1000 / passes
        per["ledger record (redis)"] = sum(m["ledger_s"] for m in runs) * 1000 / passes
        per["total"] = sum(m["seconds"] for m in runs) * 1000 / passes
        per["decisions per pass"] = sum(m["decisions"] for m in runs) / passes
        per["head candidates per pass"] = sum(m["candidates"] for m in runs) / passes
        return per


# -- report -------------------------------------------------------------------------------


def render(results: list[dict], total_s: float) -> str:
    lines = []
    header = (
        f"{'size':>10} | {'ours dec/s':>10} | {'db-only':>8} | {'baseline':>8} | {'db-only':>8} | "
        f"{'ratio':>6} | {'db-only':>7} | {'ours p50':>8} | {'ours p99':>8} | {'dec/pass':>8} | {'base pass':>9}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for r in results:
        ratio_db = r["ours_rate_db_only"] / r["baseline_rate_db_only"] if r["baseline_rate_db_only"] else float("inf")
        lines.append(
            f"{r['size']:>10,} | {r['ours_rate']:>10,.0f} | {r['ours_rate_db_only']:>8,.0f} | "
            f"{r['baseline_rate']:>8,.0f} | {r['baseline_rate_db_only']:>8,.0f} | {r['ratio']:>5.1f}x | "
            f"{ratio_db:>6.1f}x | {r['ours_p50_ms']:>6.0f}ms | {r['ours_p99_ms']:>6.0f}ms | "
            f"{r['breakdown_ms'].get('decisions per pass', 0):>8.0f} | {r['baseline_p50_ms']:>7.0f}ms"
        )
    lines.append(
        "(decisions/s: medians over rounds, dispatching time only (pass + commit + publish + ledger); "
        "db-only: pass + commit, without publish/ledger;\n ours p50/p99: one whole pass; "
        "base pass: p50 of one naive pass incl. publish)"
    )
    rates = [r["ours_rate"] for r in results]
    if rates:
        flat = min(rates) / max(rates) if max(rates) else 0.0
        goal = all(rate >= GOAL for rate in rates)
        lines.append(
            f"goal >= {GOAL:,.0f}/s at every size: {'MET' if goal else 'NOT MET'}; "
            f"flatness min/max = {flat:.2f} ({'flat' if flat >= 0.8 else 'NOT flat'}, threshold 0.80)"
        )
    lines.append("")
    lines.append("index use of the heads query (EXPLAIN ANALYZE, BUFFERS):")
    for r in results:
        iu = r.get("index_use", {})
        heads = iu.get("ix_jobs_queued_heads", {})
        oldest = iu.get("ix_jobs_queued_oldest", {})
        used = (heads.get("index_scan", 0) + heads.get("index_only_scan", 0)) and (
            oldest.get("index_scan", 0) + oldest.get("index_only_scan", 0)
        )
        lines.append(
            f"  {r['size']:>10,}: {'partial indexes used' if used and not iu.get('seq_scan_jobs') else 'CHECK PLAN'}"
            f" - ix_jobs_queued_heads: {heads.get('index_scan', 0)} Index Scan / {heads.get('index_only_scan', 0)} "
            f"Index Only Scan nodes; ix_jobs_queued_oldest: {oldest.get('index_scan', 0)} / "
            f"{oldest.get('index_only_scan', 0)}; Seq Scan on jobs: {iu.get('seq_scan_jobs', 0)}; "
            f"execution {iu.get('execution_ms')} ms"
        )
    lines.append("")
    lines.append("ours, mean ms per pass by component (EXPLAIN ANALYZE execution ms of one pass in brackets):")
    keys: list[str] = []
    for r in results:
        for k in r["breakdown_ms"]:
            if k not in keys:
                keys.append(k)
    lines.append(f"  {'component':<30}" + "".join(f" | {r['size']:>12,}" for r in results))
    for k in keys:
        cells = []
        for r in results:
            v = r["breakdown_ms"].get(k)
            label = k.removeprefix("sql ")
            ex = r["explain_ms"].get(label) if k.startswith("sql ") else None
            cell = "" if v is None else (f"{v:.0f}" if k.endswith("per pass") else f"{v:.2f}")
            if ex is not None:
                cell += f" [{ex:.1f}]"
            cells.append(f" | {cell:>12}")
        lines.append(f"  {k:<30}" + "".join(cells))
    lines.append("")
    lines.append(
        f"total runtime {total_s:.0f}s (seeding "
        + ", ".join(f"{r['size']:,}: {r['seed_s']:.0f}s" for r in results)
        + ")"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--quick", action="store_true", help="10k and 100k, fewer decisions")
    parser.add_argument("--sizes", help="comma-separated backlog sizes (ascending), e.g. 10000,100000,1000000")
    parser.add_argument("--decisions", type=int, help="decisions per measurement (default 20000, quick 5000)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per size (default 3)")
    parser.add_argument("--ours-cap-s", type=float, default=20.0, help="time cap of one ours measurement")
    parser.add_argument(
        "--baseline-cap-s", type=float, help="time cap of one baseline measurement (default 15, quick 5)"
    )
    parser.add_argument("--details", help="write every result (breakdown, plans) as JSON to this path")
    parser.add_argument("--plans", action="store_true", help="print the EXPLAIN plans on stderr")
    args = parser.parse_args(argv)
    sizes = (
        [int(s.replace("_", "")) for s in args.sizes.split(",")]
        if args.sizes
        else list(QUICK_SIZES if args.quick else FULL_SIZES)
    )
    if sizes != sorted(sizes):
        parser.error("--sizes must be ascending (the backlog grows between sizes)")
    args.decisions = args.decisions or (5000 if args.quick else 20000)
    args.rounds = args.rounds or 3
    args.baseline_cap_s = args.baseline_cap_s or (5.0 if args.quick else 15.0)

    prov = provenance(__file__, sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    services = Services()
    results: list[dict] = []
    try:
        services.start()
        configure_app(services)
        bench = Bench(services, args)
        bench.setup()
        for size in sizes:
            result = bench.run_size(size)
            results.append(result)
            if args.plans:
                for label, plan in result["plans"].items():
                    log(f"--- [{size:,}] {label}\n{plan}")
        with contextlib.suppress(Exception):
            keys = list(bench.redis.scan_iter(match=f"{bench.ledger_prefix}*")) + list(
                bench.redis.scan_iter(match=f"_kombu.binding*.{bench.cluster}.*")
            )
            if keys:
                bench.redis.delete(*keys)
    finally:
        services.stop()
    total = time.perf_counter() - started

    if args.details:
        Path(args.details).write_text(json.dumps({"results": results, "total_s": total}, indent=2, default=str))
    if args.json:
        print(
            json.dumps(
                {
                    "sizes": {str(r["size"]): round(r["ours_rate"], 1) for r in results},
                    "baseline": {str(r["size"]): round(r["baseline_rate"], 1) for r in results},
                    "ratio": {str(r["size"]): round(r["ratio"], 2) for r in results},
                    "unit": "decisions/s",
                    "rounds": args.rounds,
                    "decisions": args.decisions,
                    **prov,
                }
            )
        )
    else:
        print(render(results, total))
    if args.json:
        log(render(results, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
