"""One webhook attempt: claim the delivery row, re-check the address, POST, record the outcome.

What a receiver gets:

    POST <callback_url>
    Content-Type: application/json
    X-Dreamq-Event: started | progress | completed
    X-Dreamq-Delivery: <delivery id>   (the same on every retry: deduplicate on it)
    X-Dreamq-Timestamp: <unix seconds>
    X-Dreamq-Signature: sha256=<hex HMAC-SHA256(user's webhook secret, "<timestamp>.<body>")>

    {"event": ..., "job": <the job object of GET /v1/generations/<id>>, "sent_at": ...}

Safety of the connection (the URL is the user's, the network is ours): the host is resolved
again and every address re-checked at each attempt (DNS rebinding), and the socket connects to
an address that passed the check, not to whatever the name resolves to a moment later; the Host
header and TLS server name stay the URL's. Redirects are never followed (http.client does not),
connect and read have their own timeouts, and at most 1 KiB of the response is read.

Any 2xx is delivered; anything else (other status, refused address, timeout, connection error)
is retried with exponential backoff until DREAMQ_WEBHOOK_MAX_ATTEMPTS, then the row is failed.
The secret and the signature are never logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import json
import logging
import socket
import time
from dataclasses import dataclass

from sqlalchemy import text

from app.core.config import get_settings
from app.db.session import transaction
from app.outbound.addresses import AddressRefused, CheckedURL, IPAddress
from app.outbound.allowlist import check_with_allowlist

log = logging.getLogger(__name__)

USER_AGENT = "dreamq-webhooks/1"
MAX_RESPONSE_BYTES = 1024
# An ETA message may fire a little before the row's next_attempt_at (clocks, rounding).
EARLY_TOLERANCE_S = 1.0


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def backoff_s(attempt: int) -> float:
    """Wait after failed attempt number `attempt` (1-based): base, 2*base, 4*base... capped."""
    settings = get_settings()
    # The exponent is bounded: past ~1,024 attempts 2 ** n no longer fits a float (OverflowError).
    doubling = 2.0 ** min(attempt - 1, 1000)
    return min(settings.webhook_backoff_base_s * doubling, settings.webhook_backoff_max_s)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, checked: CheckedURL, address: IPAddress, connect_timeout: float, read_timeout: float):
        super().__init__(checked.host, checked.port, timeout=connect_timeout)
        self._address, self._read_timeout = address, read_timeout

    def _pinned_socket(self) -> socket.socket:
        sock = socket.create_connection((str(self._address), self.port), self.timeout)
        sock.settimeout(self._read_timeout)
        return sock

    def connect(self) -> None:
        self.sock = self._pinned_socket()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, checked: CheckedURL, address: IPAddress, connect_timeout: float, read_timeout: float):
        super().__init__(checked.host, checked.port, timeout=connect_timeout)
        self._address, self._read_timeout = address, read_timeout

    _pinned_socket = _PinnedHTTPConnection._pinned_socket

    def connect(self) -> None:
        # Certificate verified against the URL's host name, not the address we pinned.
        self.sock = self._context.wrap_socket(self._pinned_socket(), server_hostname=self.host)  # type: ignore[attr-defined, misc]  # private _context; method borrowed from the HTTP class


def pinned_connection(
    checked: CheckedURL, address: IPAddress, connect_timeout: float, read_timeout: float
) -> http.client.HTTPConnection:
    """An HTTP(S) connection to `address`, one of the addresses `checked` approved, speaking to
    the URL's host (Host header, TLS name). Also used to fetch user-supplied media (app/fetch.py)."""
    cls = _PinnedHTTPSConnection if checked.scheme == "https" else _PinnedHTTPConnection
    return cls(checked, address, connect_timeout, read_timeout)


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(checked: CheckedURL, body: bytes, headers: dict[str, str]) -> Outcome:
    """POST to the first checked address that accepts a connection."""
    settings = get_settings()
    error = "no address"
    for address in checked.addresses:
        conn = pinned_connection(checked, address, settings.webhook_connect_timeout_s, settings.webhook_read_timeout_s)
        try:
            conn.request("POST", checked.target, body=body, headers=headers)
            response = conn.getresponse()
            snippet = response.read(MAX_RESPONSE_BYTES)
            if 200 <= response.status < 300:
                return Outcome(response.status, None)
            return Outcome(response.status, f"HTTP {response.status}: {snippet[:200].decode('utf-8', 'replace')}")
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            conn.close()
    return Outcome(None, error)


_CLAIM = text(
    """
    UPDATE webhook_deliveries d
    SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => :lease_s)
    FROM jobs j JOIN users u ON u.id = j.user_id
    WHERE d.id = :id AND j.id = d.job_id AND d.status = 'pending'
      AND d.next_attempt_at <= now() + make_interval(secs => :early_s)
    RETURNING d.job_id, d.event, d.url, d.payload, d.attempts, u.webhook_secret, j.user_id, j.tier
    """
)

_RECORD = text(
    """
    UPDATE webhook_deliveries
    SET status = CAST(:status AS text), last_status_code = :code, last_error = :error,
        delivered_at = CASE WHEN CAST(:status AS text) = 'delivered' THEN now() END,
        next_attempt_at = now() + make_interval(secs => :wait_s)
    WHERE id = :id AND attempts = :attempt
    """
)


def attempt(delivery_id: str) -> float | None:
    """Make one attempt. Returns the seconds until the next one, or None when there is none to
    schedule (delivered, failed for good, or another task holds the row)."""
    settings = get_settings()
    lease_s = settings.webhook_connect_timeout_s + settings.webhook_read_timeout_s * 3 + 30
    with transaction() as session:
        row = (
            session.execute(_CLAIM, {"id": delivery_id, "lease_s": lease_s, "early_s": EARLY_TOLERANCE_S})
            .mappings()
            .first()
        )
        if row is None:
            return None
        try:
            checked: CheckedURL | None = check_with_allowlist(session, row["url"])
            refused = None
        except AddressRefused as exc:
            checked, refused = None, exc.reason
    number = row["attempts"]
    if checked is None:
        outcome = Outcome(None, f"address refused: {refused}")
    else:
        timestamp = int(time.time())
        sent_at = dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat()
        body = json.dumps({**row["payload"], "sent_at": sent_at}, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Dreamq-Event": row["event"],
            "X-Dreamq-Delivery": delivery_id,
            "X-Dreamq-Timestamp": str(timestamp),
            "X-Dreamq-Signature": sign(row["webhook_secret"], timestamp, body),
        }
        outcome = post(checked, body, headers)
    if outcome.ok:
        status, wait = "delivered", 0.0
    elif number >= settings.webhook_max_attempts:
        status, wait = "failed", 0.0
    else:
        status, wait = "pending", backoff_s(number)
    with transaction() as session:
        session.execute(
            _RECORD,
            {
                "id": delivery_id,
                "attempt": number,
                "status": status,
                "code": outcome.status_code,
                "error": outcome.error,
                "wait_s": wait,
            },
        )
    log.info(
        "webhook attempt",
        extra={
            "delivery_id": delivery_id,
            "job_id": str(row["job_id"]),
            "user_id": str(row["user_id"]),
            "tier": row["tier"],
            "event": row["event"],
            "attempt": number,
            "status_code": outcome.status_code,
            "outcome": status,
            "host": checked.host if checked else None,
            "error": outcome.error,
        },
    )
    return wait if status == "pending" else None
