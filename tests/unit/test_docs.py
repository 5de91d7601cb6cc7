"""docs/logs.md documents every event the code logs (operators match on these names)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOG_CALL = re.compile(r"\.(?:debug|info|warning|error|exception|critical)\(\s*\"([a-z0-9_]+)\"")


def logged_events() -> set[str]:
    events = set()
    for path in (ROOT / "dispatcher").rglob("*.py"):
        events |= set(LOG_CALL.findall(path.read_text()))
    return events


def test_every_logged_event_is_documented() -> None:
    events = logged_events()
    assert {"daemon_started", "step_output_suppressed", "config_reload_failed"} <= events
    text = (ROOT / "docs/logs.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, re.M))
    assert sorted(events - documented) == []
