"""Retention: outputs and uploads past their tier's retention are deleted (S3 objects first,
then rows). The body of the periodic task dreamq.maintenance.expire_retention."""

from __future__ import annotations

from typing import cast

from sqlalchemy import CursorResult, text

from app.core.config import get_settings
from app.core.storage import s3_client
from app.db.session import transaction
from app.jobs.transitions import record_step

BATCH = 500  # rows per run and kind; a backlog is worked off over several runs


# Outputs of finished jobs past their tier's retention. The job row stays (monthly quotas and
# the audit trail count it); its assets are gone and the API stops offering URLs.
_EXPIRED_OUTPUTS = text(
    """
    SELECT j.id, j.video_key, j.thumbnail_key FROM jobs j JOIN tiers t ON t.name = j.tier
    WHERE j.video_key IS NOT NULL AND j.finished_at < now() - make_interval(days => t.retention_days)
    LIMIT :limit
    """
)
# Uploads past expires_at (set from the tier's retention at upload) that no unfinished job needs.
_EXPIRED_UPLOADS = text(
    """
    SELECT u.id, u.object_key FROM uploads u
    WHERE u.expires_at < now()
      AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.upload_id = u.id
                      AND j.state IN ('queued', 'dispatched', 'running'))
    LIMIT :limit
    """
)


def expire_retention() -> dict[str, int]:
    """Delete outputs and uploads past their tier's retention (S3 objects first, then rows)."""
    settings = get_settings()
    counts = {"outputs": 0, "uploads": 0}
    with transaction() as session:
        outputs = session.execute(_EXPIRED_OUTPUTS, {"limit": BATCH}).all()
        uploads = session.execute(_EXPIRED_UPLOADS, {"limit": BATCH}).all()
    keys = [k for row in outputs for k in (row.video_key, row.thumbnail_key) if k] + [u.object_key for u in uploads]
    # Objects first: a crash after this leaves rows pointing at nothing, which the next run
    # finishes; the other order could leave objects no row knows about.
    s3 = s3_client()
    for start in range(0, len(keys), 1000):
        s3.delete_objects(
            Bucket=settings.media_bucket,
            Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
        )
    with transaction() as session:
        if outputs:
            counts["outputs"] = cast(
                CursorResult,
                session.execute(
                    text(
                        "UPDATE jobs SET video_key = NULL, thumbnail_key = NULL, updated_at = now() WHERE id = ANY(:ids)"
                    ),
                    {"ids": [r.id for r in outputs]},
                ),
            ).rowcount
            record_step(session, [r.id for r in outputs], "outputs_expired")
        if uploads:
            counts["uploads"] = cast(
                CursorResult,
                session.execute(text("DELETE FROM uploads WHERE id = ANY(:ids)"), {"ids": [u.id for u in uploads]}),
            ).rowcount
    return counts
