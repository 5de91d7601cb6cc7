"""What a SIGHUP reload applies at once, and what it leaves for the next start."""

from __future__ import annotations

from pathlib import Path

from dispatcher.config import Settings
from dispatcher.daemon import restart_only_changes


def test_reload_names_what_only_a_restart_applies() -> None:
    old = Settings.model_validate({"log": {"level": "info"}, "gate": {"global": 2}})
    new = Settings.model_validate(
        {"log": {"level": "debug", "child_lines_burst": 5}, "gate": {"global": 9}}
    )
    assert restart_only_changes(old, new) == ["log.level"]
    moved = new.model_copy(update={"database": new.database.model_copy(update={"path": Path("x")})})
    assert restart_only_changes(new, moved) == ["database"]
    assert restart_only_changes(new, new) == []
