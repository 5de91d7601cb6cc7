"""Running as a service: sd_notify from the real process, live reload, log flood, status."""

from __future__ import annotations

import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .conftest import peak_concurrency, read_records, wait_until
from .test_daemon import all_final, batch, config

pytestmark = pytest.mark.slow


class NotifyListener:
    """A bound AF_UNIX datagram socket playing systemd's side of NOTIFY_SOCKET.

    A thread receives all the time, as systemd does: the kernel queues only a few
    datagrams per socket (net.unix.max_dgram_qlen, often 10) and the daemon's are sent
    without blocking, so a reader that pauses would lose some on a loaded machine.
    """

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)

    def wait_for(self, key: str, count: int = 1, timeout: float = 20) -> list[dict[str, str]]:
        """Wait until `count` messages carry `key`; answer those messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in list(self.messages) if key in m]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} {key} messages: {self.messages}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_path() -> Iterator[Path]:
    # A short folder: an AF_UNIX path must fit in 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="dn-") as folder:
        yield Path(folder) / "notify.sock"


ENV_DUMP = """
[runners.env]
type = "exec"

[tasks.envdump]
steps = [{ name = "dump", runner = "env", args = ["env"] }]
"""


def test_ready_watchdog_status_stopping(
    tmp_path: Path, make_daemon: Any, notify_path: Path
) -> None:
    listener = NotifyListener(str(notify_path))
    try:
        daemon = make_daemon(config(tmp_path, global_=2, extra=ENV_DUMP))
        daemon.extra_env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
        # As systemd does: WATCHDOG_PID is the pid of the process that must ping.
        daemon.launcher = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"]
        daemon.start()
        ready = listener.wait_for("READY")[0]
        assert ready["READY"] == "1" and "in flight" in ready["STATUS"]
        pings = listener.wait_for("WATCHDOG", count=4)
        assert all(p["WATCHDOG"] == "1" for p in pings)
        after_ready = listener.messages[listener.messages.index(ready) + 1 :]
        assert len([m for m in after_ready if "WATCHDOG" in m]) >= 3  # regular, not one

        # The step's environment carries none of systemd's variables.
        daemon.cli("submit", "envdump")
        daemon.wait_status(1, "succeeded", timeout=20)
        # The daemon writes its log lines out every 0.1 s: its line for the attempt's end
        # comes after every line of the step's output.
        daemon.wait_for_event("attempt_finished")
        output = [e["line"] for e in daemon.events() if e.get("event") == "step_output"]
        assert any(line.startswith("PATH=") for line in output)
        assert not [line for line in output if line.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))]

        listener.wait_for("STATUS", count=2)  # refreshed periodically, not only at READY
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        (reloading,) = listener.wait_for("RELOADING")
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert len(listener.wait_for("READY", count=2)) == 2  # ready again after the reload
        assert daemon.stop() == 0
        stopping = listener.wait_for("STOPPING")[0]
        assert stopping["STOPPING"] == "1"
    finally:
        listener.close()


def test_without_notify_socket_nothing_changes(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon(config(tmp_path, global_=2))
    daemon.extra_env = {"WATCHDOG_USEC": "400000"}  # no socket: nothing to ping
    daemon.start()
    assert daemon.stop() == 0
    assert not [e for e in daemon.events() if e.get("event") == "notify_failed"]


def _epoch(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def test_sighup_changes_capacity_live_and_a_bad_file_keeps_the_old_one(
    tmp_path: Path, make_daemon: Any
) -> None:
    daemon = make_daemon(config(tmp_path, global_=1))
    steps_log = tmp_path / "steps.log"
    daemon.cli("submit", "--batch", "-", stdin=batch("one", 4, 3.0, prefix="a"))
    daemon.start()
    wait_until(lambda: any(r.kind == "start" for r in read_records(steps_log)), timeout=20)

    good = config(tmp_path, global_=3)
    daemon.config.write_text(good)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    reloaded = daemon.wait_for_event("config_reloaded")
    assert reloaded["gates"]["global"] == 3 and reloaded["restart_required"] == []
    wait_until(lambda: all_final(daemon, 4), timeout=60)
    records = read_records(steps_log)
    # Only the first step started before the reload; then three ran at once.
    assert len([r for r in records if r.kind == "start" and r.at < _epoch(reloaded)]) == 1
    assert peak_concurrency(records) == 3

    # A broken file: refused, logged, and the running configuration (3) stays.
    daemon.config.write_text(good.replace("global = 3", "global = 0"))
    daemon.proc.send_signal(signal.SIGHUP)
    failed = daemon.wait_for_event("config_reload_failed")
    assert "gate.global" in failed["error"]
    cli_config = tmp_path / "cli.toml"  # the CLI needs a readable file meanwhile
    cli_config.write_text(good)
    daemon.config = cli_config
    steps_log.unlink()
    daemon.cli("submit", "--batch", "-", stdin=batch("one", 4, 2.0, prefix="b"))
    wait_until(lambda: all_final(daemon, 8), timeout=60)
    assert peak_concurrency(read_records(steps_log)) == 3
    assert daemon.stop() == 0


SHOUT = "print('y' * 9000); print(*range(200000), sep=chr(10))"
FLOOD = f"""
[runners.loud]
type = "exec"

