"""The instance lock (`dispatcher.store.sqlite.lock`) with real processes: a live daemon
keeps a second one out at once; a dead daemon's lock, still held by its guardian while
that one sweeps the daemon's steps away, is waited for, then taken."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dispatcher.errors import Unavailable
from dispatcher.store.sqlite.lock import InstanceLock
from tests.helpers.processes import alive

pytestmark = pytest.mark.slow

HOLD = "import sys; sys.stdin.read()"  # holds its inherited descriptors until stdin ends


def dead_pid() -> int:
    """The pid of a process that ran and was reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()


def hold_lock(
    db: Path, written_pid: int, holders: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Lock `<db>.lock` as a daemon does, with `written_pid` in it, then hand the lock's
    descriptor to a process that holds it until its stdin closes (a guardian's stand-in)
    and close ours: that process alone holds the lock."""
    with (db.parent / (db.name + ".lock")).open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.truncate(0)
        handle.write(f"{written_pid}\n")
        handle.flush()
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD], stdin=subprocess.PIPE, pass_fds=(handle.fileno(),)
        )
    holders.append(proc)
    return proc


def acquire_in_thread(lock: InstanceLock) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            lock.acquire()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def wait_for(condition: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize("holder_state", ["reaped", "zombie"])
def test_a_dead_daemons_lock_still_held_by_its_guardian_is_waited_for(
    tmp_path: Path, holders: list[subprocess.Popen[bytes]], holder_state: str
) -> None:
    db = tmp_path / "dispatcher.db"
    zombie: subprocess.Popen[bytes] | None = None
    if holder_state == "zombie":  # killed, not yet reaped by its parent: dead as well
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        wait_for(lambda: not alive(zombie.pid))
        pid = zombie.pid
    else:
        pid = dead_pid()
    guardian = hold_lock(db, pid, holders)
    lock = InstanceLock(db)

    with capture_logs() as logged:
        thread, errors = acquire_in_thread(lock)
        wait_for(
            lambda: (
                any(e["event"] == "instance_lock_waiting" for e in logged) or not thread.is_alive()
            )
        )
        # The guardian stand-in holds the lock: acquire cannot have returned.
        assert thread.is_alive() and not errors
        assert guardian.stdin is not None
        guardian.stdin.close()  # its sweep is over: it exits, the lock is free
        thread.join(30)

    assert not thread.is_alive() and not errors, errors
    try:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        waiting = [e for e in logged if e["event"] == "instance_lock_waiting"]
        assert len(waiting) == 1 and waiting[0]["holder_pid"] == pid
    finally:
        lock.release()
        if zombie is not None:
            zombie.wait()


def test_a_live_daemons_lock_fails_at_once(
    tmp_path: Path, holders: list[subprocess.Popen[bytes]]
) -> None:
    db = tmp_path / "dispatcher.db"
    daemon = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE)
    holders.append(daemon)
    guardian = hold_lock(db, daemon.pid, holders)

    with capture_logs() as logged, pytest.raises(Unavailable) as raised:
        InstanceLock(db).acquire()

    assert f"another dispatcher daemon (pid {daemon.pid}) is running" in str(raised.value)
    assert not [e for e in logged if e["event"] == "instance_lock_waiting"]
    assert guardian.poll() is None


def test_a_lock_held_past_the_patience_fails_with_one_line(
    tmp_path: Path, holders: list[subprocess.Popen[bytes]]
) -> None:
    """A dead daemon's lock that stays held (a stuck guardian, or something else that
    inherited it) is waited for up to the patience only."""
    db = tmp_path / "dispatcher.db"
    pid = dead_pid()
    hold_lock(db, pid, holders)

    with pytest.raises(Unavailable) as raised:
        InstanceLock(db, patience=0.2).acquire()

    message = str(raised.value)
    assert f"pid {pid}" in message and "\n" not in message
    assert "still held" in message


def test_a_free_lock_is_taken_and_released(tmp_path: Path) -> None:
    db = tmp_path / "dispatcher.db"
    with InstanceLock(db) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        assert lock.fileno() is not None
        with pytest.raises(Unavailable):
            InstanceLock(db).acquire()
    assert lock.fileno() is None
    with InstanceLock(db):
        pass


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from structlog.testing import capture_logs
from dispatcher.errors import Unavailable
from dispatcher.store.sqlite.lock import InstanceLock

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
db = Path(sys.argv[1])
with capture_logs() as logged, InstanceLock(db) as lock:
    try:
        InstanceLock(db).acquire()
    except Unavailable:
        print("second kept out")
print([e["event"] for e in logged])
"""


def test_a_full_disk_leaves_the_pid_unwritten_and_the_lock_held(tmp_path: Path) -> None:
    """No byte can be written (a file-size limit of 0, as on a full disk): the daemon
    still takes the lock, with its pid unwritten and a warning, and keeps a second out."""
    db = tmp_path / "dispatcher.db"
    (tmp_path / "dispatcher.db.lock").write_text("12345\n")  # a dead daemon's pid

    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(db)], capture_output=True, text=True, timeout=30
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["second kept out", "['instance_lock_pid_unwritten']"]
    assert (tmp_path / "dispatcher.db.lock").read_text() == ""
