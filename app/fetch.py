"""Fetching a user-supplied URL (a video or image to work on) under the rules uploads obey.

The URL is the user's, the network is ours, so the fetch follows the webhook address rule
(app/outbound/addresses.py, with the admin allow-list): http(s), no credentials, every address
public, and the socket connects to an address that passed the check (no DNS rebinding). Redirects
are not followed (a redirect could lead anywhere the check never saw). The body is capped at the
upload limit before and while reading, and the whole fetch at a deadline, so a slow or endless
response cannot hold an API process.
"""

from __future__ import annotations

import http.client
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.outbound.addresses import AddressRefused
from app.outbound.allowlist import check_with_allowlist
from app.webhooks.delivery import pinned_connection

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
TOTAL_TIMEOUT_S = 60.0
CHUNK = 1 << 20


class FetchRefused(ValueError):
    """The URL cannot be fetched; `reason` completes "media.url ..." for the client. `status`
    is the HTTP status to answer: 400 (refused or unreachable) or 413 (too large)."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str


def fetch(session: Session, url: str, *, max_bytes: int | None = None) -> Fetched:
    limit = get_settings().max_upload_bytes if max_bytes is None else max_bytes
    try:
        checked = check_with_allowlist(session, url)
    except AddressRefused as exc:
        raise FetchRefused(exc.reason) from None
    deadline = time.monotonic() + TOTAL_TIMEOUT_S
    error = "could not be fetched"
    for address in checked.addresses:
        conn = pinned_connection(checked, address, CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        response = None
        try:
            conn.request("GET", checked.target, headers={"User-Agent": "dreamq-fetch/1", "Accept": "*/*"})
            response = conn.getresponse()
            if 300 <= response.status < 400:
                raise FetchRefused(
                    f"answered a redirect (HTTP {response.status}); give the final URL, redirects are not followed"
                )
            if response.status != 200:
                raise FetchRefused(f"answered HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise FetchRefused(f"is {int(length)} bytes; at most {limit} bytes are accepted", status=413)
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise FetchRefused(f"took longer than {TOTAL_TIMEOUT_S:g} s to download")
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise FetchRefused(f"is larger than {limit} bytes, the most accepted", status=413)
                chunks.append(chunk)
            content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
            return Fetched(b"".join(chunks), content_type)
        except FetchRefused:
            raise
        except (OSError, http.client.HTTPException) as exc:
            error = f"could not be fetched ({type(exc).__name__}: {exc})"[:300]
        finally:
            # The response holds the socket's file: closing only the connection leaves it open.
            if response is not None:
                response.close()
            conn.close()
    raise FetchRefused(error)
