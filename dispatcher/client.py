"""`dispatcher submit --url`: submit through a daemon's HTTP API (stdlib only).

HTTP answers map to the same exit codes as a local submit: 409/413/422/404 -> 65
(bad data, the server's message), 401 -> 77 (no permission), 503 busy -> 75, an
unreachable or failing daemon -> 69.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from dispatcher.errors import BadRequest, DispatcherError, StoreBusy, Unauthorized, Unavailable
from dispatcher.service import SubmitRequest

TIMEOUT = 30.0


@dataclass(frozen=True)
class ApiClient:
    """A daemon's API at `base_url` (e.g. `http://10.0.0.5:8080`)."""

    base_url: str
    token: str | None = None
    timeout: float = TIMEOUT

    def submit(self, request: SubmitRequest) -> dict[str, Any]:
        """POST /v1/dispatches: `{"id", "status", "created"}`."""
        body: dict[str, Any] = {"task": request.task, "params": request.params}
        if request.key is not None:
            body["key"] = request.key
        if request.priority is not None:
            body["priority"] = request.priority
        if request.at is not None:
            body["at"] = request.at.isoformat().replace("+00:00", "Z")
        if request.delay is not None:
            body["in"] = f"{request.delay:.3f}s"
        return self._call("POST", "/v1/dispatches", body)

    def show(self, dispatch_id: int) -> dict[str, Any]:
        """GET /v1/dispatches/{id}: the object of `show --json`."""
        return self._call("GET", f"/v1/dispatches/{dispatch_id}")

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        url = self.base_url.rstrip("/") + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            raise _http_error(url, exc) from None
        except urllib.error.URLError as exc:
            raise Unavailable(f"{url}: cannot reach the daemon's API: {exc.reason}") from None
        except TimeoutError:
            raise Unavailable(f"{url}: no answer within {self.timeout:g}s") from None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"{url}: {type(exc).__name__}: {exc}") from None


def _http_error(url: str, exc: urllib.error.HTTPError) -> DispatcherError:
    try:
        error = json.loads(exc.read())["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError, OSError):
        code, message = "http_error", exc.reason or "no message"
    if exc.code == 401:
        return Unauthorized(f"{url}: HTTP 401: {message} (check --token-file / api.token_file)")
    if exc.code in (404, 409, 413, 422):
        return BadRequest(message)
    if exc.code == 503 and code == "busy":
        return StoreBusy(f"{url}: HTTP 503: {message}")
    return Unavailable(f"{url}: HTTP {exc.code}: {message}")
