"""Chaos: every accepted job finishes exactly once through worker kills, a Postgres restart and a
wiped broker, and each fault is shown to have hit work and to have been recovered.

The stack is the chaos stack's own (tests/support/chaos_setup.py): embedded Postgres and Redis,
the API under gunicorn, two control+cpu workers (two dispatchers), three GPU workers (CPU device)
serving the tiny fixture model, and celery beat running the maintenance tasks every second with
a 3 s job lease.

While 200 jobs are submitted through the HTTP API (each retried with its own Idempotency-Key
whenever the API cannot answer), the test SIGKILLs a GPU worker mid-job, restarts Postgres while
a job runs, kills a second worker, FLUSHALLs Redis while messages wait in the queues, and kills a
third worker. A poison job kills its worker on every attempt. What each fault leaves behind is
asserted per fault:

    worker kill       the job it was running is requeued by the reaper (`lease_expired`, naming
                      the killed worker), runs again and succeeds
    Postgres restart  the API refused submissions while it was down (503), and a job whose run
                      failed on the database (Postgres stays down until one has) is requeued by
                      the reaper (`lease_expired`, naming its live worker) and succeeds
    FLUSHALL          every job whose message was wiped goes back to the queue, at least one as
                      `broker_lost_message` by the reconciler

and at the end: every accepted job succeeded exactly once, the jobs table holds exactly one row
per accepted submission (a retry that made a second job would show there), and the poison job
failed after exactly its max attempts.
"""

from __future__ import annotations

import collections
import sys
import threading
import time

import pytest
import redis
import requests

from tests.support.chaos_setup import (
    MAX_ATTEMPTS,
    MODEL,
    ChaosStack,
    Submissions,
    post_until_accepted,
    wait_for,
)
from tests.support.stack import ROOT

pytestmark = pytest.mark.slow

JOBS = 200

# A job's requeue by the reaper (lease ran out) or the reconciler (message lost), after `at`.
_REQUEUES = """
    SELECT job_id::text, detail->>'reason', detail->>'by', detail->>'worker', at FROM job_events
    WHERE job_id = ANY(%s::uuid[]) AND from_state IN ('running', 'dispatched') AND to_state = 'queued' AND at > %s
"""


@pytest.fixture(scope="module")
def chaos(stack_env, tmp_path_factory):
    stack = ChaosStack(tmp_path_factory.mktemp("chaos"), stack_env)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def requeues(stack: ChaosStack, job_ids: list[str], after) -> list[tuple]:
    return stack.rows(_REQUEUES, (job_ids, after))


# What a GPU worker logs when a job's run fails on the database (a progress write in the model's
# loop, or the tail's completion): the job stays `running` for its lease to run out.
_RUN_BROKE = ("job failed in model code", "job failed after its model ran")


def broken_runs(stack: ChaosStack, job_ids: set[str]) -> set[str]:
    return {line["job_id"] for msg in _RUN_BROKE for line in stack.log_lines("gpu-", msg=msg)} & job_ids