[tasks.flood]
steps = [{{ name = "shout", runner = "loud", args = ["{sys.executable}", "-c", "{SHOUT}"] }}]

[log]
child_lines_burst = 50
child_lines_per_second = 10
child_line_max_bytes = 100
"""


def test_a_flood_of_child_output_cannot_flood_the_log(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon(config(tmp_path, global_=2, extra=FLOOD))
    daemon.start()
    daemon.cli("submit", "flood")
    daemon.wait_status(1, "succeeded", timeout=60)
    summary = daemon.wait_for_event("step_output_summary")
    assert daemon.stop() == 0
    events = daemon.events()
    output = [e for e in events if e.get("event") == "step_output"]
    assert len(output) < 1000, len(output)  # 200,001 lines printed
    assert all(e["dispatch_id"] == 1 and e["step"] == "shout" for e in output)
    suppressed = [e for e in events if e.get("event") == "step_output_suppressed"]
    # The burst of 50, and the few lines the rate (10 a second) refilled meanwhile.
    assert len(suppressed) == 1 and 50 <= suppressed[0]["lines_logged"] <= 55
    assert summary["lines"] == 200_001
    assert summary["lines_logged"] + summary["lines_suppressed"] == 200_001
    assert summary["lines_logged"] == len(output)
    assert len(daemon.log_path.read_text().splitlines()) < 1200
    long_line = output[0]
    assert long_line["truncated"] is True and long_line["bytes"] == 9000
    assert long_line["line"] == "y" * 100


def test_status_gives_the_whole_picture(tmp_path: Path, make_daemon: Any) -> None:
    failing = '[tasks.fail]\nsteps = [{ name = "f", runner = "py", args = ["false"] }]\n'
    # grace 1s: the stop at the end need not wait 10 s for the 30 s step to be interrupted
    daemon = make_daemon(config(tmp_path, global_=1, extra=failing, grace="1s"))
    down = daemon.cli("status")
    assert down.returncode == 0 and "NOT RUNNING" in down.stdout
    daemon.cli("submit", "fail")
    daemon.start()
    daemon.wait_status(1, "failed", timeout=20)
    daemon.cli("submit", "three", "--param", "n=long", "--param", "secs=30")
    daemon.cli("submit", "one", "--param", "n=waiting", "--param", "secs=1")
    steps_log = tmp_path / "steps.log"
    wait_until(lambda: any("long" in r.label for r in read_records(steps_log)), timeout=20)
    data = daemon.cli_json("status")
    assert data["live"] and data["queue"]["queued"] == 1 and data["queue"]["running"] == 1
    assert [(d["task"], d["step"], d["step_index"]) for d in data["in_flight"]] == [
        ("three", "s1", 0)
    ]
    assert data["gates"][0] == {**data["gates"][0], "name": "global", "held": 1, "capacity": 1}
    text = daemon.cli("status").stdout
    assert "live: instance" in text and "1 queued" in text and "step 1/3 s1" in text
    assert len(text.splitlines()) < 10
    assert [f["id"] for f in data["recent_failures"]] == [1]
    assert "exited with status 1" in text
    assert daemon.stop() == 0
