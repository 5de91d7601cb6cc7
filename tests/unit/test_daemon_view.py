"""The API sees the daemon through `api.DaemonView` alone: it cancels a dispatch in
flight through `Daemon.cancel`, reads what is in flight without changing it, and the
two modules never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dispatcher.api
from dispatcher.api import DaemonView
from dispatcher.config import load_settings
from dispatcher.daemon import Daemon
from dispatcher.pipeline import CancelReason, InFlight
from dispatcher.testing import FakeClock, InMemoryStore

CONFIG = """
[database]
path = "d.db"
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""


def daemon_view(tmp_path: Path) -> tuple[Daemon, DaemonView]:
    (tmp_path / "dispatcher.toml").write_text(CONFIG)
    daemon = Daemon(
        load_settings(tmp_path / "dispatcher.toml", {}), InMemoryStore(), clock=FakeClock()
    )
    return daemon, daemon  # the daemon as the API sees it (mypy checks `serve` takes it)


async def test_the_api_cancels_a_dispatch_in_flight_through_the_narrow_view(
    tmp_path: Path,
) -> None:
    daemon, view = daemon_view(tmp_path)
    flight = InFlight(7)
    daemon.state.inflight[7] = flight

    assert view.cancel(8, CancelReason.USER) is False  # not run here: nothing to stop
    assert flight.reason is None and not flight.scope.cancel_called
    assert view.cancel(7, CancelReason.USER) is True
    assert flight.reason is CancelReason.USER and flight.scope.cancel_called


async def test_what_is_in_flight_is_read_only_and_current(tmp_path: Path) -> None:
    daemon, view = daemon_view(tmp_path)
    shown = view.in_flight
    assert dict(shown) == {}
    daemon.state.inflight[7] = InFlight(7)
    assert list(shown) == [7]  # a view of the daemon's own table, not a copy
    with pytest.raises(TypeError):
        shown[8] = InFlight(8)  # type: ignore[index]  # the point: it cannot be written
    assert list(daemon.state.inflight) == [7]


def test_the_api_never_imports_the_daemon() -> None:
    tree = ast.parse(Path(dispatcher.api.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # `from dispatcher import daemon` too
            imported |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
    assert "dispatcher.daemon" not in imported  # not even for type checking
    assert "dispatcher.api" not in imported


@pytest.mark.parametrize(
    ("module", "absent"),
    [("dispatcher.api", "dispatcher.daemon"), ("dispatcher.daemon", "dispatcher.api")],
)
def test_importing_one_of_api_and_daemon_loads_not_the_other(module: str, absent: str) -> None:
    """The daemon loads the API only when `[api] listen` is set (aiohttp is heavy)."""
    code = f"import sys, {module}; print({absent!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
