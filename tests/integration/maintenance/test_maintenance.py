"""Maintenance beat tasks against real Postgres, Redis (the broker) and SeaweedFS.

Jobs of the `parked` model (a pool with no worker) are put into the state each case needs with
SQL, then the task runs once, in-process, and the test reads what it changed. The tasks act on
every job in the database; each test asserts only on its own jobs.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from app.core.config import get_settings
from app.core.storage import put_bytes, s3_client
from app.db.session import transaction
from tests.support.factories import auth

pytestmark = pytest.mark.usefixtures("parked_model")


@pytest.fixture()
def submit(client, make_user):
    _, key = make_user("api")

    def submit_one() -> str:
        response = client.post("/v1/generations", json={"prompt": "x", "model": "parked"}, headers=auth(key))
        assert response.status_code == 202, response.json
        return response.json["id"]

    return submit_one


def set_job(job_id: str, **columns) -> None:
    assignments = ", ".join(f"{c} = {v}" for c, v in columns.items())
    with transaction() as session:
        session.execute(text(f"UPDATE jobs SET {assignments} WHERE id = :id"), {"id": job_id})


def job(job_id: str):
    with transaction() as session:
        return session.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().one()


def events(job_id: str) -> list[dict]:
    with transaction() as session:
        return [
            dict(r)
            for r in session.execute(
                text("SELECT from_state, to_state, detail FROM job_events WHERE job_id = :id ORDER BY id"),
                {"id": job_id},
            ).mappings()
        ]


def test_a_second_run_while_one_holds_the_lock_skips(submit):
    from tasks.maintenance import maintenance_lock, reap_expired_leases

    lost = submit()
    set_job(lost, state="'running'", attempts="1", worker_id="'gone@host'", updated_at="now() - interval '1 hour'")
    with maintenance_lock("reap_expired_leases") as got:
        assert got
        assert reap_expired_leases() == {"skipped": 1}
        assert job(lost)["state"] == "running"  # nothing changed under the held lock
    assert reap_expired_leases()["requeued"] >= 1
    assert job(lost)["state"] == "queued"


def test_reaper_requeues_lost_jobs_fails_spent_ones_and_leaves_live_leases(submit):
    from tasks.maintenance import reap_expired_leases

    lost, spent, live, handoff = submit(), submit(), submit(), submit()
    set_job(lost, state="'running'", attempts="1", worker_id="'gone@host'", updated_at="now() - interval '10 minutes'")
    set_job(
        spent,
        state="'running'",
        attempts="max_attempts",
        worker_id="'gone@host'",
        updated_at="now() - interval '10 minutes'",
    )
    set_job(live, state="'running'", attempts="1", worker_id="'alive@host'", updated_at="now()")
    # Generated and waiting for the cpu queue: it gets ten leases, not one.
    set_job(handoff, state="'running'", attempts="1", progress="0.95", updated_at="now() - interval '2 minutes'")
    counts = reap_expired_leases()
    assert counts["requeued"] >= 1 and counts["failed"] >= 1
    assert job(lost)["state"] == "queued"
    assert events(lost)[-1]["detail"]["reason"] == "lease_expired"
    failed = job(spent)
    assert (failed["state"], failed["failure_code"]) == ("failed", "worker_lost")
    assert "lost its worker each time" in failed["failure_message"]
    assert job(live)["state"] == "running"
    assert job(handoff)["state"] == "running"
    # Running it again changes nothing: every change is a guarded compare-and-set.
    before = {j: len(events(j)) for j in (lost, spent, live, handoff)}
    reap_expired_leases()
    assert {j: len(events(j)) for j in before} == before


def test_jobs_routed_to_a_worker_that_went_quiet_go_back_to_the_queue(submit):
    from tasks.maintenance import reap_expired_leases

    routed, healthy = submit(), submit()
    stale_worker, live_worker = f"quiet-{uuid.uuid4().hex[:6]}@h", f"live-{uuid.uuid4().hex[:6]}@h"
    with transaction() as session:
        for worker, age in ((stale_worker, "10 minutes"), (live_worker, "0 seconds")):
            session.execute(
                text(
                    "INSERT INTO workers (id, pool_id, hostname, pid, device, state, info, heartbeat_at) "
                    f"VALUES (:id, NULL, 'h', 1, 'cpu', 'busy', '{{}}', "
                    f"now() - interval '{age}')"
                ),
                {"id": worker},
            )
    set_job(routed, state="'dispatched'", worker_id=f"'{stale_worker}'", dispatched_at="now()")
    set_job(healthy, state="'dispatched'", worker_id=f"'{live_worker}'", dispatched_at="now()")
    assert reap_expired_leases()["unrouted"] >= 1
    assert job(routed)["state"] == "queued" and job(routed)["attempts"] == 0
    assert job(healthy)["state"] == "dispatched"
    with transaction() as session:
        session.execute(text("DELETE FROM workers WHERE id = ANY(:ids)"), {"ids": [stale_worker, live_worker]})


def test_reconciler_requeues_what_the_broker_lost_and_keeps_what_it_holds(submit):
    from app.messaging import Release, get_publisher
    from tasks.maintenance import broker_task_ids, reconcile_broker

    lost, held, recent = submit(), submit(), submit()
    for job_id in (lost, held):
        set_job(job_id, state="'dispatched'", dispatch_seq="1", dispatched_at="now() - interval '10 minutes'")
    set_job(recent, state="'dispatched'", dispatch_seq="1", dispatched_at="now()")
    # `held` really is in the broker: published the way the dispatcher publishes.
    get_publisher().release([Release(uuid.UUID(held), "local.parked.api", 1, "api")])
    assert f"{held}-1" in broker_task_ids(["local.parked"])
    assert reconcile_broker()["requeued"] >= 1
    assert job(lost)["state"] == "queued"
    assert events(lost)[-1]["detail"] == {"reason": "broker_lost_message", "by": "reconciler"}
    assert job(held)["state"] == "dispatched"
    assert job(recent)["state"] == "dispatched"  # too young to ask the broker about


def test_overdue_running_jobs_fail_with_timeout(submit):
    from tasks.maintenance import time_out_overdue

    overdue, fine = submit(), submit()
    limit = get_settings().job_hard_time_limit_s + get_settings().job_lease_s
    set_job(
        overdue,
        state="'running'",
        attempts="1",
        started_at=f"now() - interval '{int(limit) + 60} seconds'",
        updated_at="now()",
    )
    set_job(fine, state="'running'", attempts="1", started_at="now()", updated_at="now()")
    assert time_out_overdue()["timed_out"] >= 1
    assert (job(overdue)["state"], job(overdue)["failure_code"]) == ("failed", "timeout")
    assert job(fine)["state"] == "running"


def test_retention_deletes_expired_outputs_and_uploads_but_not_what_is_in_use(submit, client, make_user):
    from tasks.maintenance import expire_retention

    bucket = get_settings().media_bucket
    old, young = submit(), submit()
    with transaction() as session:
        retention = session.execute(text("SELECT retention_days FROM tiers WHERE name = 'api'")).scalar_one()
    for job_id, age_days in ((old, retention + 1), (young, 0)):
        put_bytes(bucket, f"outputs/{job_id}/1/video.mp4", b"v")
        put_bytes(bucket, f"outputs/{job_id}/1/thumbnail.jpg", b"t")
        set_job(
            job_id,
            state="'succeeded'",
            finished_at=f"now() - interval '{age_days} days'",
            video_key=f"'outputs/{job_id}/1/video.mp4'",
            thumbnail_key=f"'outputs/{job_id}/1/thumbnail.jpg'",
        )
    # Uploads: one expired and unused, one expired but needed by a queued job.
    user_id = job(old)["user_id"]
    uploads = {}
    with transaction() as session:
        for name in ("unused", "needed"):
            key = f"uploads/{uuid.uuid4()}.mp4"
            put_bytes(bucket, key, b"u")
            uploads[name] = (
                session.execute(
                    text(
                        "INSERT INTO uploads (id, user_id, object_key, content_type, size_bytes, sha256, duration_s, width, "
                        "height, frames, expires_at) VALUES (gen_random_uuid(), :u, :k, 'video/mp4', 1, 'x', 1, 8, 8, 1, "
                        "now() - interval '1 day') RETURNING id"
                    ),
                    {"u": user_id, "k": key},
                ).scalar_one(),
                key,
            )
    needing = submit()
    set_job(needing, upload_id=f"'{uploads['needed'][0]}'")

    counts = expire_retention()
    assert counts["outputs"] >= 1 and counts["uploads"] >= 1
    expired = job(old)
    assert expired["video_key"] is None and expired["thumbnail_key"] is None and expired["state"] == "succeeded"
    listed = {
        o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket, Prefix=f"outputs/{old}/").get("Contents", [])
    }
    assert listed == set()
    assert job(young)["video_key"] == f"outputs/{young}/1/video.mp4"
    with transaction() as session:
        remaining = {
            r[0]
            for r in session.execute(
                text("SELECT id FROM uploads WHERE id = ANY(:ids)"), {"ids": [u[0] for u in uploads.values()]}
            )
        }
    assert remaining == {uploads["needed"][0]}
    assert "Contents" not in s3_client().list_objects_v2(Bucket=bucket, Prefix=uploads["unused"][1])
    # The API no longer offers URLs for expired outputs.
    _, key = make_user("api")  # another user cannot see it at all
    assert client.get(f"/v1/generations/{old}", headers=auth(key)).status_code == 404


def test_a_redelivered_message_never_takes_a_job_whose_lease_is_live(submit):
    from app.core.logging_setup import job_context
    from app.jobs.execution import claim as claim_in_task

    def claim(*args):
        with job_context():  # as in the generate task: what claim binds for its log lines ends here
            return claim_in_task(*args)

    job_id = submit()
    set_job(job_id, state="'running'", attempts="1", dispatch_seq="1", worker_id="'owner@h'", updated_at="now()")
    assert claim(job_id, 1, "other@h") is None  # the owner is alive: nobody else runs it
    assert job(job_id)["worker_id"] == "owner@h" and job(job_id)["attempts"] == 1
    # Its own worker (the child that ran it died, Celery requeued the message) may take it back.
    claimed = claim(job_id, 1, "owner@h")
    assert claimed is not None and claimed.attempts == 2
    set_job(job_id, updated_at="now() - interval '1 hour'")
    # Lease ran out: the owner is gone, so another worker's redelivery takes over.
    assert claim(job_id, 1, "other@h").attempts == 3
    assert job(job_id)["worker_id"] == "other@h"


def test_beat_schedule_declares_every_maintenance_task_on_the_control_queue():
    from tasks.celery_app import celery_app

    schedule = celery_app.conf.beat_schedule
    names = {entry["task"] for entry in schedule.values()}
    assert {
        "dreamq.maintenance.reap_expired_leases",
        "dreamq.maintenance.reconcile_broker",
        "dreamq.maintenance.time_out_overdue",
        "dreamq.maintenance.expire_retention",
        "dreamq.dispatch",
    } <= names
    assert all(
        entry["options"]["queue"] == "control"
        for entry in schedule.values()
        if entry["task"].startswith(("dreamq.maintenance.", "dreamq.dispatch"))
    )
