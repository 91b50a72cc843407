"""The live dispatcher against real Postgres: limits, liveness, rotation, floors, concurrency.

Each test gets its own cluster, model and pool (a "lane") and a dispatcher restricted to that
cluster, so the session's other pools and jobs never interfere.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import text

from app.db.session import after_commit, transaction
from app.jobs.workers import DISPATCH_PER_WORKER, MAX_PER_WORKER, worker_depth
from app.scheduling.dispatcher import Dispatcher
from tests.support.factories import create_user
from tests.support.lanes import Lane


def run_pass(dispatcher: Dispatcher):
    with transaction() as session:
        return dispatcher.run_pass(session)


@pytest.fixture()
def users(stack_env):
    return lambda tier="api", n=1: [create_user(tier)[0] for _ in range(n)]


def test_the_dispatch_limit_is_never_exceeded_and_freed_room_is_refilled(users):
    lane = Lane(dispatch_limit=8)
    lane.workers(4)
    (user,) = users("api")
    lane.jobs(user, "api", 30)
    dispatcher = lane.dispatcher()
    first = run_pass(dispatcher)
    assert len(first.releases) == 8 and first.room == 8
    assert {r.queue for r in first.releases} == {f"{lane.cluster}.{lane.model}.api"}
    assert run_pass(dispatcher).releases == []
    lane.start(3)
    assert len(run_pass(dispatcher).releases) == 3
    assert lane.count("dispatched") == 8 and lane.count("running") == 3


def test_a_pool_without_live_workers_receives_nothing(users):
    lane = Lane(dispatch_limit=8)
    (user,) = users("api")
    lane.jobs(user, "api", 10)
    dispatcher = lane.dispatcher()
    assert run_pass(dispatcher).releases == []
    lane.workers(2, age_s=120)  # heartbeats too old: gone
    lane.workers(1, state="draining")  # draining takes nothing new
    assert run_pass(dispatcher).releases == []
    lane.workers(1)
    # One live worker: its share of the limit, not the pool's whole limit.
    assert len(run_pass(dispatcher).releases) == DISPATCH_PER_WORKER


def test_a_worker_with_short_jobs_is_given_half_a_second_of_them(users):
    lane = Lane(dispatch_limit=1000)
    lane.workers(2)
    (user,) = users("api")
    lane.jobs(user, "api", 200)
    dispatcher = lane.dispatcher()
    # No job time reported yet: DISPATCH_PER_WORKER each.
    assert len(run_pass(dispatcher).releases) == 2 * DISPATCH_PER_WORKER
    with transaction() as session:
        session.execute(
            text("UPDATE workers SET info = info || CAST(:i AS jsonb) WHERE pool_id = :p"),
            {"i": '{"job_s": 0.02}', "p": lane.pool_id},
        )
    # 20 ms jobs: QUEUED_WORK_S / 0.02 = 25 each, 50 for the pool, 4 of them already out.
    assert worker_depth(0.02) == 25 and worker_depth(60.0) == DISPATCH_PER_WORKER
    assert worker_depth(0.0001) == MAX_PER_WORKER and worker_depth(None) == DISPATCH_PER_WORKER
    assert len(run_pass(dispatcher).releases) == 50 - 2 * DISPATCH_PER_WORKER
    assert run_pass(dispatcher).releases == []


def test_one_users_burst_does_not_hold_back_other_users_of_the_tier(users):
    lane = Lane(dispatch_limit=4)
    lane.workers(4)
    heavy, light = users("enterprise", 2)
    lane.jobs(heavy, "enterprise", 300, age_s=60)  # older than the light user's job
    (light_job,) = lane.jobs(light, "enterprise", 1)
    released = {r.job_id for r in run_pass(lane.dispatcher()).releases}
    assert light_job in released and len(released) == 4


def test_user_concurrency_cap_is_respected(users):
    lane = Lane(dispatch_limit=16)
    lane.workers(8)
    (user,) = users("free")  # free tier: cap 2 per user
    lane.jobs(user, "free", 10)
    dispatcher = lane.dispatcher()
    assert len(run_pass(dispatcher).releases) == 2
    lane.start(2)
    assert run_pass(dispatcher).releases == []
    lane.finish_running()
    assert len(run_pass(dispatcher).releases) == 2


def test_paid_tiers_go_first_but_the_free_floor_is_kept(users):
    lane = Lane(dispatch_limit=10)
    lane.workers(5)
    api_users = users("api", 5)
    free_users = users("free", 60)
    for user in api_users:
        lane.jobs(user, "api", 200, age_s=50)  # api is pressed: 50 s of its 60 s W
    for user in free_users:
        lane.jobs(user, "free", 1, age_s=60)
    dispatcher = lane.dispatcher()
    tiers = {"api": 0, "free": 0}
    for _ in range(30):
        result = run_pass(dispatcher)
        dispatcher.ledger_store.record(result.now, result.per_tier())
        for release in result.releases:
            tiers[release.tier] += 1
        lane.start(len(result.releases))
        lane.finish_running()
    total = sum(tiers.values())
    assert total == 300
    assert tiers["api"] > 0.9 * total
    # min_share of free is 0.03: it gets at least that while it has a backlog.
    assert tiers["free"] >= int(0.03 * total)


def test_two_dispatchers_at_once_never_release_a_job_twice_or_exceed_the_limit(users):
    lane = Lane(dispatch_limit=6)
    lane.workers(3)
    all_users = users("unlimited", 12)
    for user in all_users:
        lane.jobs(user, "unlimited", 25)
    stop = threading.Event()
    released: list[uuid.UUID] = []
    over_limit: list[int] = []
    errors: list[BaseException] = []

    def dispatch_loop():
        dispatcher = lane.dispatcher()
        try:
            while not stop.is_set():
                released.extend(r.job_id for r in run_pass(dispatcher).releases)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def worker_loop():
        while not stop.is_set():
            lane.start(2)
            lane.finish_running()
            time.sleep(0.005)

    def sampler():
        while not stop.is_set():
            in_flight = lane.count("dispatched")
            if in_flight > 6:
                over_limit.append(in_flight)

    threads = [threading.Thread(target=f) for f in (dispatch_loop, dispatch_loop, worker_loop, sampler)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while lane.count("queued") and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert lane.count("queued") == 0
    assert over_limit == []
    assert len(released) == len(set(released)) == 300
    with transaction() as session:
        doubled = session.execute(
            text(
                "SELECT e.job_id FROM job_events e JOIN jobs j ON j.id = e.job_id "
                "WHERE j.model_id = :m AND e.to_state = 'dispatched' GROUP BY e.job_id HAVING count(*) > 1"
            ),
            {"m": lane.model_id},
        ).all()
    assert doubled == []


def test_after_commit_callbacks_run_only_when_the_transaction_commits(stack_env):
    ran = []
    with transaction() as session:
        after_commit(session, lambda: ran.append("committed"))
        session.execute(text("SELECT 1"))
    with pytest.raises(RuntimeError):
        with transaction() as session:
            after_commit(session, lambda: ran.append("rolled back"))
            raise RuntimeError("boom")
    assert ran == ["committed"]


def test_a_failed_publish_returns_the_batch_to_the_queue(users, monkeypatch):
    import tasks.dispatch as dispatch_module
    from app.messaging import get_publisher

    lane = Lane(dispatch_limit=4)
    lane.workers(2)
    (user,) = users("api")
    lane.jobs(user, "api", 6)

    def broker_down(releases):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(get_publisher(), "release", broker_down)
    result = dispatch_module.dispatch_once(lane.dispatcher())
    assert len(result.releases) == 4
    # Committed as dispatched, then put back by the after-commit handler: nothing holds room.
    assert lane.count("dispatched") == 0 and lane.count("queued") == 6
    with transaction() as session:
        reasons = (
            session.execute(
                text(
                    "SELECT e.detail->>'reason' FROM job_events e JOIN jobs j ON j.id = e.job_id "
                    "WHERE j.model_id = :m AND e.from_state = 'dispatched' AND e.to_state = 'queued'"
                ),
                {"m": lane.model_id},
            )
            .scalars()
            .all()
        )
    assert reasons == ["publish_failed"] * 4
