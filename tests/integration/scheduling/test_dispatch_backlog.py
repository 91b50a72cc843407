"""A dispatch pass reads the same rows whatever the backlog: measured on Postgres, not on a count.

The dispatcher claims (app/scheduling/dispatcher.py) that a pass costs what K, M, N and the
number of lanes make it cost, not what is queued: heads come from the partial indexes on queued
jobs, never from a scan of the backlog. This test runs one real `Dispatcher.run_pass` with a
small and with a large backlog in a database of its own, captures every statement the pass
sent with its parameters, and replays them in order under EXPLAIN (ANALYZE, BUFFERS) in a
transaction that is rolled back. What it compares, per pass:

* rows read from `jobs`: over every plan node on `jobs`, (rows returned + rows removed by a
  filter or an index recheck) x loops. A scan of the backlog reads every queued job.
* shared buffers touched (hit + read) by the pass's statements: pages, which also see what the
  row counts do not (heap fetches, index pages walked to find nothing). An index descent is
  O(log n), so these may grow by a page or so per probe, not with the backlog.

The backlog grows by one INSERT ... SELECT generate_series (indexes in place) and is then
VACUUM ANALYZEd, so both sizes are planned on fresh statistics. Users are the same at both
sizes (only their jobs grow): how many distinct users a pass looks at is bounded by K, M and N
too, but varies with how jobs spread over users, which is not the backlog.

10k against 200k, not 1M: queueing 1M jobs took 88 s on a loaded 2-core machine, too long for
the suite; `bench/dispatch_scale.py` grows its backlog to 1M.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.db.migrate import upgrade
from app.jobs.workers import DISPATCH_PER_WORKER
from app.scheduling.dispatcher import MAX_BATCH, Dispatcher, LedgerStore
from app.seed import seed_tiers
from tests.support.services import _create_database, _drop_database

SMALL, LARGE = 10_000, 200_000
USERS_PER_TIER = 1_000  # more than the pass walks (USERS_PER_TIER in the dispatcher is 32)
CLUSTER, MODEL = "backlog", "backlog-model"
# One full pass: room for MAX_BATCH decisions, so the heads query reads its largest K.
LIVE_WORKERS = MAX_BATCH // DISPATCH_PER_WORKER
# The bounds. Measured (rows of jobs read / shared pages, whole pass): 10k 23,552 / 14,794 (the
# planner seq-scans the small table to apply the decisions), 200k 4,576 / 20,172, 1M 4,576 / 20,198.
# Per statement the rows are the same at every size but for that seq scan (the heads: 3,040 at all
# three); 10% leaves room for which users the oldest K jobs belong to. Pages grow with the b-trees'
# depth (the apply's index inserts), then stop: 1.36x at 200k and at 1M. A pass that scanned the
# backlog would read 20x more rows at 200k than at 10k.
MAX_ROWS_GROWTH = 1.10
MAX_PAGES_GROWTH = 1.5


@pytest.fixture()
def own_database(services) -> Iterator[Engine]:
    """A database of this test's own: its 200k jobs never slow another test's queries."""
    url = _create_database(services.database_url)
    engine = create_engine(url)
    try:
        upgrade(url)
        with Session(engine) as session, session.begin():
            seed_tiers(session)
        yield engine
    finally:
        engine.dispose()
        _drop_database(url)


class Backlog:
    """One model, one pool with room for a full pass, users of every tier, and their queued jobs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.size = 0
        with engine.begin() as conn:
            self.tiers = list(conn.execute(text("SELECT name FROM tiers ORDER BY rank")).scalars())
            cluster = conn.execute(
                text("INSERT INTO clusters (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": CLUSTER}
            ).scalar_one()
            self.model_id = conn.execute(
                text("INSERT INTO models (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": MODEL}
            ).scalar_one()
            self.version_id = conn.execute(
                text(
                    "INSERT INTO model_versions (id, model_id, number, digest, manifest, size_bytes) "
                    "VALUES (gen_random_uuid(), :m, 1, :d, '{}'::jsonb, 0) RETURNING id"
                ),
                {"m": self.model_id, "d": f"sha256:{uuid.uuid4().hex}"},
            ).scalar_one()
            pool = conn.execute(
                text(
                    "INSERT INTO pools (id, cluster_id, model_id, dispatch_limit) "
                    "VALUES (gen_random_uuid(), :c, :m, 100000) RETURNING id"
                ),
                {"c": cluster, "m": self.model_id},
            ).scalar_one()
            # Heartbeats an hour ahead stay fresh for the whole test.
            conn.execute(
                text(
                    "INSERT INTO workers (id, pool_id, hostname, pid, device, state, heartbeat_at) "
                    "SELECT 'w' || g || '@backlog', :p, 'backlog', g, 'cpu', 'idle', now() + interval '1 hour' "
                    "FROM generate_series(1, :n) g"
                ),
                {"p": pool, "n": LIVE_WORKERS},
            )
            conn.execute(
                text(
                    "INSERT INTO users (id, name, tier) "
                    "SELECT CAST(md5(t.name || '-' || g) AS uuid), 'backlog-' || t.name || '-' || g, t.name "
                    "FROM tiers t, generate_series(0, :n - 1) g"
                ),
                {"n": USERS_PER_TIER},
            )

    def grow_to(self, size: int) -> float:
        """Queue jobs until `size` are queued (every tier alike, users round robin); seconds taken."""
        started = time.monotonic()
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, user_id, tier, kind, prompt, params, model_id, model_version_id, "
                    "                  max_attempts, created_at) "
                    "SELECT gen_random_uuid(), "
                    "       CAST(md5((CAST(:tiers AS text[]))[g % :k + 1] || '-' || (g / :k) % :users) AS uuid), "
                    "       (CAST(:tiers AS text[]))[g % :k + 1], 'text_to_video', 'p', '{}'::jsonb, :m, :v, 3, "
                    "       now() - random() * interval '1 hour' "
                    "FROM generate_series(:lo, :hi - 1) g"
                ),
                {
                    "tiers": self.tiers,
                    "k": len(self.tiers),
                    "users": USERS_PER_TIER,
                    "m": self.model_id,
                    "v": self.version_id,
                    "lo": self.size,
                    "hi": size,
                },
            )
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE jobs"))
        self.size = size
        return time.monotonic() - started


