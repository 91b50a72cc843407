"""docs/api.md: with the database down, the API answers 503 with Retry-After, nothing is stored,
and an Idempotency-Key retry never makes a second job.

On the chaos stack's own Postgres and Redis (tests/support/chaos_setup.py; the API under gunicorn,
no workers: the jobs only need to be stored), clients POST /v1/generations, each with its own
Idempotency-Key, and retry with that key until the job is accepted, then send the same request
once more, as a client whose answer was lost would. Two outages:

    down     Postgres stopped, then started: every attempt fails fast (503) until it is back
    stalled  Postgres frozen (SIGSTOP), then thawed: each attempt hangs until the client gives up
             (its answer lost) while the API still holds it; after the thaw the held attempts
             run concurrently with the client's next retry, all with the same key

Either way each key has exactly one job row, and every success a client got names that job.
"""

from __future__ import annotations

import collections
import threading
import uuid

import pytest

from tests.support.chaos_setup import MODEL, ChaosStack, Submissions, post_until_accepted, wait_for

pytestmark = pytest.mark.slow

CLIENTS = 4


@pytest.fixture(scope="module")
def outage(stack_env, tmp_path_factory):
    stack = ChaosStack(tmp_path_factory.mktemp("idempotency-outage"), stack_env, workers=False, users=2)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def start_clients(stack: ChaosStack, key: str, seen: Submissions, request_timeout_s: float):
    """One thread per Idempotency-Key: POST until accepted, then the same request once more."""
    bodies = {str(uuid.uuid4()): {"prompt": f"outage {n}", "model": MODEL, "num_frames": 8} for n in range(CLIENTS)}
    results: dict[str, list[str]] = {}
    failures: list[BaseException] = []

    def client(idem: str, body: dict) -> None:
        try:
            results[idem] = [
                post_until_accepted(
                    stack.api_url, key, body, seen, idempotency_key=idem, request_timeout_s=request_timeout_s
                )
                for _ in range(2)
            ]
        except BaseException as exc:  # the test thread reports it
            failures.append(exc)

    threads = [threading.Thread(target=client, args=item) for item in bodies.items()]
    for thread in threads:
        thread.start()
    return bodies, results, failures, threads


def outcomes_per_key(seen: Submissions) -> dict[str, collections.Counter]:
    per_key: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with seen.lock:
        for idem, outcome in seen.statuses:
            per_key[idem][outcome.split()[0]] += 1
    return per_key


def assert_one_job_per_key(stack: ChaosStack, user: str, bodies: dict, results: dict, seen: Submissions) -> None:
    rows = stack.rows(
        "SELECT idempotency_key, id::text, prompt FROM jobs WHERE user_id = %s ORDER BY created_at", (user,)
    )
    by_key = collections.defaultdict(list)
    for idem, job_id, prompt in rows:
        by_key[idem].append((job_id, prompt))
    assert len(rows) == CLIENTS, f"{len(rows)} job rows for {CLIENTS} keys: {rows}"
    for idem, body in bodies.items():
        assert len(by_key[idem]) == 1, f"key {idem}: rows {by_key[idem]}"
        job_id, prompt = by_key[idem][0]
        assert prompt == body["prompt"]
        successes = [o.split()[1] for i, o in seen.statuses if i == idem and o[0] == "2"]
        assert results[idem] == [job_id, job_id] and set(successes) == {job_id}, (idem, successes, job_id)


def test_retries_while_postgres_is_down_make_one_job_per_key(outage):
    key, user = outage.keys[0], outage.users[0]
    seen = Submissions()
    with outage.postgres_down():
        bodies, results, failures, threads = start_clients(outage, key, seen, request_timeout_s=10)
        # Down until every client has been refused twice: each retried during the outage.
        wait_for(
            lambda: all(outcomes_per_key(seen)[idem]["503"] >= 2 for idem in bodies),
            lambda: f"every client refused twice while Postgres is down: {dict(seen.errors)}",
        )
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    per_key = outcomes_per_key(seen)
    print(f"\nidempotency, Postgres down: answers per key {[dict(c) for c in per_key.values()]}")
    # Refusals are the documented 503 (never a 500), then one 202 and the replay's 200.
    for idem in bodies:
        assert set(per_key[idem]) == {"503", "202", "200"} and (per_key[idem]["202"], per_key[idem]["200"]) == (1, 1), (
            per_key[idem]
        )
    assert_one_job_per_key(outage, user, bodies, results, seen)


def test_retries_while_postgres_stalls_make_one_job_per_key(outage):
    key, user = outage.keys[1], outage.users[1]
    seen = Submissions()
    answers_before = outage.api_answers()
    with outage.postgres_frozen():
        bodies, results, failures, threads = start_clients(outage, key, seen, request_timeout_s=1.0)
        # Frozen until every client has given up on two attempts the API still holds.
        wait_for(
            lambda: all(outcomes_per_key(seen)[idem]["ReadTimeout"] >= 2 for idem in bodies),
            lambda: f"every client timed out twice while Postgres is frozen: {dict(seen.errors)}",
        )
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    # Every attempt reached the API; wait until it has answered each one (its request counter),
    # the held ones included, so a late insert by any of them is in the table before we count.
    sent = len(seen.statuses)
    wait_for(
        lambda: (outage.api_answers() - answers_before).total() >= sent,
        lambda: f"the API answered all {sent} attempts: {outage.api_answers()}",
    )
    answers = outage.api_answers() - answers_before
    print(
        f"\nidempotency, Postgres stalled: client saw {dict(collections.Counter(o.split()[0] for _, o in seen.statuses))}"
        f"; the API answered {dict(answers)}"
    )
    assert_one_job_per_key(outage, user, bodies, results, seen)
    # The held attempts ran together after the thaw: one made the job, each other one answered
    # with it (200), none with a 500 for losing the race on the key's unique index.
    assert set(answers) <= {"200", "202"} and answers["202"] == CLIENTS, dict(answers)
