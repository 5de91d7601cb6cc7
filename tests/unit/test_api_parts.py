"""The API's pure parts: [api] settings, token checks, metrics, the status page HTML."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher import statuspage
from dispatcher.config import is_loopback, load_settings, split_listen
from dispatcher.errors import ConfigError
from dispatcher.gate import GateState
from dispatcher.httpauth import read_token, token_matches
from dispatcher.metrics import DaemonMetrics, LiveSources
from dispatcher.models import DispatchStatus

TOKEN = "0123456789abcdef-token"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# -- [api] settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:8080", "127.0.0.1", 8080), ("[::1]:0", "::1", 0), ("localhost:1", "localhost", 1)],
)
def test_split_listen(listen: str, host: str, port: int) -> None:
    assert split_listen(listen) == (host, port)


@pytest.mark.parametrize("listen", ["8080", ":8080", "host:", "host:http", "host:70000"])
def test_split_listen_refuses(listen: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_listen(listen)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("myhost", False),
    ],
)
def test_only_loopback_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_off_loopback_listen_needs_a_token_file(tmp_path: Path) -> None:
    config = tmp_path / "d.toml"
    config.write_text('[api]\nlisten = "0.0.0.0:8080"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config, {})
    assert "api.listen: not a loopback address" in str(info.value)
    config.write_text('[api]\nlisten = "0.0.0.0:8080"\ntoken_file = "secrets/token"\n')
    settings = load_settings(config, {})
    assert settings.api.token_file == tmp_path.resolve() / "secrets" / "token"


# -- the token ---------------------------------------------------------------------------


def test_token_matches_bearer_and_basic_password_only() -> None:
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert token_matches(f"Bearer {TOKEN}", TOKEN)
    assert token_matches(f"bearer   {TOKEN}", TOKEN)
    assert token_matches(f"Basic {basic}", TOKEN)
    for header in (None, "", TOKEN, f"Bearer {TOKEN}x", f"Token {TOKEN}", "Basic !!!", "Bearer"):
        assert not token_matches(header, TOKEN), header


@given(st.text(max_size=80))
def test_no_other_header_matches(header: str) -> None:
    assert not token_matches(header, TOKEN) or TOKEN in header


def test_read_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token(path) == TOKEN
    for text, problem in [("short", "at least 16"), ("a" * 10 + " " + "b" * 10, "whitespace")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=problem) as info:
            read_token(path)
        assert text not in str(info.value)  # the token never reaches a message
    with pytest.raises(ConfigError, match="file not found"):
        read_token(tmp_path / "missing")


# -- metrics -------------------------------------------------------------------------------


def test_metrics_count_what_the_observer_hears_on_their_own_registry() -> None:
    one, other = DaemonMetrics(), DaemonMetrics()
    one.watch(
        LiveSources(lambda: [GateState("global", 4, 3, 1, ("a", "b", "c"))], lambda: 3), "i1", "v"
    )
    one.set_queue({DispatchStatus.QUEUED: 7})
    one.dispatch_finished("build", "failed")
    one.attempt_finished("shell", "succeeded", 0.2)
    one.observe_purge(120, 0.05)
    text = one.render().decode()
    assert 'dispatcher_gate_capacity{gate="global"} 4.0' in text
    assert 'dispatcher_gate_held{gate="global"} 3.0' in text
    assert 'dispatcher_gate_waiting{gate="global"} 1.0' in text
    assert 'dispatcher_dispatches{status="queued"} 7.0' in text
    assert 'dispatcher_dispatches{status="running"} 0.0' in text
    assert 'dispatcher_dispatches_finished_total{status="failed",task="build"} 1.0' in text
    assert 'dispatcher_attempt_duration_seconds_count{runner="shell"} 1.0' in text
    assert "dispatcher_purge_runs_total 1.0" in text
    assert "dispatcher_purge_rows_deleted_total 120.0" in text
    assert "dispatcher_inflight_dispatches 3.0" in text
    assert "dispatcher_dispatches_finished_total{" not in other.render().decode()


# -- the status page ---------------------------------------------------------------------


def view(**changes: object) -> statuspage.StatusView:
    base = statuspage.StatusView(
        instance_id="abc",
        version="1.0",
        started_at=NOW - timedelta(minutes=5),
        now=NOW,
        stopping=False,
        gates=[GateState("global", 4, 4, 2, ()), GateState("task:<x>", 2, 1, 0, ())],
        queue={DispatchStatus.RUNNING: 4},
        running=[statuspage.RunningRow(7, "build", "running", "<compile>", NOW)],
        failures=[statuspage.FailureRow(3, "deploy", NOW, "<script>alert(1)</script>" * 50)],
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]  # test helper


def test_status_page_escapes_everything_and_shows_the_fill() -> None:
    page = statuspage.render(view())
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'data-gate="task:&lt;x&gt;"' in page
    assert "&lt;compile&gt;" in page
    assert 'class="fill full" style="width:100%"' in page  # global: 4 of 4
    assert 'class="fill" style="width:50%"' in page
    assert '<meta http-equiv="refresh"' in page
    assert "up 5m00s" in page


def test_status_page_says_when_empty_and_stopping() -> None:
    page = statuspage.render(view(running=[], failures=[], stopping=True))
    assert "nothing in flight" in page
    assert "no recent failures" in page
    assert "stopping (draining)" in page