def capture_pass(engine: Engine) -> list[tuple[str, Any]]:
    """Run one real dispatch pass, rolled back; the statements it sent, with their parameters."""
    sent: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with Session(engine) as session:
            result = Dispatcher(clusters=[CLUSTER], ledger_store=LedgerStore(None)).run_pass(session)
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(result.releases) == MAX_BATCH, "the pass must be a full one for the sizes to compare"
    return sent


def plan_nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


def jobs_rows_read(plan: dict) -> int:
    return sum(
        round(
            (n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0) + n.get("Rows Removed by Index Recheck", 0))
            * n.get("Actual Loops", 0)
        )
        for n in plan_nodes(plan)
        if n.get("Relation Name") == "jobs"
    )


def measure_pass(engine: Engine) -> list[dict[str, Any]]:
    """Per statement of one pass, in order: rows of jobs it read and shared pages it touched."""
    statements = capture_pass(engine)
    measured = []
    with engine.connect() as conn:
        try:
            # In order, in one transaction: each statement sees what the ones before it did, as in the pass.
            for statement, parameters in statements:
                (explained,) = conn.exec_driver_sql(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters
                ).one()
                plan = explained[0]["Plan"]
                measured.append(
                    {
                        "sql": " ".join(statement.split())[:60],
                        "jobs_rows_read": jobs_rows_read(plan),
                        "shared_pages": plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0),
                    }
                )
        finally:
            conn.rollback()  # EXPLAIN ANALYZE ran the pass's updates for real
    return measured


def total(measured: list[dict[str, Any]], key: str) -> int:
    return sum(m[key] for m in measured)


@pytest.mark.slow
def test_a_dispatch_pass_reads_the_same_rows_at_10k_and_at_200k_queued_jobs(own_database):
    backlog = Backlog(own_database)
    seeded = {SMALL: backlog.grow_to(SMALL)}
    small = measure_pass(own_database)
    seeded[LARGE] = backlog.grow_to(LARGE)
    large = measure_pass(own_database)
    print(f"\nseconds to queue and VACUUM ANALYZE: {seeded}")
    for size, measured in ((SMALL, small), (LARGE, large)):
        print(
            f"{size:>9,} queued: "
            + "; ".join(f"{m['jobs_rows_read']} rows {m['shared_pages']} pages" for m in measured)
        )
    assert [m["sql"] for m in small] == [m["sql"] for m in large]
    # The pass reads at least what it decides (MAX_BATCH jobs locked and updated): the measure sees the pass.
    assert total(small, "jobs_rows_read") >= MAX_BATCH and total(large, "jobs_rows_read") >= MAX_BATCH
    # Statement by statement: a planner's seq scan of the small table in one statement must not hide the
    # backlog creeping into another. Absolute slack: EXPLAIN rounds rows per loop.
    for a, b in zip(small, large):
        assert b["jobs_rows_read"] <= MAX_ROWS_GROWTH * a["jobs_rows_read"] + 10, (a, b)
    assert total(large, "shared_pages") <= MAX_PAGES_GROWTH * total(small, "shared_pages"), (small, large)
