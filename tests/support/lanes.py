"""A dispatch "lane" for tests of the live dispatcher on real Postgres: a cluster, model, version and
pool of the test's own, its fake workers and jobs as rows, and a dispatcher restricted to it.

    lane = Lane(dispatch_limit=4)
    lane.workers(2)
    lane.jobs(user_id, "api", 10)
    lane.dispatcher().run_pass()
"""

from __future__ import annotations

import uuid

from sqlalchemy import text

from app.db.session import transaction
from app.scheduling.dispatcher import Dispatcher, LedgerStore


class Lane:
    """A cluster, model, version and pool of a test's own, so the session's other pools and jobs
    never reach its dispatcher; jobs and (fake) workers are rows the test inserts."""

    def __init__(self, dispatch_limit: int):
        suffix = uuid.uuid4().hex[:8]
        self.cluster, self.model = f"c-{suffix}", f"m-{suffix}"
        with transaction() as session:
            self.cluster_id = session.execute(
                text("INSERT INTO clusters (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": self.cluster}
            ).scalar_one()
            self.model_id = session.execute(
                text("INSERT INTO models (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": self.model}
            ).scalar_one()
            self.pool_id = session.execute(
                text(
                    "INSERT INTO pools (id, cluster_id, model_id, dispatch_limit) VALUES (gen_random_uuid(), :c, :m, :l) RETURNING id"
                ),
                {"c": self.cluster_id, "m": self.model_id, "l": dispatch_limit},
            ).scalar_one()
        self.version_id, self.version_digest = self.add_version(1)

    def add_version(self, number: int) -> tuple[uuid.UUID, str]:
        """A version row of the lane's model (no bundle behind it: the dispatcher reads only its
        digest); returns its id and digest."""
        digest = f"sha256:{uuid.uuid4().hex}"
        with transaction() as session:
            version_id = session.execute(
                text(
                    "INSERT INTO model_versions (id, model_id, number, digest, manifest, size_bytes) "
                    "VALUES (gen_random_uuid(), :m, :n, :d, '{}'::jsonb, 0) RETURNING id"
                ),
                {"m": self.model_id, "n": number, "d": digest},
            ).scalar_one()
        return version_id, digest

    def workers(self, n: int, *, age_s: float = 0, state: str = "idle") -> None:
        with transaction() as session:
            for _ in range(n):
                session.execute(
                    text(
                        "INSERT INTO workers (id, pool_id, hostname, pid, device, state, heartbeat_at) "
                        "VALUES (:id, :p, 'test', 1, 'cpu', :s, now() - make_interval(secs => :age))"
                    ),
                    {"id": f"w-{uuid.uuid4().hex[:8]}@test", "p": self.pool_id, "s": state, "age": age_s},
                )

    def jobs(self, user_id, tier: str, n: int, *, age_s: float = 0, state: str = "queued") -> list[uuid.UUID]:
        with transaction() as session:
            return list(
                session.execute(
                    text(
                        "INSERT INTO jobs (id, user_id, tier, kind, state, prompt, params, model_id, model_version_id, max_attempts, "
                        "created_at) SELECT gen_random_uuid(), :u, :t, 'text_to_video', :s, 'p', '{}'::jsonb, :m, :v, 3, "
                        "       now() - make_interval(secs => :age) + g * interval '1 millisecond' "
                        "FROM generate_series(1, :n) g RETURNING id"
                    ),
                    {
                        "u": user_id,
                        "t": tier,
                        "s": state,
                        "m": self.model_id,
                        "v": self.version_id,
                        "n": n,
                        "age": age_s,
                    },
                ).scalars()
            )

    def count(self, state: str) -> int:
        with transaction() as session:
            return session.execute(
                text("SELECT count(*) FROM jobs WHERE model_id = :m AND state = :s"), {"m": self.model_id, "s": state}
            ).scalar_one()

    def start(self, n: int) -> None:
        """What a worker's claim does: dispatched -> running."""
        with transaction() as session:
            session.execute(
                text(
                    "UPDATE jobs SET state = 'running', started_at = now() WHERE id IN "
                    "(SELECT id FROM jobs WHERE model_id = :m AND state = 'dispatched' ORDER BY dispatched_at LIMIT :n)"
                ),
                {"m": self.model_id, "n": n},
            )

    def finish_running(self) -> None:
        with transaction() as session:
            session.execute(
                text(
                    "UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE model_id = :m AND state = 'running'"
                ),
                {"m": self.model_id},
            )

    def dispatcher(self, **kwargs) -> Dispatcher:
        return Dispatcher(clusters=[self.cluster], ledger_store=LedgerStore(None), **kwargs)
