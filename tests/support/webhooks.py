"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 in the test process."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# The session's workers (tests/conftest.py `workers`) deliver every webhook, so they carry a
# schedule in seconds: backoff 0.2, 0.4, 0.8 s; 4 attempts; progress at most every 0.5 s.
WEBHOOK_TEST_ENV = {
    "DREAMQ_WEBHOOK_BACKOFF_BASE_S": "0.2",
    "DREAMQ_WEBHOOK_MAX_ATTEMPTS": "4",
    "DREAMQ_WEBHOOK_PROGRESS_INTERVAL_S": "0.5",
    "DREAMQ_WEBHOOK_CONNECT_TIMEOUT_S": "2",
    "DREAMQ_WEBHOOK_READ_TIMEOUT_S": "2",
}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """`respond(n)` gives the status for the n-th request (1-based) of one delivery id."""

    respond: Callable[[int], int] = lambda n: 200
    requests: list[Received] = field(default_factory=list)
    _seen: Counter = field(default_factory=Counter)

    def __enter__(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                delivery = self.headers.get("X-Dreamq-Delivery", "")
                with receiver._lock:
                    receiver._seen[delivery] += 1
                    n = receiver._seen[delivery]
                    receiver.requests.append(Received(self.path, dict(self.headers), body, time.time()))
                status = receiver.respond(n)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"
