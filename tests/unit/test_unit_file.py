"""What the systemd unit must keep for the daemon's promises (checked on the file)."""

from __future__ import annotations

from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "config" / "dispatcher.service"


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_kills_whatever_is_left_in_its_cgroup_at_stop() -> None:
    """`mixed`: SIGTERM to the daemon alone (it drains), then SIGKILL to every process
    left in the service's cgroup, which no setsid or double fork can leave."""
    assert directives()["KillMode"] == ["mixed"]
    assert directives().get("SendSIGKILL", ["yes"]) == ["yes"]


def test_the_unit_gives_the_daemon_descriptors_to_spare() -> None:
    (limit,) = directives()["LimitNOFILE"]
    assert int(limit.split(":")[-1]) >= 65536
