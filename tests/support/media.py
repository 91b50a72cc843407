"""Synthetic clips for upload and modify-video tests, and a server that hands them out by URL."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import numpy as np

from app.core.media import encode_mp4


def moving_square_frames(
    *, frames: int = 12, size: int = 64, colour=(230, 30, 30), direction: str = "right"
) -> np.ndarray:
    out = np.zeros((frames, size, size, 3), dtype=np.uint8)
    side = size // 4
    for t in range(frames):
        offset = int((size - side) * t / max(frames - 1, 1))
        x, y = {
            "right": (offset, size // 2 - side // 2),
            "left": (size - side - offset, size // 2 - side // 2),
            "down": (size // 2 - side // 2, offset),
            "up": (size // 2 - side // 2, size - side - offset),
        }[direction]
        out[t, y : y + side, x : x + side] = colour
    return out


def moving_square_mp4(**kwargs) -> bytes:
    return encode_mp4(moving_square_frames(**kwargs), fps=8)


@contextlib.contextmanager
def media_server(body: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> Iterator[int]:
    """A user's media host: one HTTP server on 127.0.0.1 answering every GET with `body`; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
