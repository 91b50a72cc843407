"""A small HTTP client for the v1 API, used by `dreamq generate` and by scripts.

Where the API lives and which key to use come from DREAMQ_API_URL / DREAMQ_API_KEY, else from the
credentials.json that `dreamq up` writes under DREAMQ_HOME (.dreamq by default).
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
from pathlib import Path
from typing import Any, Callable

import requests

from app.core.config import get_settings


class ApiClientError(RuntimeError):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {error.get('message') or body}")


def load_credentials(home: str | None = None) -> dict[str, Any]:
    path = Path(home or get_settings().home) / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {}


class DreamqClient:
    def __init__(self, api_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0):
        creds = load_credentials() if not (api_url and api_key) else {}
        self.api_url = (api_url or os.environ.get("DREAMQ_API_URL") or creds.get("api_url") or "").rstrip("/")
        self.api_key = api_key or os.environ.get("DREAMQ_API_KEY") or creds.get("api_key")
        if not self.api_url or not self.api_key:
            raise RuntimeError("no API URL/key: run `dreamq up`, or set DREAMQ_API_URL and DREAMQ_API_KEY")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.api_key}"

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, self.api_url + path, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ApiClientError(response.status_code, body)
        return body

    def upload(self, path: Path) -> dict[str, Any]:
        content_type = mimetypes.guess_type(path.name)[0] or "video/mp4"
        with path.open("rb") as handle:
            return self._call("POST", "/v1/uploads", data=handle, headers={"Content-Type": content_type}, timeout=120)

    def submit(self, prompt: str, **fields: Any) -> dict[str, Any]:
        body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        return self._call("POST", "/v1/generations", json=body)

    def get(self, job_id: str, wait_s: float = 0) -> dict[str, Any]:
        headers = {"Prefer": f"wait={wait_s:g}"} if wait_s else {}
        return self._call("GET", f"/v1/generations/{job_id}", headers=headers, timeout=self.timeout + wait_s)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/generations/{job_id}/cancel")

    def wait(
        self, job_id: str, *, timeout_s: float = 600, on_update: Callable[[dict], None] | None = None
    ) -> dict[str, Any]:
        """Poll until the job is terminal, calling on_update with each read (progress bar)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id, wait_s=0)
            if on_update:
                on_update(job)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s:.0f} s")
            time.sleep(0.3)

    def download(self, url: str, out: Path) -> int:
        with requests.get(url, stream=True, timeout=120) as response:
            response.raise_for_status()
            size = 0
            with out.open("wb") as handle:
                for chunk in response.iter_content(1 << 16):
                    handle.write(chunk)
                    size += len(chunk)
        return size
