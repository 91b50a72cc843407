"""The admin allow-list (table webhook_allowlist): networks or host names that callback URLs may
reach although they are not public, e.g. an internal receiver or, in tests, 127.0.0.1 on one port.

An entry with a port allows only that port, so allowing one receiver on a host does not open
every service on it.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from app.db.models import WebhookAllowEntry
from app.outbound.addresses import AddressRefused, AllowEntry, AllowList, CheckedURL, check_url


class AllowEntryError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def load_allowlist(session: Session) -> AllowList:
    entries = []
    for row in session.scalars(select(WebhookAllowEntry)):
        network = ipaddress.ip_network(row.network, strict=False) if row.network else None
        entries.append(AllowEntry(network=network, host=row.host, port=row.port))
    return AllowList(tuple(entries))


def check_with_allowlist(session: Session, url: str) -> CheckedURL:
    """check_url() with the current allow-list. Raises AddressRefused."""
    return check_url(url, allow=load_allowlist(session))


def entry_view(row: WebhookAllowEntry) -> dict:
    return {
        "id": str(row.id),
        "network": str(row.network) if row.network else None,
        "host": row.host,
        "port": row.port,
        "note": row.note,
        "created_by": row.created_by,
        "created_at": row.created_at,
    }


def list_entries(session: Session) -> list[WebhookAllowEntry]:
    return list(session.scalars(select(WebhookAllowEntry).order_by(WebhookAllowEntry.created_at, WebhookAllowEntry.id)))


def add_entry(
    session: Session, *, network: str | None, host: str | None, port: int | None, note: str, actor: str
) -> WebhookAllowEntry:
    if (network is None) == (host is None):
        raise AllowEntryError("network", "give exactly one of network or host")
    if network is not None:
        try:
            network = str(ipaddress.ip_network(network, strict=False))
        except ValueError as exc:
            raise AllowEntryError("network", f"is not an IP network ({exc})") from None
    if host is not None:
        host = host.rstrip(".").lower()
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise AllowEntryError("host", "is not a valid host name") from None
    row = WebhookAllowEntry(id=uuid.uuid4(), network=network, host=host, port=port, note=note, created_by=actor)
    session.add(row)
    session.flush()
    session.refresh(row)
    return row


def remove_entry(session: Session, entry_id: uuid.UUID) -> bool:
    return (
        cast(CursorResult, session.execute(delete(WebhookAllowEntry).where(WebhookAllowEntry.id == entry_id))).rowcount
        > 0
    )


__all__ = [
    "AddressRefused",
    "AllowEntryError",
    "add_entry",
    "check_with_allowlist",
    "entry_view",
    "list_entries",
    "load_allowlist",
    "remove_entry",
]
