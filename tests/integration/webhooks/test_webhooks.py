"""Webhooks on real services: address checks at submission and delivery, the admin allow-list,
signed deliveries through real Celery workers, retries with backoff, and the delivery log."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import socket
import time
import uuid

import pytest
from sqlalchemy import select, text

from app.db.models import Job, WebhookDelivery
from app.db.session import transaction
from tests.support.factories import auth
from tests.support.jobs import wait_done
from tests.support.webhooks import WEBHOOK_TEST_ENV, Receiver

PUBLIC_IP = "93.184.216.34"
MAX_ATTEMPTS = int(WEBHOOK_TEST_ENV["DREAMQ_WEBHOOK_MAX_ATTEMPTS"])
PROGRESS_INTERVAL_S = float(WEBHOOK_TEST_ENV["DREAMQ_WEBHOOK_PROGRESS_INTERVAL_S"])
BACKOFF_BASE_S = float(WEBHOOK_TEST_ENV["DREAMQ_WEBHOOK_BACKOFF_BASE_S"])


@pytest.fixture()
def user(make_user):
    return make_user("api")


@pytest.fixture()
def admin_key(make_user):
    return make_user("api", scopes=("user", "admin"))[1]


@pytest.fixture()
def allow(client, admin_key):
    """Allow-list entries through the admin route, removed at the end of the test."""
    created = []

    def add(**entry) -> dict:
        response = client.post("/v1/admin/webhooks/allowlist", json=entry, headers=auth(admin_key))
        assert response.status_code == 201, response.json
        created.append(response.json["id"])
        return response.json

    yield add
    for entry_id in created:
        client.delete(f"/v1/admin/webhooks/allowlist/{entry_id}", headers=auth(admin_key))


@pytest.fixture()
def fake_dns(monkeypatch):
    """Names under .dreamq.test resolve to whatever the test says; everything else as usual."""
    real = socket.getaddrinfo
    table: dict[str, list[str]] = {}

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host in table:
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def submit(client, key, model, **fields):
    body = {"prompt": "a webhook test", "model": model, **fields}
    return client.post("/v1/generations", json=body, headers=auth(key))


def job_count(user_id) -> int:
    with transaction() as session:
        return session.execute(text("SELECT count(*) FROM jobs WHERE user_id = :u"), {"u": str(user_id)}).scalar_one()


def assert_refused(response, words: str) -> None:
    assert response.status_code == 422, response.json
    fields = response.json["error"]["fields"]
    assert [f["field"] for f in fields] == ["callback_url"], fields
    assert words in fields[0]["reason"], fields[0]["reason"]


# --- address checks at submission ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://0x7f.1/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "IPv6 form of 127.0.0.1, a loopback"),
        ("http://[::ffff:169.254.169.254]/hook", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
        ("ftp://example.com/hook", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("http://user:pass@example.com/hook", "credentials"),
        ("http://user@example.com/hook", "credentials"),
    ],
)
def test_callback_urls_that_reach_inside_are_refused_and_nothing_is_stored(client, user, parked_model, url, words):
    user_id, key = user
    assert_refused(submit(client, key, "parked", callback_url=url), words)
    assert job_count(user_id) == 0


def test_a_name_that_resolves_to_loopback_is_refused(client, user, parked_model, fake_dns):
    user_id, key = user
    fake_dns["rebind.dreamq.test"] = ["127.0.0.1"]
    assert_refused(
        submit(client, key, "parked", callback_url="https://rebind.dreamq.test/hook"),
        "host 'rebind.dreamq.test' resolves to 127.0.0.1, a loopback address",
    )
    # Every address must pass: one public address does not excuse a private one.
    fake_dns["mixed.dreamq.test"] = [PUBLIC_IP, "10.0.0.7"]
    assert_refused(submit(client, key, "parked", callback_url="https://mixed.dreamq.test/hook"), "10.0.0.7, a private")
    fake_dns["public.dreamq.test"] = [PUBLIC_IP]
    accepted = submit(client, key, "parked", callback_url="https://public.dreamq.test/hook")
    assert accepted.status_code == 202, accepted.json
    assert accepted.json["callback_url"] == "https://public.dreamq.test/hook"
    assert accepted.json["webhook_events"] == ["started", "completed"]
    assert job_count(user_id) == 1


def test_events_filter_is_validated(client, user, parked_model, fake_dns):
    _, key = user
    fake_dns["public.dreamq.test"] = [PUBLIC_IP]
    bad = submit(client, key, "parked", callback_url="https://public.dreamq.test/h", webhook_events=["finished"])
    assert bad.status_code == 422 and bad.json["error"]["fields"][0]["field"].startswith("webhook_events")
    orphan = submit(client, key, "parked", webhook_events=["started"])
    assert orphan.status_code == 422 and "needs a callback_url" in orphan.json["error"]["message"]
    ok = submit(
        client,
        key,
        "parked",
        callback_url="https://public.dreamq.test/h",
        webhook_events=["completed", "progress", "completed"],
    )
    assert ok.status_code == 202 and ok.json["webhook_events"] == ["progress", "completed"]


def test_admin_allowlist_lets_one_loopback_port_through(client, user, admin_key, parked_model, allow):
    user_id, key = user
    assert client.get("/v1/admin/webhooks/allowlist", headers=auth(key)).status_code == 403
    refused = client.post("/v1/admin/webhooks/allowlist", json={"network": "not-a-network"}, headers=auth(admin_key))
    assert refused.status_code == 422 and refused.json["error"]["fields"][0]["field"] == "network"
    both = client.post(
        "/v1/admin/webhooks/allowlist", json={"network": "10.0.0.0/8", "host": "x"}, headers=auth(admin_key)
    )
    assert both.status_code == 422

    with socket.socket() as s:  # a port nothing else in this test allow-lists
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    assert_refused(submit(client, key, "parked", callback_url=url), "loopback")

    entry = allow(network="127.0.0.1", port=port, note="test receiver")
    assert entry["network"] == "127.0.0.1/32" and entry["port"] == port
    listed = client.get("/v1/admin/webhooks/allowlist", headers=auth(admin_key)).json["data"]
    assert entry["id"] in {e["id"] for e in listed}
    assert submit(client, key, "parked", callback_url=url).status_code == 202
    # Only that port: the rest of the host stays closed.
    assert_refused(
        submit(client, key, "parked", callback_url=f"http://127.0.0.1:{port + 1 if port < 65535 else 1}/"), "loopback"
    )

    assert client.delete(f"/v1/admin/webhooks/allowlist/{entry['id']}", headers=auth(admin_key)).status_code == 204
    assert client.delete(f"/v1/admin/webhooks/allowlist/{entry['id']}", headers=auth(admin_key)).status_code == 404
    assert_refused(submit(client, key, "parked", callback_url=url), "loopback")
    assert job_count(user_id) == 1


def test_each_user_has_a_secret_and_can_rotate_it(client, user, make_user):
    _, key = user
    _, other_key = make_user("api")
    mine = client.get("/v1/webhooks/secret", headers=auth(key)).json["secret"]
    theirs = client.get("/v1/webhooks/secret", headers=auth(other_key)).json["secret"]
    assert len(mine) == 64 and int(mine, 16) >= 0 and mine != theirs
    rotated = client.post("/v1/webhooks/secret/rotate", headers=auth(key)).json["secret"]
    assert rotated != mine and client.get("/v1/webhooks/secret", headers=auth(key)).json["secret"] == rotated


# --- delivery-time checks (in process: one attempt, no worker) --------------------------------


def _queued_delivery(client, key, url: str) -> str:
    """A parked job with a callback and one pending delivery row whose task is never published."""
    response = submit(client, key, "parked", callback_url=url)
    assert response.status_code == 202, response.json
    delivery_id = uuid.uuid4()
    with transaction() as session:
        session.add(
            WebhookDelivery(
                id=delivery_id,
                job_id=uuid.UUID(response.json["id"]),
                event="started",
                url=url,
                payload={"event": "started", "job": response.json},
            )
        )
    return str(delivery_id)


def _row(delivery_id: str) -> WebhookDelivery:
    with transaction() as session:
        return session.get(WebhookDelivery, uuid.UUID(delivery_id))


def test_dns_rebinding_to_loopback_is_refused_at_delivery(client, user, parked_model, fake_dns):
    from app.webhooks.delivery import attempt

    _, key = user
    with Receiver() as receiver:
        fake_dns["rebind.dreamq.test"] = [PUBLIC_IP]
        delivery_id = _queued_delivery(client, key, f"http://rebind.dreamq.test:{receiver.port}/hook")
        fake_dns["rebind.dreamq.test"] = ["127.0.0.1"]  # the name now points inside
        wait = attempt(delivery_id)
    row = _row(delivery_id)
    assert receiver.requests == []
    assert wait is not None and wait > 0  # retried later, in case DNS changes back
    assert row.status == "pending" and row.attempts == 1 and row.last_status_code is None
    assert "address refused" in row.last_error and "127.0.0.1, a loopback" in row.last_error


def test_delivery_connects_to_the_checked_address_with_the_urls_host(client, user, parked_model, fake_dns, allow):
    from app.webhooks.delivery import attempt

    _, key = user
    with Receiver() as receiver:
        allow(host="pinned.dreamq.test", port=receiver.port)
        fake_dns["pinned.dreamq.test"] = ["127.0.0.1"]
        delivery_id = _queued_delivery(client, key, f"http://pinned.dreamq.test:{receiver.port}/hook?x=1")
        assert attempt(delivery_id) is None
        assert attempt(delivery_id) is None  # delivered: a second message attempts nothing
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.path == "/hook?x=1"
    assert request.headers["Host"] == f"pinned.dreamq.test:{receiver.port}"
    row = _row(delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 200)


# --- end to end through real workers ----------------------------------------------------------


def wait_deliveries(client, key, job_id, timeout=60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        log = client.get(f"/v1/generations/{job_id}/webhooks", headers=auth(key)).json["data"]
        if log and all(d["status"] != "pending" for d in log):
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"deliveries still pending after {timeout}s: {log}")
        time.sleep(0.2)


def verify(secret: str, request) -> dict:
    """What a receiver does: recompute the HMAC over '<timestamp>.<body>', check freshness."""
    timestamp = request.headers["X-Dreamq-Timestamp"]
    expected = (
        "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256).hexdigest()
    )
    assert hmac.compare_digest(expected, request.headers["X-Dreamq-Signature"])
    assert abs(time.time() - int(timestamp)) < 300
    return json.loads(request.body)


@pytest.fixture()
def receiver_for(allow):
    @contextlib.contextmanager
    def start(respond=lambda n: 200):
        with Receiver(respond) as receiver:
            allow(network="127.0.0.1/32", port=receiver.port, note="test receiver")
            yield receiver

    return start


@pytest.mark.slow
def test_signed_events_reach_a_receiver_through_real_workers(client, user, workers, receiver_for):
    user_id, key = user
    secret = client.get("/v1/webhooks/secret", headers=auth(key)).json["secret"]
    with receiver_for() as receiver:
        # 40 steps of 50 ms: about 2 s of running, so progress is throttled several times.
        response = submit(
            client,
            key,
            "tiny",
            num_frames=40,
            callback_url=receiver.url(),
            webhook_events=["started", "progress", "completed"],
        )
        assert response.status_code == 202, response.json
        job_id = response.json["id"]
        job = wait_done(client, key, job_id)
        assert job["state"] == "succeeded"
        log = wait_deliveries(client, key, job_id)

    bodies = [verify(secret, r) for r in receiver.requests]
    for request, body in zip(receiver.requests, bodies):
        assert request.headers["X-Dreamq-Event"] == body["event"]
        assert request.headers["Content-Type"] == "application/json"
        assert body["job"]["id"] == job_id
        assert dt.datetime.fromisoformat(body["sent_at"])
    by_event = {}
    for body in bodies:
        by_event.setdefault(body["event"], []).append(body)
    assert len(by_event["started"]) == 1 and by_event["started"][0]["job"]["state"] == "running"
    assert len(by_event["completed"]) == 1
    done = by_event["completed"][0]["job"]
    assert done["state"] == "succeeded" and done["progress"] == 1.0 and done["assets"]["video"]
    assert done["model"] == job["model"] and done["callback_url"] == receiver.url()

    # Progress: at least one event, never two within the interval (rows are stamped when the
    # worker wrote them), and no more than the run time allows.
    progress = [d for d in log if d["event"] == "progress"]
    stamps = sorted(dt.datetime.fromisoformat(d["created_at"]) for d in progress)
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
    assert progress and all(gap >= PROGRESS_INTERVAL_S * 0.9 for gap in gaps), gaps
    assert len(progress) <= job["timings"]["run_s"] / PROGRESS_INTERVAL_S + 1
    assert len(by_event["progress"]) == len(progress)
    assert all(0 < b["job"]["progress"] < 1 and b["job"]["state"] == "running" for b in by_event["progress"])

    # The delivery log: one row per event, each delivered on its first attempt, ids as sent.
    assert len(log) == len(receiver.requests) == 2 + len(progress)
    assert all((d["status"], d["attempts"], d["last_status_code"]) == ("delivered", 1, 200) for d in log)
    assert {d["id"] for d in log} == {r.headers["X-Dreamq-Delivery"] for r in receiver.requests}
    assert [d["event"] for d in log][0] == "started" and [d["event"] for d in log][-1] == "completed"
    with transaction() as session:
        rows = session.scalars(select(WebhookDelivery).join(Job).where(Job.user_id == user_id)).all()
    assert all(r.delivered_at is not None and r.last_error is None for r in rows) and len(rows) == len(log)


@pytest.mark.slow
def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(client, user, workers, receiver_for):
    _, key = user
    failures = MAX_ATTEMPTS - 1  # delivered on the last attempt allowed
    with receiver_for(lambda n: 500 if n <= failures else 200) as receiver:
        response = submit(client, key, "tiny", callback_url=receiver.url(), webhook_events=["completed"])
        job_id = response.json["id"]
        wait_done(client, key, job_id)
        log = wait_deliveries(client, key, job_id)
    assert len(log) == 1
    delivery = log[0]
    assert (delivery["event"], delivery["status"], delivery["attempts"], delivery["last_status_code"]) == (
        "completed",
        "delivered",
        MAX_ATTEMPTS,
        200,
    )
    assert delivery["last_error"] is None
    assert [r.headers["X-Dreamq-Delivery"] for r in receiver.requests] == [delivery["id"]] * MAX_ATTEMPTS
    # The timing is the feature here: the workers never retry before the backoff after each failure
    # (0.2, 0.4, 0.8 s in the test schedule). Only lower bounds, which load cannot break (it only
    # adds delay); 50 ms allows for the ETA's rounding. The schedule itself, exactly:
    # test_each_failed_attempt_schedules_the_next_after_its_backoff and tests/unit/webhooks.
    times = [r.at for r in receiver.requests]
    waits = [later - earlier for earlier, later in zip(times, times[1:])]
    backoffs = [BACKOFF_BASE_S * 2 ** (n - 1) for n in range(1, failures + 1)]
    assert all(wait >= backoff - 0.05 for wait, backoff in zip(waits, backoffs)), (waits, backoffs)


def test_each_failed_attempt_schedules_the_next_after_its_backoff(client, user, parked_model, receiver_for):
    """The delivery row holds the schedule (the sweep and the claim read it): after failed attempt n
    its next_attempt_at is the attempt's commit time + base x 2^(n-1), read on the database's
    clock before and after each attempt, so no wait and no load decides it."""
    from app.core.config import get_settings
    from app.webhooks.delivery import EARLY_TOLERANCE_S, attempt

    settings = get_settings()  # this process's schedule: attempt() runs here, not in a worker
    _, key = user
    with receiver_for(lambda n: 503) as receiver:
        delivery_id = _queued_delivery(client, key, receiver.url())
        for number in range(1, settings.webhook_max_attempts + 1):
            before = _db_clock()
            wait = attempt(delivery_id)
            after = _db_clock()
            row = _row(delivery_id)
            assert (row.attempts, row.last_status_code) == (number, 503)
            if number == settings.webhook_max_attempts:
                assert wait is None and row.status == "failed"
                break
            expected = min(settings.webhook_backoff_base_s * 2 ** (number - 1), settings.webhook_backoff_max_s)
            assert wait == pytest.approx(expected) and row.status == "pending"
            scheduled = row.next_attempt_at - dt.timedelta(seconds=wait)
            assert before <= scheduled <= after, (number, before, scheduled, after)
            # An early message does nothing while the row is not due (checked where the wait exceeds the
            # claim's early tolerance by far more than a stall between two statements could take).
            if wait > EARLY_TOLERANCE_S + 10:
                assert attempt(delivery_id) is None and len(receiver.requests) == number
            # The countdown has run out.
            with transaction() as session:
                session.execute(
                    text("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = :id"), {"id": delivery_id}
                )
    assert len(receiver.requests) == settings.webhook_max_attempts


def _db_clock() -> dt.datetime:
    with transaction() as session:
        return session.execute(text("SELECT clock_timestamp()")).scalar_one()


@pytest.mark.slow
def test_a_receiver_that_always_fails_ends_failed_after_max_attempts(client, user, workers, receiver_for):
    _, key = user
    with receiver_for(lambda n: 503) as receiver:
        response = submit(
            client, key, "tiny", prompt="explode", callback_url=receiver.url(), webhook_events=["completed"]
        )
        job_id = response.json["id"]
        assert wait_done(client, key, job_id)["state"] == "failed"
        log = wait_deliveries(client, key, job_id)
        time.sleep(1.0)  # nothing more arrives after the last attempt
    assert len(log) == 1
    delivery = log[0]
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("failed", MAX_ATTEMPTS, 503)
    assert "HTTP 503" in delivery["last_error"] and delivery["delivered_at"] is None
    assert len(receiver.requests) == MAX_ATTEMPTS
    assert json.loads(receiver.requests[0].body)["job"]["failure"]["code"] == "model_error"


@pytest.mark.slow
def test_the_sweep_republishes_a_delivery_whose_message_was_lost(client, user, workers, parked_model, receiver_for):
    from tasks.webhooks import sweep

    _, key = user
    with receiver_for() as receiver:
        delivery_id = _queued_delivery(client, key, receiver.url())  # a row whose task was never published
        with transaction() as session:
            session.execute(
                text("UPDATE webhook_deliveries SET next_attempt_at = now() - interval '5 minutes' WHERE id = :id"),
                {"id": delivery_id},
            )
        assert sweep() >= 1
        deadline = time.monotonic() + 30
        while _row(delivery_id).status == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
    row = _row(delivery_id)
    assert (row.status, row.attempts) == ("delivered", 1)
    assert [r.headers["X-Dreamq-Delivery"] for r in receiver.requests] == [delivery_id]
