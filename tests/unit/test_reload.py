"""What a SIGHUP reload applies at once, and what it leaves for the next start."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from dispatcher.config import Settings, load_settings
from dispatcher.daemon import Daemon, restart_only_changes
from dispatcher.testing import InMemoryStore


def test_reload_names_what_only_a_restart_applies() -> None:
    old = Settings.model_validate({"log": {"level": "info"}, "gate": {"global": 2}})
    new = Settings.model_validate(
        {"log": {"level": "debug", "child_lines_burst": 5}, "gate": {"global": 9}}
    )
    assert restart_only_changes(old, new) == ["log.level"]
    moved = new.model_copy(update={"database": new.database.model_copy(update={"path": Path("x")})})
    assert restart_only_changes(new, moved) == ["database"]
    assert restart_only_changes(new, new) == []


CONFIG = """
[database]
path = "d.db"
[gate]
global = 2
[runners.noop]
type = "noop"
[tasks.n]
steps = [{ name = "a", runner = "noop" }]
"""


def test_a_reload_that_reads_the_same_configuration_says_so(tmp_path: Path) -> None:
    """A single-file bind mount keeps showing the old file after an editor replaced it
    on the host: the daemon must say it found nothing new, not `config_reloaded`."""
    config = tmp_path / "dispatcher.toml"
    config.write_text(CONFIG)
    daemon = Daemon(
        load_settings(config, {}), InMemoryStore(), reload=lambda: load_settings(config, {})
    )
    with capture_logs() as events:
        daemon._reload_config()
    assert [(e["event"], e["log_level"]) for e in events] == [("config_unchanged", "info")]
    assert events[0]["config"] == str(config)

    config.write_text(CONFIG.replace("global = 2", "global = 3"))
    with capture_logs() as events:
        daemon._reload_config()
    assert [e["event"] for e in events] == ["config_reloaded"]
    assert events[0]["gates"]["global"] == 3
