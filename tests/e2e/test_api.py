"""The HTTP API of the real daemon process: statuses, auth, wake-up, metrics, CLI --url."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from .conftest import read_records, wait_until
from .httphelp import api_config, api_url, call, metric_samples

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-0123456789abcdef"


def start(make_daemon: Any, tmp_path: Path, **options: Any) -> tuple[Any, str]:
    daemon = make_daemon(api_config(tmp_path, **options))
    daemon.start()
    return daemon, api_url(daemon)


def started_labels(tmp_path: Path) -> list[str]:
    return [r.label for r in read_records(tmp_path / "steps.log") if r.kind == "start"]


def test_post_is_idempotent_and_refuses_conflicting_key_reuse(
    tmp_path: Path, make_daemon: Any
) -> None:
    daemon, url = start(make_daemon, tmp_path)
    body = {"task": "one", "params": {"n": "a", "secs": "0"}, "key": "k-1"}

    first = call("POST", f"{url}/v1/dispatches", body)
    again = call("POST", f"{url}/v1/dispatches", body)
    other = call("POST", f"{url}/v1/dispatches", {**body, "params": {"n": "b", "secs": "0"}})

    assert first.status == 201
    assert first.json()["created"] is True
    assert again.status == 200
    assert again.json()["created"] is False
    assert again.json()["id"] == first.json()["id"]
    assert other.status == 409
    assert other.json()["error"]["code"] == "key_conflict"
    assert "k-1" in other.json()["error"]["message"]
    # the same object as `show --json`
    wait_until(lambda: call("GET", f"{url}/v1/dispatches/1").json()["status"] == "succeeded")
    assert call("GET", f"{url}/v1/dispatches/1").json() == daemon.cli_json("show", "1")
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"task": "nope", "params": {}}, "unknown task 'nope'"),
        ({"task": "one", "params": {"n": "a"}}, "secs"),
        ({"task": "one", "params": ["n", "secs"]}, "params must be a JSON object"),
        ({"task": "one", "params": {"n": "a", "secs": "1"}, "extra": 1}, "unknown field"),
        ({"params": {}}, "'task'"),
        ({"task": "one", "params": {"n": "a", "secs": "1"}, "priority": "high"}, "priority"),
        ({"task": "one", "params": {"n": "a", "secs": "1"}, "key": ""}, "key"),
    ],
)
def test_bad_input_is_422_and_nothing_is_created(
    tmp_path: Path, make_daemon: Any, body: Any, message: str
) -> None:
    daemon, url = start(make_daemon, tmp_path)
    answer = call("POST", f"{url}/v1/dispatches", body)
    assert answer.status == 422
    assert answer.json()["error"]["code"] == "bad_request"
    assert message in answer.json()["error"]["message"]
    assert daemon.cli_json("list") == []


def test_malformed_and_oversize_bodies(tmp_path: Path, make_daemon: Any) -> None:
    daemon, url = start(make_daemon, tmp_path)  # api.max_body = 4096
    broken = call("POST", f"{url}/v1/dispatches", raw=b'{"task": "one",')
    assert broken.status == 422
    assert "invalid JSON" in broken.json()["error"]["message"]

    big = {"task": "one", "params": {"n": "x" * 5000, "secs": "0"}}
    oversize = call("POST", f"{url}/v1/dispatches", big)
    assert oversize.status == 413
    assert oversize.json()["error"]["code"] == "body_too_large"
    assert daemon.cli_json("list") == []


def test_unknown_ids_and_paths_are_404(tmp_path: Path, make_daemon: Any) -> None:
    _, url = start(make_daemon, tmp_path)
    for method, path in [
        ("GET", "/v1/dispatches/42"),
        ("POST", "/v1/dispatches/42/cancel"),
        ("GET", "/v1/dispatches/99999999999999999999999"),
        ("GET", "/v1/nothing-here"),
    ]:
        answer = call(method, url + path, {} if method == "POST" else None)
        assert answer.status == 404, path
        assert answer.json()["error"]["code"] == "not_found", path


def test_http_submission_starts_at_once_without_waiting_for_the_poll(
    tmp_path: Path, make_daemon: Any
) -> None:
    """poll_interval is 10 minutes: only the wake-up by the API explains a start."""
    daemon, url = start(make_daemon, tmp_path, poll="10m")
    # let the loop settle into its (10 minute) wait for work
    wait_until(lambda: call("GET", f"{url}/readyz").status == 200)
    answer = call(
        "POST", f"{url}/v1/dispatches", {"task": "one", "params": {"n": "w", "secs": "0"}}
    )
    assert answer.status == 201
    wait_until(lambda: started_labels(tmp_path) == ["w"], timeout=60)
    daemon.wait_status(1, "succeeded", timeout=60)
    assert daemon.stop() == 0


def test_cancel_over_http_is_202_and_stops_a_running_step(tmp_path: Path, make_daemon: Any) -> None:
    daemon, url = start(make_daemon, tmp_path, poll="10m")
    call("POST", f"{url}/v1/dispatches", {"task": "one", "params": {"n": "c", "secs": "60"}})
    wait_until(lambda: started_labels(tmp_path) == ["c"])

    answer = call("POST", f"{url}/v1/dispatches/1/cancel")
    assert answer.status == 202
    assert answer.json()["cancel_requested"] is True
    # with poll_interval at 10 minutes, only the API's direct cancel can explain this
    daemon.wait_status(1, "cancelled", timeout=60)
    samples = metric_samples(call("GET", f"{url}/metrics").body.decode())
    finished = ("dispatcher_dispatches_finished_total", (("status", "cancelled"), ("task", "one")))
    assert samples[finished] == 1
    attempts = ("dispatcher_attempt_duration_seconds_count", (("runner", "py"),))
    assert samples[attempts] == 1
    assert daemon.stop() == 0


def _gauge(samples: dict[Any, float], name: str, gate: str) -> float:
    return samples[(name, (("gate", gate),))]


def test_metrics_gauges_match_gates_json_during_a_run(tmp_path: Path, make_daemon: Any) -> None:
    """3 dispatches, global = 3, runner:py = 2: two steps run, one waits for the runner."""
    daemon, url = start(make_daemon, tmp_path, global_=3, runner_cap=2)
    for n in range(3):
        call("POST", f"{url}/v1/dispatches", {"task": "one", "params": {"n": str(n), "secs": "60"}})
    wait_until(lambda: len(started_labels(tmp_path)) == 2)
    wait_until(lambda: daemon.cli_json("gates")["rows"]["held"] == 5)  # 3 global + 2 runner

    gates = daemon.cli_json("gates")
    samples = metric_samples(call("GET", f"{url}/metrics").body.decode())
    assert call("GET", f"{url}/v1/gates").json() == gates
    for gate in gates["gates"]:
        assert _gauge(samples, "dispatcher_gate_capacity", gate["name"]) == gate["capacity"]
        assert _gauge(samples, "dispatcher_gate_held", gate["name"]) == gate["held"]
    assert {g["name"]: g["held"] for g in gates["gates"]} == {"global": 3, "runner:py": 2}
    assert _gauge(samples, "dispatcher_gate_waiting", "runner:py") == 1
    queue = daemon.cli_json("health")["queue"]
    for status, count in queue.items():
        assert samples[("dispatcher_dispatches", (("status", status),))] == count
    assert samples[("dispatcher_inflight_dispatches", ())] == 3
    assert samples[("dispatcher_instance_start_time_seconds", ())] > 0
    assert daemon.stop() == 0


# -- auth -------------------------------------------------------------------------------


def test_daemon_refuses_to_serve_off_loopback_without_a_token(
    tmp_path: Path, make_daemon: Any
) -> None:
    daemon = make_daemon(api_config(tmp_path, api='listen = "0.0.0.0:0"'))
    result = daemon.cli("run")
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1
    assert "api.listen" in result.stderr
    assert "token_file" in result.stderr


def test_token_is_required_off_loopback(tmp_path: Path, make_daemon: Any) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    api = 'listen = "0.0.0.0:0"\ntoken_file = "token"'
    daemon, url = start(make_daemon, tmp_path, api=api)
    body = {"task": "one", "params": {"n": "t", "secs": "0"}}

    missing = call("POST", f"{url}/v1/dispatches", body)
    wrong = call("POST", f"{url}/v1/dispatches", body, token=TOKEN[:-1] + "X")
    right = call("POST", f"{url}/v1/dispatches", body, token=TOKEN)

    assert missing.status == 401
    assert "Bearer" in missing.headers["WWW-Authenticate"]
    assert missing.json()["error"]["code"] == "unauthorized"
    assert wrong.status == 401
    assert right.status == 201
    for path in ("/v1/gates", "/metrics", "/", "/v1/dispatches/1"):
        assert call("GET", url + path).status == 401, path
        assert call("GET", url + path, token=TOKEN).status == 200, path
    assert call("GET", f"{url}/healthz").status == 200  # probes need no token
    assert daemon.stop() == 0
    logged = daemon.log_path.read_text()
    assert TOKEN not in logged
    assert TOKEN[:-1] not in logged
    assert '"status": 401' in logged  # the access log has the refusals


def test_port_in_use_is_one_line_and_exit_69(tmp_path: Path, make_daemon: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon(api_config(tmp_path, api=f'listen = "127.0.0.1:{port}"'))
        result = daemon.cli("run")
    assert result.returncode == 69
    assert f"api.listen 127.0.0.1:{port}: cannot listen" in result.stderr
    assert result.stderr.count("\n") == 1


# -- submit --url ---------------------------------------------------------------------------


def test_cli_submits_through_a_remote_api(tmp_path: Path, make_daemon: Any) -> None:
    (tmp_path / "token").write_text(TOKEN)
    api = 'listen = "0.0.0.0:0"\ntoken_file = "token"'
    daemon, url = start(make_daemon, tmp_path, api=api)
    args = ["submit", "--url", url, "one", "--param", "n=u", "--param", "secs=0", "--key", "u"]

    first = daemon.cli(*args, "--json")
    again = daemon.cli(*args, "--wait", "--json")
    conflict = daemon.cli(*args[:-4], "--param", "secs=1", "--key", "u")
    unknown = daemon.cli("submit", "--url", url, "nope")
    no_token = daemon.cli("submit", "--url", url, "one", "--token-file", "/dev/null")

    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"id": 1, "status": "queued", "created": True}
    assert again.returncode == 0, again.stderr
    waited = json.loads(again.stdout)
    assert (waited["id"], waited["status"], waited["created"]) == (1, "succeeded", False)
    assert conflict.returncode == 65
    assert "already belongs to dispatch 1" in conflict.stderr
    assert unknown.returncode == 65
    assert "unknown task 'nope'" in unknown.stderr
    assert no_token.returncode == 78  # an empty token file is a configuration error
    (tmp_path / "wrong").write_text("W" * 32)
    wrong = daemon.cli("submit", "--url", url, "one", "--token-file", str(tmp_path / "wrong"))
    assert wrong.returncode == 77
    assert "HTTP 401" in wrong.stderr
    assert daemon.stop() == 0

    refused = daemon.cli("submit", "--url", url, "one", "--token-file", str(tmp_path / "token"))
    assert refused.returncode == 69
    assert refused.stderr.count("\n") == 1
    assert "cannot reach the daemon's API" in refused.stderr


def test_later_and_again_over_http(tmp_path: Path, make_daemon: Any) -> None:
    """`at`/`in` in the body, retry (202, 409), /v1/schedules: as the CLI answers."""
    daemon, url = start(make_daemon, tmp_path)
    later = call(
        "POST",
        f"{url}/v1/dispatches",
        {"task": "one", "params": {"n": "x", "secs": "0"}, "at": "2099-01-01T00:00:00+01:00"},
    )
    assert later.status == 201
    assert later.json()["not_before"] == "2098-12-31T23:00:00Z"
    bad = call(
        "POST",
        f"{url}/v1/dispatches",
        {"task": "one", "params": {"n": "x", "secs": "0"}, "at": "2099-01-01T00:00:00"},
    )
    assert bad.status == 422 and "UTC offset" in bad.json()["error"]["message"]
    both = {
        "task": "one",
        "params": {"n": "x", "secs": "0"},
        "at": "2099-01-01T00:00:00Z",
        "in": "1s",
    }
    assert call("POST", f"{url}/v1/dispatches", both).status == 422

    refused = call("POST", f"{url}/v1/dispatches/{later.json()['id']}/retry", {})
    assert refused.status == 409 and refused.json()["error"]["code"] == "not_retryable"
    assert call("POST", f"{url}/v1/dispatches/{later.json()['id']}/cancel", {}).status == 202
    retried = call("POST", f"{url}/v1/dispatches/{later.json()['id']}/retry", {})
    assert retried.status == 202
    assert retried.json() == {
        "id": later.json()["id"],
        "status": "queued",
        "series": 1,
        "from_step": None,
    }
    daemon.wait_status(1, "succeeded", timeout=60)
    assert call("GET", f"{url}/v1/schedules").json() == {"schedules": []}
    assert daemon.stop() == 0