def test_kills_a_wiped_broker_and_a_postgres_restart_lose_nothing_and_run_nothing_twice(chaos):
    seen = Submissions()
    poison_seen = Submissions()
    started = time.monotonic()
    feeding = threading.Event()
    feeding.set()

    def feed() -> None:
        try:
            for index in range(JOBS):
                if not feeding.is_set():
                    return  # the test failed: stop submitting
                key = chaos.keys[index % len(chaos.keys)]
                body = {"prompt": f"chaos {index}", "model": MODEL, "num_frames": 8}
                post_until_accepted(chaos.api_url, key, body, seen)
                time.sleep(0.05)  # the arrival rate: ~200 jobs over the faults
        finally:
            feeding.clear()

    # Each fault is asserted to have hit work as soon as it is done: a running job for every kill
    # and for the restart, waiting messages for the flush.
    def killed(kill):
        assert kill.busy, f"{kill.worker} was killed while it ran no job"
        return kill

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        poison = post_until_accepted(
            chaos.api_url, chaos.keys[0], {"prompt": "segfault", "model": MODEL, "num_frames": 8}, poison_seen
        )
        kills = [killed(chaos.kill_gpu_mid_job(0, exclude={poison}))]
        refused_before = seen.count("503")
        restart = chaos.restart_postgres(
            exclude={poison, *(k.job_id for k in kills)},
            # Down until the outage reached a client (the API refused a submission) and a running
            # job (its run failed on the database).
            until=lambda running: (
                (seen.count("503") > refused_before or not feeding.is_set())
                and broken_runs(chaos, {job for job, _ in running})
            ),
        )
        restart_hits = {job for job, _ in restart.running}
        broken = broken_runs(chaos, restart_hits)
        kills.append(killed(chaos.kill_gpu_mid_job(1, exclude={poison, *restart_hits})))
        flush = chaos.flush_broker()
        assert flush.lost, "FLUSHALL wiped no waiting message"
        kills.append(killed(chaos.kill_gpu_mid_job(2, exclude={poison, *restart_hits})))
        feeder.join()
    finally:
        feeding.clear()
    feed_s = time.monotonic() - started
    accepted = seen.accepted
    assert len(accepted) == JOBS and len(set(accepted)) == JOBS
    assert not restart_hits & {k.job_id for k in kills}

    # Each fault's own recovery, within a bound that only a working recovery meets (lease 3 s +
    # maintenance every 1 s; the rest is slack for a loaded machine).
    def killed_job_requeued(kill):
        return [
            r for r in requeues(chaos, [kill.job_id], kill.at) if r[1:4] == ("lease_expired", "reaper", kill.worker)
        ]

    for kill in kills:
        wait_for(
            lambda kill=kill: killed_job_requeued(kill),
            lambda: f"the reaper requeues {kill.job_id}, the job of killed {kill.worker}\n{chaos.tails()}",
        )
    hit_by_restart = wait_for(
        lambda: [
            r
            for r in requeues(chaos, sorted(broken), restart.at)
            if r[1:3] == ("lease_expired", "reaper") and (r[0], r[3]) in restart.running
        ],
        lambda: f"the reaper requeues a job whose run the Postgres restart broke ({broken})\n{chaos.tails()}",
    )
    lost_jobs = sorted(set(flush.lost_jobs))
    wait_for(
        lambda: {r[0] for r in requeues(chaos, lost_jobs, flush.at)} == set(lost_jobs),
        lambda: f"every job whose message FLUSHALL wiped is queued again ({flush.lost})\n{chaos.tails()}",
    )
    flush_requeues = requeues(chaos, lost_jobs, flush.at)
    assert any(r[1:3] == ("broker_lost_message", "reconciler") for r in flush_requeues), flush_requeues

    ids = accepted + [poison]
    deadline = time.monotonic() + 240
    while True:
        states = dict(chaos.rows("SELECT state, count(*) FROM jobs WHERE id = ANY(%s::uuid[]) GROUP BY state", (ids,)))
        if sum(states.get(s, 0) for s in ("succeeded", "failed", "cancelled")) == len(ids):
            break
        assert time.monotonic() < deadline, f"not finished: {states}\n{chaos.tails()}"
        time.sleep(0.5)
    elapsed = time.monotonic() - started

    outcome = dict(
        chaos.rows("SELECT state, count(*) FROM jobs WHERE id = ANY(%s::uuid[]) GROUP BY state", (accepted,))
    )
    # Every row of the chaos users, not only the accepted ids: a second job made by a retry
    # (during the Postgres restart, say) would be a row no client was given.
    rows_per_user = chaos.rows(
        "SELECT count(*), count(DISTINCT idempotency_key), count(*) FILTER (WHERE id = ANY(%s::uuid[])) "
        "FROM jobs WHERE user_id = ANY(%s::uuid[])",
        (ids, chaos.users),
    )[0]
    completions = dict(
        chaos.rows(
            "SELECT job_id::text, count(*) FROM job_events WHERE job_id = ANY(%s::uuid[]) "
            "AND to_state IN ('succeeded', 'failed') AND from_state <> to_state GROUP BY job_id",
            (ids,),
        )
    )
    recoveries = dict(
        chaos.rows(
            "SELECT coalesce(detail->>'reason', 'redelivered'), count(*) FROM job_events WHERE job_id = ANY(%s::uuid[]) "
            "AND ((to_state = 'queued' AND from_state <> 'queued') OR (from_state = 'running' AND to_state = 'running' "
            "AND detail->>'step' IS NULL)) GROUP BY 1",
            (ids,),
        )
    )
    attempts = dict(
        chaos.rows(
            "SELECT attempts, count(*) FROM jobs WHERE id = ANY(%s::uuid[]) GROUP BY attempts ORDER BY 1", (accepted,)
        )
    )
    killed_jobs = dict(
        chaos.rows(
            "SELECT id::text, state || ' after ' || attempts || ' attempts' FROM jobs WHERE id = ANY(%s::uuid[])",
            ([k.job_id for k in kills] + sorted(restart_hits),),
        )
    )
    poison_job = chaos.rows("SELECT state, failure_code, attempts FROM jobs WHERE id = %s", (poison,))[0]
    # Every claim of the poison job (dispatched or redelivered -> running), the last one included
    # when the claim itself ended it.
    poison_claims = chaos.scalar(
        "SELECT count(*) FROM job_events WHERE job_id = %s AND to_state = 'running' "
        "AND from_state IN ('dispatched', 'running') AND detail->>'step' IS NULL",
        (poison,),
    )
    print(
        f"\nchaos: {JOBS} jobs + 1 poison in {elapsed:.1f}s (fed in {feed_s:.1f}s); API errors retried "
        f"{dict(seen.errors)}"
        f"\n  kills {[(k.worker.split('@')[0], killed_jobs[k.job_id]) for k in kills]}, requeued by the reaper "
        f"{[round((killed_job_requeued(k)[0][4] - k.at).total_seconds(), 1) for k in kills]} s after the kill"
        f"\n  postgres restart: down {restart.down_s:.1f}s, {len(restart.running)} running jobs hit, "
        f"{len(broken)} runs broken, {len(hit_by_restart)} requeued by the reaper"
        f"\n  flushall: {len(flush.lost)} waiting messages wiped, requeued "
        f"{dict(collections.Counter(r[1] for r in flush_requeues))}"
        f"\n  outcome {outcome}; rows for the chaos users {rows_per_user[0]}; completions per job "
        f"{collections.Counter(completions.values())}"
        f"\n  recoveries {recoveries}; attempts {attempts}"
        f"\n  poison job: {poison_job}, claimed {poison_claims} times"
    )

    assert outcome == {"succeeded": JOBS}, outcome
    assert rows_per_user == (JOBS + 1, JOBS + 1, JOBS + 1), f"jobs for the chaos users: {rows_per_user}"
    assert set(seen.errors) <= {"503", "429", "ConnectionError"}, f"the API answered {dict(seen.errors)}"
    assert "503" in seen.errors, "no submission was refused while Postgres was down"
    assert set(completions.values()) == {1}, "a job completed twice"
    assert len(completions) == JOBS + 1
    for job in [k.job_id for k in kills] + sorted(broken):
        assert killed_jobs[job].startswith("succeeded") and int(killed_jobs[job].split()[2]) >= 2, killed_jobs[job]
    # Killed on each of its max attempts: the claim after the last one fails it
    # (max_attempts_exceeded, that claim counted), or the reaper does when that last death is
    # seen through the lease instead (worker_lost). Either way the model ran MAX_ATTEMPTS times.
    assert poison_job[0] == "failed"
    assert (poison_job[1], poison_job[2]) in (
        ("max_attempts_exceeded", MAX_ATTEMPTS + 1),
        ("worker_lost", MAX_ATTEMPTS),
    ), poison_job
    assert poison_claims == poison_job[2], f"{poison_claims} claims for {poison_job[2]} attempts"


