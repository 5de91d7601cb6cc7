"""What the daemon does at start before it takes work: the orphan guard."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher import daemon as daemon_module
from dispatcher.config import load_settings
from dispatcher.daemon import Daemon
from dispatcher.runners.guard import GuardError
from dispatcher.testing import InMemoryStore

NOOP_ONLY = """
[database]
path = "d.db"
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""

WITH_PYTHON = (
    NOOP_ONLY
    + """
[runners.py]
type = "python"
"""
)


class FakeGuard:
    def __init__(self, error: GuardError | None = None) -> None:
        self.error = error
        self.starts = 0
        self.pid = None

    def start(self) -> None:
        self.starts += 1
        if self.error is not None:
            raise self.error


def daemon_on(tmp_path: Path, text: str) -> Daemon:
    config = tmp_path / "dispatcher.toml"
    config.write_text(text)
    return Daemon(load_settings(config, {}), InMemoryStore())


@pytest.mark.parametrize(("text", "starts"), [(NOOP_ONLY, 0), (WITH_PYTHON, 1)])
def test_the_guard_starts_with_the_daemon_only_when_steps_may_start_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, starts: int
) -> None:
    guard = FakeGuard()
    monkeypatch.setattr(daemon_module, "process_guard", lambda: guard)

    daemon_on(tmp_path, text)._start_guard()

    assert guard.starts == starts


def test_a_guardian_that_cannot_start_is_logged_and_the_daemon_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = FakeGuard(GuardError(2, "cannot start the guardian: No such file"))
    monkeypatch.setattr(daemon_module, "process_guard", lambda: guard)

    with capture_logs() as events:
        daemon_on(tmp_path, WITH_PYTHON)._start_guard()  # does not raise

    assert events == [
        {
            "event": "guardian_start_failed",
            "error": "cannot start the guardian: No such file",
            "log_level": "error",
        }
    ]
