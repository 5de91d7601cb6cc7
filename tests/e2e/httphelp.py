"""HTTP helpers for the API e2e tests (stdlib only)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conftest import STEP


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    method: str,
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


def api_url(daemon: Any) -> str:
    """The daemon's API base URL, from its `api_started` log event (listen port 0).

    The API may listen on 0.0.0.0; the tests only ever talk to 127.0.0.1.
    """
    url: str = daemon.wait_for_event("api_started")["url"]
    port = url.rsplit(":", 1)[1]
    return f"http://127.0.0.1:{port}"


def api_config(
    tmp_path: Path,
    *,
    global_: int = 2,
    runner_cap: int | None = None,
    poll: str = "200ms",
    api: str = 'listen = "127.0.0.1:0"',
) -> str:
    cap = f"concurrency = {runner_cap}" if runner_cap else ""
    log = tmp_path / "steps.log"
    step = f'"{sys.executable}", "-S", "{STEP}", "{log}"'
    return f"""
[database]
path = "state/dispatcher.db"

[daemon]
poll_interval = "{poll}"
shutdown_grace = "0s"
kill_grace = "1s"
heartbeat_interval = "500ms"
instance_ttl = "3s"

[gate]
global = {global_}

[runners.py]
type = "exec"
{cap}

[tasks.one]
steps = [{{ name = "nap", runner = "py", args = [{step}, "{{n}}", "{{secs}}"] }}]

[tasks.fails]
steps = [{{ name = "boom", runner = "py", args = ["{{prog}}"] }}]

[api]
max_body = 4096
{api}
"""


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(name, sorted labels): value} (the test's own small parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples
