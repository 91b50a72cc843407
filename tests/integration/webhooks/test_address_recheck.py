"""The address rule is checked again at every attempt: a name re-pointed between a failed attempt and
its retry (DNS rebinding) reaches nothing inside.

docs/api.md (Address rule): "The rule is checked again at every delivery attempt and the
connection goes to the address that passed". tests/integration/webhooks/test_webhooks.py proves it
for the first attempt (public at submission, loopback at delivery); here the first attempt really
connects to an allowed address and fails, the name is re-pointed, and the retry must be refused
without a connection. The same for a media URL fetched again (app/fetch.py).

Name resolution is controlled through socket.getaddrinfo, the resolver app/outbound/addresses.py
calls, for names under .dreamq.test only; connections go to real servers on 127.0.0.2 (allowed by
an allow-list entry for that address and port) and 127.0.0.1 (the inside, same port, not allowed).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import text

from app.db.models import WebhookDelivery
from app.db.session import transaction
from tests.support.factories import auth

NAME = "hooks.dreamq.test"
ALLOWED = "127.0.0.2"


class Listener:
    """A real HTTP server on (host, port) that records what reaches it and answers `status`."""

    def __init__(self, host: str, port: int, status: int):
        self.status = status
        self.requests: list[tuple[str, str]] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                listener.requests.append((self.command, self.path))
                self.send_response(listener.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no")

            do_GET = do_POST = _answer  # noqa: N815 (http.server's naming)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture()
def listeners():
    """An allowed server on 127.0.0.2:P answering 500 (the failed first attempt) and the inside,
    127.0.0.1:P, where nothing may arrive; one port, so the URL cannot tell them apart."""
    for _ in range(20):
        allowed = Listener(ALLOWED, 0, 500)
        try:
            inside = Listener("127.0.0.1", allowed.port, 200)
        except OSError:  # that port is taken on 127.0.0.1: try another
            allowed.close()
            continue
        try:
            yield allowed, inside
        finally:
            allowed.close()
            inside.close()
        return
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.fixture()
def dns(monkeypatch):
    """NAME resolves to what the test says at the moment of each lookup; every connection made is
    recorded (the proof that nothing went to a refused address)."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection
    table: dict[str, list[str]] = {}
    connections: list[tuple[str, int]] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host in table:
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]
            ]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        connections.append((str(address[0]), int(address[1])))
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return table, connections


@pytest.fixture()
def allowed_entry(client, listeners, make_user):
    """An allow-list entry for 127.0.0.2 on the listeners' port only, through the admin route."""
    admin = auth(make_user("api", scopes=("user", "admin"))[1])
    port = listeners[0].port
    response = client.post(
        "/v1/admin/webhooks/allowlist",
        json={"network": f"{ALLOWED}/32", "port": port, "note": "address recheck test"},
        headers=admin,
    )
    assert response.status_code == 201, response.json
    yield response.json
    client.delete(f"/v1/admin/webhooks/allowlist/{response.json['id']}", headers=admin)


def delivery_row(delivery_id: str) -> WebhookDelivery:
    with transaction() as session:
        return session.get(WebhookDelivery, uuid.UUID(delivery_id))


def wait_until_due(delivery_id: str, timeout_s: float) -> None:
    """The retry's time (next_attempt_at, the backoff the failed attempt scheduled) has come."""
    deadline = time.monotonic() + timeout_s
    while True:
        with transaction() as session:
            due = session.execute(
                text("SELECT next_attempt_at <= now() FROM webhook_deliveries WHERE id = :id"), {"id": delivery_id}
            ).scalar_one()
        if due:
            return
        assert time.monotonic() < deadline, "the retry never became due"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("inside", "reason"),
    [
        ("127.0.0.1", "127.0.0.1, a loopback address"),
        ("169.254.169.254", "169.254.169.254, a link-local address"),
        ("::ffff:127.0.0.1", "an IPv6 form of 127.0.0.1, a loopback address"),
    ],
)
def test_a_name_re_pointed_inside_after_a_failed_attempt_gets_nothing_on_the_retry(
    client, make_user, parked_model, publisher, listeners, dns, allowed_entry, inside, reason
):
    from app.core.config import get_settings
    from app.webhooks.delivery import attempt, backoff_s

    allowed, inside_listener = listeners
    table, connections = dns
    table[NAME] = [ALLOWED]
    url = f"http://{NAME}:{allowed.port}/hook"
    _, key = make_user("api")
    submitted = client.post(
        "/v1/generations", json={"prompt": "recheck", "model": "parked", "callback_url": url}, headers=auth(key)
    )
    assert submitted.status_code == 202, submitted.json
    # The job's `completed` event through the real listener: its delivery row, its task published
    # to the in-memory publisher, so this process makes each attempt, as the deliver task does.
    assert client.post(f"/v1/generations/{submitted.json['id']}/cancel", headers=auth(key)).status_code == 202
    [delivery_id] = [args[0] for task, args, *_ in publisher.sent if task == "dreamq.webhooks.deliver"]

    first_wait = attempt(delivery_id)
    row = delivery_row(delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 500), row.last_error
    assert allowed.requests == [("POST", "/hook")]
    assert first_wait == backoff_s(1)

    table[NAME] = [inside]  # re-pointed between the failed attempt and its retry
    wait_until_due(delivery_id, timeout_s=first_wait + 30)
    connections.clear()
    second_wait = attempt(delivery_id)
    row = delivery_row(delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 2, None)
    assert row.last_error.startswith("address refused:") and reason in row.last_error, row.last_error
    assert connections == [], "the refused retry opened a connection"
    assert inside_listener.requests == [] and len(allowed.requests) == 1
    assert second_wait == backoff_s(2) and 2 < get_settings().webhook_max_attempts

    if inside != "127.0.0.1":
        return
    # Checked at each attempt both ways: pointed back at the allowed address, the next retry is
    # delivered there (this one answers 200).
    table[NAME] = [ALLOWED]
    allowed.status = 200
    wait_until_due(delivery_id, timeout_s=second_wait + 30)
    assert attempt(delivery_id) is None
    row = delivery_row(delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 3, 200)
    assert connections == [(ALLOWED, allowed.port)]
    assert inside_listener.requests == [] and len(allowed.requests) == 2


def test_a_media_url_re_pointed_inside_after_a_failed_fetch_is_refused_on_the_next(
    stack_env, listeners, dns, allowed_entry
):
    from app.fetch import FetchRefused, fetch

    allowed, inside = listeners
    table, connections = dns
    url = f"http://{NAME}:{allowed.port}/clip.mp4"
    table[NAME] = [ALLOWED]
    with transaction() as session, pytest.raises(FetchRefused) as first:
        fetch(session, url)
    assert first.value.reason == "answered HTTP 500"
    assert allowed.requests == [("GET", "/clip.mp4")]

    table[NAME] = ["127.0.0.1"]
    connections.clear()
    with transaction() as session, pytest.raises(FetchRefused) as second:
        fetch(session, url)
    assert f"host '{NAME}' resolves to 127.0.0.1, a loopback address" in second.value.reason, second.value.reason
    assert connections == [] and inside.requests == [] and len(allowed.requests) == 1
