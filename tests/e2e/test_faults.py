"""Faults in the surroundings, each met with a clear log event or one-line error, and
no lost or corrupt state: a read-only database folder, a full disk, a database locked
by another process past `busy_timeout`, a step ignoring SIGTERM, a step printing
megabytes, a planner that hangs. Faults that come and go under a live daemon end with
every accepted dispatch `succeeded`, without a restart."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon, _env, wait_until

pytestmark = pytest.mark.slow

CONFIG = """
[database]
path = "state/dispatcher.db"
busy_timeout = "{busy}"

[daemon]
poll_interval = "100ms"
kill_grace = "500ms"
heartbeat_interval = "500ms"
instance_ttl = "3s"

[log]
child_lines = false

[runners.sh]
type = "exec"

[runners.noop]
type = "noop"

[tasks.hello]
steps = [{{ name = "s", runner = "noop", args = ["{{n}}"] }}]

[[tasks.nap.steps]]
name = "a"
runner = "sh"
args = ["{python}", "-c", "import time; time.sleep(float('{{s}}'))"]

[[tasks.nap.steps]]
name = "b"
runner = "noop"

[[tasks.stubborn.steps]]
name = "s"
runner = "sh"
timeout = "1s"
args = ["{python}", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"]

[[tasks.chatty.steps]]
name = "s"
runner = "sh"
args = ["{python}", "-c", "import sys; [sys.stdout.write('x' * 1023 + chr(10)) for _ in range(8 * 1024)]; print('the end')"]

[tasks.hung_planner]
planner = "command"
command = ["{python}", "-c", "import time; time.sleep(60)"]
timeout = "1s"
"""  # noqa: E501


def write_config(tmp_path: Path, busy: str = "5s") -> Path:
    config = tmp_path / "dispatcher.toml"
    config.write_text(CONFIG.format(busy=busy, python=sys.executable))
    return config


def cli(config: Path, *args: str, stdin: str | None = None, **popen: Any) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        env=_env(),
        **popen,
    )


def db_file(tmp_path: Path) -> Path:
    return tmp_path / "state" / "dispatcher.db"


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(path)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


# -- a read-only database folder -------------------------------------------------------------

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3


def _without_file_privileges() -> None:
    """preexec: as root, drop the capabilities that ignore file permissions (on exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(99)


def bound_by_permissions() -> dict[str, Any]:
    """Popen options that make a child obey file permissions, even when we are root."""
    return {"preexec_fn": _without_file_privileges} if os.geteuid() == 0 else {}


@pytest.mark.parametrize("exists", [True, False], ids=["existing-db", "new-db"])
def test_a_read_only_folder_is_one_line_and_exit_73(tmp_path: Path, exists: bool) -> None:
    config = write_config(tmp_path)
    folder = db_file(tmp_path).parent
    folder.mkdir()
    if exists:
        assert cli(config, "init").returncode == 0
        assert cli(config, "submit", "hello", "--param", "n=1").returncode == 0
    os.chmod(folder, 0o555)
    try:
        for command in (["submit", "hello", "--param", "n=2"], ["run"]):
            result = cli(config, *command, **bound_by_permissions())
            if result.returncode == 99:
                pytest.skip("cannot drop root's file capabilities here")
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in result.stdout, lines
            if command[0] == "submit" and not exists:  # only run and init create one
                assert result.returncode == 66, (command, result.stderr)
                assert lines[0].startswith(f"dispatcher: error: no database at {db_file(tmp_path)}")
                continue
            assert result.returncode == 73, (command, result.stdout, result.stderr)
            assert lines[0].startswith("dispatcher: error: cannot open"), lines
            assert str(folder) in lines[0]
    finally:
        os.chmod(folder, 0o755)
    if exists:
        assert integrity(db_file(tmp_path)) == "ok"
        assert json.loads(cli(config, "show", "1", "--json").stdout)["status"] == "queued"


# -- the disk filling up mid-write -----------------------------------------------------------


def _file_size_limit(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        # Past the limit a write fails with EFBIG (SIGXFSZ ignored): a full disk, to SQLite.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_a_full_disk_mid_batch_keeps_whole_chunks_only(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert cli(config, "init").returncode == 0
    assert cli(config, "submit", "hello", "--param", "n=first").returncode == 0
    pad = "p" * 400
    lines = "".join(
        json.dumps({"task": "hello", "params": {"n": str(i), "pad": pad}, "key": f"k{i}"}) + "\n"
        for i in range(5000)
    )
    # Room for the first chunk of 1000 lines in the WAL, not for all five.
    result = cli(
        config, "submit", "--batch", "-", stdin=lines, preexec_fn=_file_size_limit(1_500_000)
    )

    assert result.returncode == 73, result.stderr
    (warning, *error) = result.stderr.strip().splitlines()
    assert "param 'pad' used by no step (stored anyway" in warning  # `pad` pads the rows
    assert len(error) == 1 and "disk full or the file size limited" in error[0], error
    answered = [json.loads(line) for line in result.stdout.splitlines()]
    assert f"({len(answered)} of 5000 lines saved and answered)" in error[0]
    assert len(answered) % 1000 == 0  # whole chunks: a failed chunk leaves nothing
    assert integrity(db_file(tmp_path)) == "ok"
    with closing(sqlite3.connect(db_file(tmp_path))) as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM dispatches").fetchone()
    assert rows == 1 + len(answered)
    # Without the limit the same batch completes, idempotently.
    again = cli(config, "submit", "--batch", "-", stdin=lines)
    assert again.returncode == 0, again.stderr
    answers = [json.loads(line) for line in again.stdout.splitlines()]
    assert [a["id"] for a in answers[: len(answered)]] == [a["id"] for a in answered]
    assert sum(a["created"] for a in answers) == 5000 - len(answered)


# -- faults that come and go under a live daemon -------------------------------------------------


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@contextmanager
def read_only_database(folder: Path) -> Iterator[None]:
    """The database folder and its files turned immutable (`chattr +i`, as root): a new
    connection cannot write (SQLITE_READONLY), an open one gets SQLITE_IOERR_WRITE.
    The -shm file is left alone: it is shared memory, mapped by every connection."""
    paths = [folder, *(p for p in folder.iterdir() if not p.name.endswith("-shm"))]
    _chattr("+i", *paths)
    try:
        yield
    finally:
        _chattr("-i", *paths)


def _can_chattr(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_text("")
    try:
        _chattr("+i", probe)
    except (OSError, subprocess.CalledProcessError):
        return False
    _chattr("-i", probe)
    return True


def test_a_read_only_database_for_seconds_loses_nothing(tmp_path: Path, make_daemon: Any) -> None:
    if os.geteuid() != 0 or not _can_chattr(tmp_path):
        pytest.skip("needs root and a file system with chattr +i")
    daemon: Daemon = make_daemon(write_config(tmp_path).read_text())
    daemon.start()
    accepted = [daemon.cli_json("submit", "nap", "--param", "s=1.5")["id"] for _ in range(8)]
    daemon.wait_for_event("attempt_started")

    with read_only_database(db_file(tmp_path).parent):
        refused = daemon.cli("submit", "nap", "--param", "s=0")
        daemon.wait_for_event("database_unavailable", timeout=20)
        time.sleep(2)  # steps end meanwhile: their writes wait

    assert refused.returncode == 73, refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    daemon.wait_for_event("database_available", timeout=30)
    wait_until(lambda: _statuses(daemon) == {"succeeded": len(accepted)}, timeout=60)
    assert daemon.proc is not None and daemon.proc.poll() is None  # no restart
    assert daemon.stop() == 0
    assert daemon.cli_json("gates")["rows"]["held"] == 0
    assert integrity(db_file(tmp_path)) == "ok"


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` (as root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """A file that takes all but `leave` bytes of the file system."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    with filler.open("wb") as out:
        out.write(b"\0" * max(stat.f_bavail * stat.f_frsize - leave, 0))
    return filler


def test_a_full_disk_during_a_batch_loses_nothing_once_space_returns(
    tmp_path: Path, make_daemon: Any
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    with small_disk(db_file(tmp_path).parent, "32m") as folder:
        daemon: Daemon = make_daemon(write_config(tmp_path).read_text())
        daemon.start()
        filler = _fill(folder, leave=1_500_000)
        lines = "".join(
            json.dumps({"task": "hello", "params": {"n": str(i), "pad": "p" * 200}}) + "\n"
            for i in range(5000)
        )
        result = daemon.cli("submit", "--batch", "-", stdin=lines, timeout=120)
        accepted = [json.loads(line)["id"] for line in result.stdout.splitlines()]
        assert result.returncode in (0, 73), result.stderr
        assert result.returncode == 0 or "disk full" in result.stderr
        assert accepted, "not one chunk fitted: the test's disk is too small"
        daemon.wait_for_event("database_unavailable", timeout=30)
        filler.unlink()  # space comes back

        daemon.wait_for_event("database_available", timeout=30)
        wait_until(lambda: _statuses(daemon).get("succeeded") == len(accepted), timeout=90)
        assert _queue(daemon) == {"succeeded": len(accepted)}  # nothing stuck
        assert daemon.proc is not None and daemon.proc.poll() is None  # no restart
        assert daemon.stop() == 0
        assert daemon.cli_json("gates")["rows"]["held"] == 0
        assert integrity(db_file(tmp_path)) == "ok"


# -- a damaged database ---------------------------------------------------------------------------


def _fill_queue(config: Path, count: int) -> None:
    lines = "".join(
        json.dumps({"task": "hello", "params": {"n": str(i), "pad": "p" * 200}}) + "\n"
        for i in range(count)
    )
    assert cli(config, "submit", "--batch", "-", stdin=lines).returncode == 0


def _damage(path: Path, first_page: int = 3) -> None:
    """Garbage over every page from `first_page` on, after a checkpoint has moved all
    of the WAL into the file (the header and the first pages stay readable)."""
    with closing(sqlite3.connect(path, timeout=10)) as db:
        # A checkpoint that meets a reader (the running daemon) reports busy and leaves
        # frames in the WAL: the daemon would read those pages from there, never seeing
        # the damage. Try again until the whole WAL is in the file.
        deadline = time.monotonic() + 30
        while db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] != 0:
            assert time.monotonic() < deadline, "the WAL could not be checkpointed"
            time.sleep(0.05)
        pages, size = db.execute("SELECT * FROM pragma_page_count, pragma_page_size").fetchone()
    with path.open("r+b") as out:
        for page in range(first_page, pages + 1):
            out.seek((page - 1) * size + 64)
            out.write(b"\xa5" * (size - 128))


def _one_line_recover(result: Any) -> str:
    assert result.returncode == 73, (result.returncode, result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert "is damaged" in line or "not a database" in line, line
    assert ".recover" in line and "Traceback" not in result.stderr + result.stdout
    return line


def test_a_damaged_database_is_refused_at_start_and_by_check_db(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert cli(config, "init").returncode == 0
    _fill_queue(config, 3000)
    healthy = cli(config, "check-db")
    assert healthy.returncode == 0 and ": ok" in healthy.stdout, healthy.stderr

    _damage(db_file(tmp_path), first_page=40)

    for command in ("run", "check-db"):
        line = _one_line_recover(cli(config, command))
        assert str(db_file(tmp_path)) in line


def test_damage_found_while_running_stops_the_daemon_with_its_cause(
    tmp_path: Path, make_daemon: Any
) -> None:
    """Found by a statement at run time ("malformed"): `database_corrupt` at critical
    level and exit 73, instead of `claim_failed` every round for ever."""
    text = write_config(tmp_path).read_text() + "\n[gate]\nglobal = 1\n"
    daemon: Daemon = make_daemon(text)
    daemon.start()
    daemon.cli_json("submit", "nap", "--param", "s=2")
    _fill_queue(daemon.config, 3000)  # waiting behind it
    daemon.wait_for_event("attempt_started")

    _damage(db_file(tmp_path))
    with closing(sqlite3.connect(db_file(tmp_path), isolation_level=None)) as db:
        db.execute("PRAGMA user_version = 7")  # a new snapshot: the daemon reads the file

    assert daemon.proc is not None
    code = daemon.proc.wait(60)
    daemon.proc = None
    assert code == 73
    (corrupt,) = [e for e in daemon.events() if e["event"] == "database_corrupt"]
    assert corrupt["level"] == "critical" and "damaged" in corrupt["error"]
    assert sum(1 for e in daemon.events() if e["event"] == "claim_failed") <= 1
    _one_line_recover(cli(daemon.config, "check-db"))


# -- reading commands never write --------------------------------------------------------------


def test_reading_commands_work_on_a_read_only_database(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not _can_chattr(tmp_path):
        pytest.skip("needs root and a file system with chattr +i")
    config = write_config(tmp_path)
    assert cli(config, "init").returncode == 0
    assert cli(config, "submit", "hello", "--param", "n=1").returncode == 0
    folder = db_file(tmp_path).parent
    paths = [folder, *folder.iterdir()]
    _chattr("+i", *paths)
    try:
        for command in (["list"], ["show", "1"], ["gates"], ["status"], ["check-db"]):
            result = cli(config, *command)
            assert result.returncode == 0, (command, result.stderr)
        health = cli(config, "health")
        assert health.returncode == 69 and "no live daemon" in health.stderr
        refused = cli(config, "submit", "hello", "--param", "n=2")
        assert refused.returncode == 73 and refused.stderr.count("\n") == 1, refused.stderr
    finally:
        _chattr("-i", *paths)
    assert json.loads(cli(config, "show", "1", "--json").stdout)["status"] == "queued"


def test_reading_commands_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    config = write_config(tmp_path, busy="200ms")
    assert cli(config, "init").returncode == 0
    assert cli(config, "submit", "hello", "--param", "n=1").returncode == 0
    with exclusive_lock(db_file(tmp_path)):
        for command in (["list"], ["show", "1"], ["gates"], ["status"]):
            result = cli(config, *command)
            assert result.returncode == 0, (command, result.stderr)
        assert cli(config, "health").returncode == 69  # not 75: it read, and no daemon lives
        assert cli(config, "submit", "hello", "--param", "n=2").returncode == 75


# -- a database locked by another process ----------------------------------------------------


@contextmanager
def exclusive_lock(path: Path) -> Iterator[threading.Event]:
    """Another connection holds `BEGIN EXCLUSIVE` until the yielded event is set."""
    release, locked = threading.Event(), threading.Event()

    def hold() -> None:
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(60)
            db.execute("ROLLBACK")

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(10)
        yield release
    finally:
        release.set()
        thread.join()


def test_a_lock_past_busy_timeout_cli_exits_75_and_the_daemon_waits(
    tmp_path: Path, make_daemon: Any
) -> None:
    config = write_config(tmp_path, busy="200ms")
    daemon: Daemon = make_daemon(config.read_text())
    daemon.start()
    lines = [json.dumps({"task": "hello", "params": {"n": f"{i}"}}) for i in range(50)]
    batch = "\n".join(lines) + "\n"
    assert daemon.cli("submit", "--batch", "-", stdin=batch).returncode == 0

    with exclusive_lock(db_file(tmp_path)) as release:
        refused = daemon.cli("submit", "hello", "--param", "n=locked")
        daemon.wait_for_event("database_busy", timeout=20)
        release.set()

    assert refused.returncode == 75, refused.stderr
    assert refused.stderr.count("\n") == 1 and "is busy" in refused.stderr
    daemon.wait_for_event("database_free", timeout=20)
    assert daemon.cli("submit", "hello", "--param", "n=after").returncode == 0
    wait_until(lambda: _statuses(daemon) == {"succeeded": 51}, timeout=60)
    assert daemon.stop() == 0
    events = {event["event"] for event in daemon.events()}
    assert "daemon_crashed" not in events and "dispatch_crashed" not in events
    assert daemon.cli_json("gates")["rows"]["held"] == 0
    assert integrity(db_file(tmp_path)) == "ok"


def _queue(daemon: Daemon) -> dict[str, int]:
    """Dispatches per status (those with any), however many."""
    counts: dict[str, int] = daemon.cli_json("status")["queue"]
    return {status: n for status, n in counts.items() if n}


def _statuses(daemon: Daemon) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in daemon.statuses().values():
        counts[status] = counts.get(status, 0) + 1
    return counts


# -- misbehaving steps and planners ------------------------------------------------------------


def _finished(daemon: Daemon, dispatch_id: str) -> dict[str, Any]:
    daemon.wait_status(int(dispatch_id), "succeeded", "failed", timeout=60)
    shown: dict[str, Any] = daemon.cli_json("show", dispatch_id)
    return shown


def test_misbehaving_steps_and_planners_fail_alone_with_a_reason(
    tmp_path: Path, make_daemon: Any
) -> None:
    daemon: Daemon = make_daemon(write_config(tmp_path).read_text())
    daemon.start()
    ids = {
        task: daemon.cli_json("submit", task)["id"]
        for task in ("stubborn", "chatty", "hung_planner")
    }

    stubborn = _finished(daemon, str(ids["stubborn"]))
    assert stubborn["status"] == "failed"
    assert stubborn["error"] == "step 's' failed after 1 attempt: timed out after 1s"
    assert stubborn["attempts"][0]["status"] == "timed_out"
    assert stubborn["attempts"][0]["output"].strip() == "ready"

    chatty = _finished(daemon, str(ids["chatty"]))
    assert chatty["status"] == "succeeded"
    output = chatty["attempts"][0]["output"]
    assert len(output.encode()) <= 8192 and output.endswith("the end\n")

    hung = _finished(daemon, str(ids["hung_planner"]))
    assert hung["status"] == "failed"
    assert hung["error"] == "planner failed: timed out after 1s"
    assert hung["plan"] is None

    # Nothing of theirs is left running, and the daemon serves on.
    assert daemon.cli("submit", "hello", "--param", "n=1", "--wait").returncode == 0
    assert daemon.stop() == 0
    assert daemon.cli_json("gates")["rows"]["held"] == 0
    events = [e for e in daemon.events() if e["event"] == "attempt_finished"]
    assert {e.get("status") for e in events} >= {"timed_out", "succeeded"}
