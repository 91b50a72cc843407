"""The one error type of operator actions, and the audit line every mutation writes.

Admin functions raise `AdminError(field, reason, status)`: the HTTP routes turn it into the JSON
error naming the field (app/api/admin.py), the CLI into a one-line message; neither re-checks.
"""

from __future__ import annotations

import logging
from typing import Any

# A logger of its own, so operators can route admin actions to an audit sink by name.
audit_log = logging.getLogger("dreamq.audit")


class AdminError(ValueError):
    def __init__(self, field: str, reason: str, status: int = 422):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.status = field, reason, status


def audit(action: str, *, actor: str, target: str, **detail: Any) -> None:
    """One structured line per admin mutation: who did what to which object."""
    audit_log.info(
        "admin %s %s by %s",
        action,
        target,
        actor,
        extra={"audit": True, "action": action, "actor": actor, "target": target, "detail": detail},
    )