# Publishes dreamq.generate messages exactly as the dispatcher does, one per stdin line
# "JOB QUEUE SEQ", with the stack's settings; started before it is needed, so a message goes out
# within milliseconds of the test asking (the imports take seconds on a loaded machine).
_PUBLISHER = """
import sys, uuid
from app.messaging import Release, get_publisher
print("ready", flush=True)
for line in sys.stdin:
    job, queue, seq = line.split()
    get_publisher().release([Release(uuid.UUID(job), queue, int(seq), "api")])
    print("sent", flush=True)
"""


def test_a_redelivered_message_of_a_running_job_does_not_run_it_twice(chaos):
    """What Redis does when a job outlives the visibility timeout: deliver its message again.

    soft < hard < visibility timeout (enforced at start) keeps that from happening; if it does
    (a misconfigured broker, a manual restore), the second delivery must not run the job. While
    the job's model runs on one worker, its message is published twice more: to the pool's queue,
    where an idle worker takes it while the job's lease is live, and to the running worker's own
    queue, which that worker takes as soon as its task returns, while the job is still running in
    its tail or waiting for finalize (the same worker, so not a lost child's redelivery either).
    """
    import subprocess

    from app.core.queues import pool_queue, pool_queue_prefix, worker_queue

    with subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER],
        env=chaos.env,
        cwd=str(ROOT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as publisher:
        try:
            assert publisher.stdout is not None and publisher.stdin is not None
            assert publisher.stdout.readline().strip() == "ready"
            response = requests.post(
                f"{chaos.api_url}/v1/generations",
                json={"prompt": "long", "model": MODEL, "num_frames": 60},
                headers={"Authorization": f"Bearer {chaos.keys[1]}"},
                timeout=10,
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            worker, seq = wait_for(
                lambda: chaos.rows(
                    "SELECT worker_id, dispatch_seq FROM jobs WHERE id = %s AND state = 'running' AND progress < 0.5",
                    (job_id,),
                ),
                "the long job running its model",
                poll_s=0.02,
            )[0]
            queues = [
                pool_queue("local", MODEL, "api"),
                worker_queue(pool_queue_prefix("local", MODEL), worker, "api"),
            ]
            for queue in queues:
                publisher.stdin.write(f"{job_id} {queue} {seq}\n")
                publisher.stdin.flush()
                assert publisher.stdout.readline().strip() == "sent"
        finally:
            publisher.kill()
    # Both went out while the model still ran on that worker (60 steps of 50 ms).
    assert chaos.rows("SELECT worker_id, progress < 0.9 FROM jobs WHERE id = %s", (job_id,))[0] == (worker, True)
    wait_for(
        lambda: chaos.scalar("SELECT count(*) FROM jobs WHERE id = %s AND state IN ('succeeded', 'failed')", (job_id,)),
        lambda: f"the long job finished\n{chaos.tails()}",
        timeout_s=60,
    )

    def refusals() -> list[dict]:
        # Of this dispatch's messages (a message of an earlier dispatch, requeued while a worker
        # was still loading the model, is refused as stale, too).
        return chaos.log_lines(
            "gpu-",
            job_id=job_id,
            dispatch_seq=seq,
            msg="message does not match the job's state; acknowledged without running",
        )

    def duplicates_handled() -> bool:
        # Both duplicates delivered, refused by the claim (the log line of the worker that took
        # each) and acknowledged: waiting in no queue, delivered-unacknowledged nowhere.
        with redis.Redis.from_url(chaos.redis.url) as client:
            unacked = [raw for raw in client.hvals("unacked") if job_id.encode() in raw]
            return len(refusals()) == 2 and not unacked and not any(client.llen(q) for q in queues)

    wait_for(duplicates_handled, lambda: f"both duplicates refused and acknowledged: {refusals()}\n{chaos.tails()}")
    claims = chaos.scalar(
        "SELECT count(*) FROM job_events WHERE job_id = %s AND to_state = 'running' AND detail->>'step' IS NULL",
        (job_id,),
    )
    generated = chaos.scalar(
        "SELECT count(*) FROM job_events WHERE job_id = %s AND detail->>'step' = 'generated'", (job_id,)
    )
    state = chaos.rows("SELECT state, attempts FROM jobs WHERE id = %s", (job_id,))[0]
    assert state == ("succeeded", 1), state
    assert (claims, generated) == (1, 1)
    # The running worker refused the copy in its own queue itself.
    assert worker.split("@")[0] in {line["component"] for line in refusals()}, refusals()
