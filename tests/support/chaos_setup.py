"""Prepare a fresh stack's database for the chaos test, in its own process (its own settings).

    python -m tests.support.chaos_setup MODEL BUNDLE DISPATCH_LIMIT USERS   (env: the stack's URLs)

Migrates, seeds tiers, makes the buckets, pushes BUNDLE as MODEL with a pool in cluster `local`,
creates USERS api-tier users and prints {"keys": [...], "version": N} as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model: str, bundle: str, dispatch_limit: str, users: str) -> None:
    from app.core.config import get_settings
    from app.core.storage import ensure_buckets
    from app.db.migrate import upgrade
    from app.db.session import transaction
    from app.seed import ensure_demo_model, ensure_pool, seed_tiers

    upgrade(get_settings().database_url)
    ensure_buckets()
    with transaction() as session:
        seed_tiers(session)
        version = ensure_demo_model(session, model, Path(bundle))
        ensure_pool(session, "local", model, int(dispatch_limit))
    from tests.support.factories import create_user

    keys = [create_user("api", name=f"chaos-{index}")[1] for index in range(int(users))]
    print(json.dumps({"keys": keys, "version": getattr(version, "number", None)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
