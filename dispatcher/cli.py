"""dispatcher: run tasks as dispatches, each planned into steps, with capped concurrency.

Submit work with `dispatcher submit TASK`; the daemon (`dispatcher run`, usually a
systemd service or a container) plans each dispatch into steps and runs them, at most
`gate.global` dispatches at once. Every command but `run` works on the database
directly, so you can submit and look while the daemon is down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import structlog

from dispatcher import __version__, limits, service, watch
from dispatcher.clock import SystemClock
from dispatcher.config import Settings, find_config, load_settings
from dispatcher.durations import parse_duration
from dispatcher.errors import (
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    BadRequest,
    ConfigError,
    DispatcherError,
    NotFound,
    UsageError,
)
from dispatcher.gate import GLOBAL
from dispatcher.models import DispatchStatus, NewDispatch, Reservation
from dispatcher.store.base import Access, Store
from dispatcher.views import (
    AttemptView,
    DispatchView,
    InFlightView,
    QueuedView,
    ScheduleView,
    StatusView,
    json_list,
    timestamp,
)

EXIT_NOT_SUCCEEDED = 1
REMOTE_WAIT_POLL = 0.5
FAILURE_TAIL_LINES = 5
OUTPUT_TAIL_LINES = 10
RESULT_CHARS = 200
"""`show` prints a step's result up to this many characters (--json: all of it)."""

EPILOG = """\
examples:
  dispatcher submit hello --param who=world --wait     run one, follow it to its end
  dispatcher submit backup --params '{"paths": ["/srv"]}' --key backup-2026-11-30
  dispatcher submit --batch jobs.jsonl --wait          many at once, with a progress bar
  dispatcher submit report --in 10m                    run it ten minutes from now
  dispatcher retry 17                                  run a failed dispatch again
  dispatcher schedules                                 next and last fire of each schedule
  dispatcher tasks                                     what can be submitted, and its params
  dispatcher status                                    daemon, queue, gates, what runs now
  dispatcher list --status failed --limit 10          failures with their errors
  dispatcher show 17                                   one dispatch, its steps and output

exit codes:
  0   ok (submit --wait: the dispatch succeeded)
  1   submit --wait: the dispatch failed or was cancelled
  2   usage: a wrong option, or options that contradict each other
  65  bad data: unknown task or param, a param of the wrong type, bad JSON,
      an idempotency key reused with other params, no such dispatch
  66  no database at the configured path (only run and init create one)
  69  unavailable: no live daemon (health; submit --wait after its grace)
  73  the database cannot be created, opened or written, or it is damaged
  75  temporary: the database stayed busy; submit --wait --timeout passed;
      a read-only command met a database the daemon has not upgraded yet
  77  submit --url: the API refused the token
  78  bad configuration

The configuration is --config, else $DISPATCHER_CONFIG, else
/etc/dispatcher/dispatcher.toml (where the service is installed), else
./config/dispatcher.toml. `dispatcher COMMAND --help` explains a command.
"""

JSON_HELP = "print JSON instead of text (one object; see README for the fields)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks; wraps option help."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, with help written for the people who type it."""
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $DISPATCHER_CONFIG, then "
        "/etc/dispatcher/dispatcher.toml, then ./config/dispatcher.toml)",
    )
    parser.add_argument("--version", action="version", version=f"dispatcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(
        sub,
        "run",
        "run the daemon in the foreground",
        "Run the daemon in the foreground until SIGTERM or SIGINT: it claims queued "
        "dispatches, plans them and runs their steps, at most gate.global at once. "
        "SIGHUP re-reads the configuration. Logs are JSON lines on stdout.",
    )
    _add_submit(sub)
    _add_reading(sub)
    _add_maintenance(sub)
    return parser


def _command(sub: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=description, formatter_class=_Formatter
    )
    return parser


def _add_submit(sub: Any) -> None:
    submit = _command(
        sub,
        "submit",
        "submit a dispatch of a task (or many with --batch)",
        "Queue one dispatch of TASK with its params; the daemon runs it. Prints "
        "`ID STATUS (created)`. A task that declares its params (see `dispatcher tasks`) "
        "checks them here: a wrong type, an unknown or a missing param exits 65.",
    )
    submit.add_argument("task", nargs="?", metavar="TASK", help="a task of the configuration")
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one param (repeatable); VALUE is text, converted to the declared type",
    )
    submit.add_argument(
        "--params",
        metavar="JSON",
        help="params as a JSON object; a param may not also be given with --param",
    )
    submit.add_argument(
        "--key",
        help="idempotency key: submitting the same key and params again answers the "
        "existing dispatch instead of making a new one",
    )
    submit.add_argument(
        "--priority",
        type=int,
        metavar="N",
        help="higher runs first (default: the task's priority, else 0)",
    )
    later = submit.add_mutually_exclusive_group()
    later.add_argument(
        "--at",
        metavar="TIME",
        help="start no earlier than TIME, ISO-8601 with its offset "
        "(2026-12-01T10:00:00Z, 2026-12-01T11:00+01:00)",
    )
    later.add_argument(
        "--in",
        dest="delay",
        type=_duration,
        metavar="DURATION",
        help="start no earlier than DURATION from now (30s, 10m, 2h)",
    )
    _add_submit_modes(submit)


def _add_submit_modes(submit: argparse.ArgumentParser) -> None:
    """--wait, --timeout, --json, --batch and --url: how a submission is made and followed."""
    submit.add_argument(
        "--wait",
        action="store_true",
        help="follow the dispatch (or the whole batch) to its end; exit 0 only if it "
        "succeeded. The id is printed on stderr at once; on a terminal a live line shows "
        f"its progress. Without a live daemon: exit 69 after {watch.DAEMON_GRACE:g}s",
    )
    submit.add_argument(
        "--timeout",
        type=_duration,
        metavar="DURATION",
        help="with --wait: stop waiting after this long (e.g. 30s, 10m) and exit 75; "
        "the dispatch goes on",
    )
    submit.add_argument("--json", action="store_true", help=JSON_HELP)
    submit.add_argument(
        "--batch",
        metavar="FILE",
        help='submit JSON lines {"task", "params", "key", "priority"} from FILE '
        f"('-' for stdin) instead of TASK; every line is checked first (up to "
        f"{service.MAX_BATCH_ERRORS} bad lines are reported) and nothing is written "
        "if one is bad",
    )
    submit.add_argument(
        "--url", help="submit through this daemon's HTTP API (default: api.url, if set)"
    )
    submit.add_argument(
        "--token-file", metavar="FILE", help="bearer token for --url (default: api.token_file)"
    )


def _add_reading(sub: Any) -> None:
    show = _command(
        sub,
        "show",
        "one dispatch: status, params, plan, attempts and their output",
        "One dispatch: status (`waiting` names the gate it waits for), params, the plan's "
        "steps, every attempt and the tail of its output.",
    )
    show.add_argument("id", type=int, metavar="ID", help="the dispatch id")
    show.add_argument("--json", action="store_true", help=JSON_HELP)
    lst = _command(
        sub,
        "list",
        "recent dispatches, newest first",
        "Recent dispatches, newest first, one a line.",
    )
    lst.add_argument(
        "--status",
        choices=[str(s) for s in DispatchStatus],
        help="only dispatches with this status",
    )
    lst.add_argument(
        "--limit", type=int, default=50, metavar="N", help="at most N dispatches (default 50)"
    )
    lst.add_argument("--json", action="store_true", help=JSON_HELP + " (a list)")
    retry = _command(
        sub,
        "retry",
        "run a failed or cancelled dispatch again from its first unfinished step",
        "Queue a failed or cancelled dispatch again. It resumes at its first unfinished "
        "step: the steps that succeeded stay done and are not run again. Its attempts are "
        "kept (`show` lists them) and numbered on; each step gets its retries again.",
    )
    retry.add_argument("id", type=int, metavar="ID", help="the dispatch id")
    retry.add_argument("--json", action="store_true", help=JSON_HELP)
    schedules = _command(
        sub,
        "schedules",
        "each schedule: next and last fire, and its last dispatch",
        "Every [schedules.NAME] of the configuration: its cron or interval, overlap and "
        "catch-up policies, the next fire, the last fire handled (dispatched or skipped) "
        "and the status of its last dispatch.",
    )
    schedules.add_argument("--json", action="store_true", help=JSON_HELP)
    tasks = _command(
        sub,
        "tasks",
        "the tasks you can submit, with their params",
        "Every task of the configuration with its params: type, required or default, "
        "description. A task without declared params lists the params its steps use.",
    )
    tasks.add_argument("--json", action="store_true", help=JSON_HELP)
    _add_operations(sub)


def _add_operations(sub: Any) -> None:
    """cancel, status, gates, health."""
    cancel = _command(
        sub,
        "cancel",
        "cancel a dispatch",
        "Cancel a dispatch: a queued one at once; the daemon stops a running one shortly.",
    )
    cancel.add_argument("id", type=int, metavar="ID", help="the dispatch id")
    cancel.add_argument("--json", action="store_true", help=JSON_HELP)
    status = _command(
        sub,
        "status",
        "the whole picture: daemon, queue, gates, in flight, failures",
        "The daemon (live or not), the queue, every gate, what is in flight (and what "
        "waits for a gate), and the recent failures with the tail of their output.",
    )
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    gates = _command(
        sub,
        "gates",
        "every gate: capacity, held places, holders; gate row counts",
        "Every gate (global, runner:NAME, task:NAME) with its capacity, the places held "
        "and who holds them, from the gates table; and how many rows the purge would delete.",
    )
    gates.add_argument("--json", action="store_true", help=JSON_HELP)
    health = _command(
        sub,
        "health",
        "exit 0 when a live daemon heartbeats on this database, 69 otherwise",
        "For probes: exit 0 when a daemon heartbeat on this database within "
        "daemon.instance_ttl, 69 otherwise.",
    )
    health.add_argument("--json", action="store_true", help=JSON_HELP)


def _add_maintenance(sub: Any) -> None:
    purge = _command(
        sub,
        "purge",
        "run the purge and retention jobs once, now",
        "Delete released gate rows older than purge.gate_retention and finished "
        "dispatches older than retention.dispatches, now (the daemon also does it on "
        "purge.schedule). Safe while the daemon runs.",
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="report what would go; delete nothing"
    )
    purge.add_argument("--json", action="store_true", help=JSON_HELP)
    check = _command(
        sub,
        "check-config",
        "validate the configuration and exit (78 when it is wrong)",
        "Read and validate the configuration (and its environment overrides), declared "
        "params and templates included, and try what the daemon will need: that the "
        "database folder can be created or written and the token file read, by the user "
        "who runs this. Print a summary and exit 0, or one line naming the file and key "
        "that is wrong and exit 78.",
    )
    check.add_argument(
        "--as-user",
        metavar="NAME",
        help="check the files as this user (the service's), not as the caller (needs root)",
    )
    _command(
        sub,
        "init",
        "create the database and its tables",
        "Create the database (and its folder) and its tables, or bring an existing one's "
        "schema up to date. Only `run` and `init` create a database: every other command "
        "refuses a missing one with exit 66, naming the path and the configuration file.",
    )
    _command(
        sub,
        "check-db",
        "read the whole database and check its integrity",
        "Run SQLite's full integrity check (every page, every index against its table). "
        "Exit 0 when it is sound; exit 73 with one line saying how to recover when it is "
        "damaged. Opens the file read-only: safe while the daemon runs.",
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dispatcher` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except DispatcherError as exc:
        if args.command == "run":
            from dispatcher import logs

            if logs.run_failed(exc.message, exc.exit_code):
                return exc.exit_code  # stderr is the journal too: the event says it all
        print(f"dispatcher: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "submit":
        _check_submit_usage(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "submit" and args.url:
        return _submit_remote(args, _settings_if_any(args.config))
    settings = load_settings(args.config)
    if args.command == "submit" and settings.api.url:
        return _submit_remote(args, settings)
    if args.command == "run":
        return _run(args, settings)
    if args.command == "tasks":
        return _tasks(args, settings)
    handler, access = _HANDLERS[args.command]
    return asyncio.run(_with_store(settings, access, lambda store: handler(args, settings, store)))


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher import logs
    from dispatcher.daemon import crash_summary, run_daemon

    logs.configure(settings.log.level, settings.log.format)
    config_path = find_config(args.config)
    try:
        asyncio.run(run_daemon(settings, reload=lambda: load_settings(config_path)))
    except DispatcherError:
        raise
    except Exception as exc:  # a defect: say so in the log stream, as one structured event
        # `errors` names every exception a task group held; `exception` has their frames.
        log = structlog.get_logger("dispatcher.daemon")
        log.exception("daemon_crashed", errors=crash_summary(exc))
        return EX_SOFTWARE
    return EX_OK


async def _with_store(
    settings: Settings, access: Access, work: Callable[[Store], Awaitable[int]]
) -> int:
    from dispatcher.store import open_store

    saved = structlog.get_config()
    # The store's own events are for the daemon's log; a command speaks through its
    # output and its one line of error.
    structlog.configure(processors=[_drop])
    try:
        store = await open_store(settings, access=access)
        try:
            return await work(store)
        finally:
            await store.close()
    finally:
        structlog.configure(**saved)


def _drop(_logger: object, _name: str, _event: object) -> Any:
    raise structlog.DropEvent


def _check_config(args: argparse.Namespace) -> int:
    """Validate the file, then try what the service will need, as the user who runs it."""
    path = find_config(args.config)
    if args.as_user:
        return _check_config_as(path, args.as_user)
    settings = load_settings(args.config)
    for problem in service.usable_files(settings):
        raise ConfigError(f"{path}: {problem}")
    where = settings.database.url_redacted or settings.database.path
    print(
        f"{path}: ok ({len(settings.tasks)} tasks, {len(settings.runners)} runners, "
        f"{len(settings.schedules)} schedules, database {where})"
    )
    return EX_OK


def _check_config_as(path: Path, user: str) -> int:
    """`check-config` again in a process of `user` (root only), so files are tried with
    that user's rights."""
    import subprocess

    if os.geteuid() != 0:
        raise ConfigError("check-config --as-user needs root (it runs the check as that user)")
    command = [sys.executable, "-m", "dispatcher", "--config", str(path.resolve()), "check-config"]
    try:
        done = subprocess.run(command, user=user, check=False, cwd="/")
    except (KeyError, LookupError, OSError) as exc:
        raise ConfigError(f"check-config --as-user {user}: {exc}") from None
    return done.returncode


# -- submit -------------------------------------------------------------------------------


def _check_submit_usage(args: argparse.Namespace) -> None:
    """Options that contradict each other: exit 2 before anything is read or written."""
    if args.batch is not None:
        if args.task is not None:
            raise UsageError(
                f"submit: TASK {args.task!r} and --batch exclude each other "
                "(each batch line names its task)"
            )
        extra = [
            name
            for name, given in (
                ("--param", args.param),
                ("--params", args.params),
                ("--key", args.key),
                ("--priority", args.priority is not None),
                ("--at", args.at),
                ("--in", args.delay is not None),
            )
            if given
        ]
        if extra:
            raise UsageError(f"submit --batch: {extra[0]} belongs in each batch line, not here")
    elif not args.task:
        raise UsageError("submit needs a TASK (or --batch FILE)")
    if args.timeout is not None and not args.wait:
        raise UsageError("submit: --timeout only applies with --wait")


async def _submit(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    if args.batch is not None:
        return await _submit_batch(args, settings, store)
    request = _request(args, settings)
    reservation = await service.submit(settings, store, SystemClock(), request)
    _warn(service.param_warnings(settings, request))
    if args.wait:
        _say_waiting(reservation)
        data = await watch.follow_one(
            _local_source(settings, store), reservation.id, patience=args.timeout, err=sys.stderr
        )
        return _print_final(data, reservation.created, args.json)
    _print_reservation(args, service.reservation_view(reservation).to_json())
    return EX_OK


def _request(args: argparse.Namespace, settings: Settings) -> service.SubmitRequest:
    params = _params(args, settings)
    at = None if args.at is None else service.parse_at(args.at)
    return service.SubmitRequest(
        args.task, params, args.key, args.priority, at=at, delay=args.delay
    )


def _params(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """--params (JSON) and --param (text, converted to declared types): a param given
    twice is refused, never silently overridden."""
    params: dict[str, Any] = {}
    if args.params is not None:
        try:
            loaded = limits.load_json(args.params)
        except ValueError as exc:
            raise limits.refuse_as(BadRequest, "--params", exc) from None
        if not isinstance(loaded, dict):
            raise BadRequest(f"--params: expected a JSON object, got {type(loaded).__name__}")
        params.update(loaded)
    texts: dict[str, str] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BadRequest(f"--param {item!r}: expected NAME=VALUE")
        problem = limits.text_problem(item)  # e.g. bytes of argv that are not UTF-8
        if problem is not None:
            raise BadRequest(f"--param {name!r}: {problem}")
        if name in texts:
            raise UsageError(f"--param {name}: given twice; give each param once")
        if name in params:
            raise UsageError(
                f"param {name!r} given by both --params and --param; give it once "
                "(one would silently replace the other)"
            )
        texts[name] = value
    params.update(service.params_from_text(settings, args.task, texts))
    return params


def _warn(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"dispatcher: warning: {warning}", file=sys.stderr)


def _warn_once(warnings: Sequence[str]) -> None:
    """A batch's warnings as one line: the first, and how many more lines are like it."""
    if warnings:
        more = len(warnings) - 1
        tail = f" (and {more} more batch lines with params no step uses)" if more else ""
        _warn([warnings[0] + tail])


def _say_waiting(reservation: Reservation) -> None:
    """The id, at once, on stderr: stdout gets only the final answer."""
    how = "created" if reservation.created else "existing"
    print(
        f"dispatch {reservation.id} {reservation.status} ({how}); waiting for it to end "
        "(Ctrl-C stops waiting, not the dispatch)",
        file=sys.stderr,
        flush=True,
    )


def _print_reservation(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    if args.json:
        _print_json(answer)
    else:
        how = "created" if answer["created"] else f"existing dispatch for key {args.key!r}"
        if answer.get("retried"):
            how = f"failed dispatch for key {args.key!r} started again"
        if answer.get("not_before"):
            how += f"; due at {answer['not_before']}"
        print(f"{answer['id']} {answer['status']} ({how})")


def _local_source(settings: Settings, store: Store, light: bool = False) -> watch.Source:
    """The database as a wait's source; `light` reads no attempts (for a batch)."""
    clock = SystemClock()

    async def show(dispatch_id: int) -> dict[str, Any]:
        if light:
            dispatch = await store.get_dispatch(dispatch_id)
            if dispatch is None:
                raise NotFound(f"no dispatch with id {dispatch_id}")
            return service.dispatch_view(dispatch).to_json()
        return (await service.show(store, dispatch_id, settings, clock)).to_json()

    async def daemon_live() -> bool:
        return (await service.health(settings, store, clock)).live

    return watch.Source(show, daemon_live)


def _print_final(data: dict[str, Any], created: bool, as_json: bool) -> int:
    if as_json:
        _print_json({**data, "created": created})
    else:
        error = f": {data['error']}" if data["error"] else ""
        print(f"{data['id']} {data['status']}{error}")
        tail = _failed_tail(data)
        if tail:
            print(_indent(tail, "  | "), file=sys.stderr)
    return EX_OK if data["status"] == DispatchStatus.SUCCEEDED else EXIT_NOT_SUCCEEDED


def _failed_tail(data: dict[str, Any]) -> str | None:
    for attempt in reversed(data.get("attempts", [])):
        if attempt["status"] in ("failed", "timed_out") and attempt.get("output"):
            return service.tail_lines(attempt["output"], FAILURE_TAIL_LINES)
    return None


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# -- submit --batch -------------------------------------------------------------------------


async def _submit_batch(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    lines = _read_batch(args.batch)
    checked = service.check_batch(settings, lines)
    if len(checked.errors) == 1:  # one bad line: one line says it all
        raise BadRequest(f"{checked.errors[0]} (nothing was submitted)")
    if checked.errors:
        for error in checked.errors[: service.MAX_BATCH_ERRORS]:
            print(f"dispatcher: error: {error}", file=sys.stderr)
        raise BadRequest(_refusal(checked, len(lines)))
    _warn_once(checked.warnings)  # only once the batch is taken: "stored anyway" is true
    answers = await _save_batch(store, checked.news, sys.stderr)
    summary = service.batch_summary(answers)
    print(f"dispatcher: batch: {summary.text()}", file=sys.stderr)
    code = await _wait_batch(args, settings, store, summary.ids) if args.wait else EX_OK
    return BadRequest.exit_code if summary.conflicts else code


def _refusal(checked: service.CheckedBatch, total: int) -> str:
    shown = min(len(checked.errors), service.MAX_BATCH_ERRORS)
    more = len(checked.errors) - shown
    listed = f" (the first {shown} listed above)" if more else " (listed above)"
    return f"{len(checked.errors)} of {total} batch lines refused{listed}; nothing was submitted"


async def _save_batch(
    store: Store, news: list[NewDispatch], err: TextIO
) -> list[Reservation | Exception]:
    """Write the batch chunk by chunk, answering each line (stdout) once its chunk is
    committed, with a progress bar on a terminal."""
    answered: list[Reservation | Exception] = []

    def print_chunk(chunk: list[Reservation | Exception]) -> None:
        for answer in chunk:
            if isinstance(answer, Reservation):
                sys.stdout.write(json.dumps(service.reservation_view(answer).to_json()) + "\n")
            else:
                sys.stdout.write(json.dumps({"error": str(answer)}) + "\n")
        sys.stdout.flush()
        answered.extend(chunk)
        bar.update(len(chunk))

    with watch.progress(len(news), "submitting", err) as bar:
        try:
            await service.submit_batch(store, SystemClock(), news, on_chunk=print_chunk)
        except DispatcherError as exc:
            if answered:  # earlier chunks are committed: say so, they were answered above
                exc.message += f" ({len(answered)} of {len(news)} lines saved and answered)"
            raise
    return answered


async def _wait_batch(
    args: argparse.Namespace, settings: Settings, store: Store, ids: list[int]
) -> int:
    if not ids:
        return EX_OK
    print(
        f"dispatcher: batch: waiting for {len(ids)} dispatches to end "
        "(Ctrl-C stops waiting, not the dispatches)",
        file=sys.stderr,
        flush=True,
    )
    source = _local_source(settings, store, light=True)
    finals = await watch.follow_many(source, ids, patience=args.timeout, err=sys.stderr)
    ended = service.ended_summary(list(finals.values()))
    for line in ended.failures[: service.MAX_BATCH_ERRORS]:
        print(f"dispatcher: {line}", file=sys.stderr)
    print(f"dispatcher: batch: {ended.text()}", file=sys.stderr)
    return EX_OK if ended.all_succeeded else EXIT_NOT_SUCCEEDED


def _read_batch(source: str) -> list[str]:
    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise BadRequest(f"--batch {source}: cannot read: {exc.strerror}") from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadRequest(f"batch line {line}: not UTF-8 text") from None


# -- submit --url -----------------------------------------------------------------------------


def _settings_if_any(explicit: str | None) -> Settings:
    """`submit --url` needs no configuration file; use one when there is one."""
    try:
        find_config(explicit)
    except ConfigError:
        return Settings()
    return load_settings(explicit)


def _submit_remote(args: argparse.Namespace, settings: Settings) -> int:
    """`submit` through a daemon's HTTP API: same output and exit codes as a local one."""
    from dispatcher.client import ApiClient
    from dispatcher.httpauth import read_token

    if args.batch is not None:
        raise BadRequest("--batch works on the local database only; drop --url / api.url")
    token_file = Path(args.token_file) if args.token_file else settings.api.token_file
    token = read_token(token_file) if token_file is not None else None
    client = ApiClient(args.url or settings.api.url or "", token)
    answer = client.submit(_request(args, settings))
    _warn(answer.get("warnings", []))
    if not args.wait:
        _print_reservation(args, answer)
        return EX_OK
    _say_waiting(Reservation(answer["id"], DispatchStatus(answer["status"]), answer["created"]))

    async def show(dispatch_id: int) -> dict[str, Any]:
        return await asyncio.to_thread(client.show, dispatch_id)

    source = watch.Source(show, daemon_live=None, poll=REMOTE_WAIT_POLL)
    data = asyncio.run(
        watch.follow_one(source, answer["id"], patience=args.timeout, err=sys.stderr)
    )
    return _print_final(data, answer["created"], args.json)


# -- reading ---------------------------------------------------------------------------------


async def _show(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.show(store, args.id, settings)
    if args.json:
        _print_json(view.to_json())
        return EX_OK
    print(f"dispatch {view.id}  task {view.task}  status {_status_text(view)}")
    print(f"  params  {json.dumps(view.params)}")
    if view.key:
        print(f"  key     {view.key}")
    if view.not_before and view.status == DispatchStatus.QUEUED:
        label = "due" if view.started_at is None else "retry"
        print(f"  {label:<7} not before {timestamp(view.not_before)}")
    if view.follows is not None and view.status == DispatchStatus.QUEUED:
        print(f"  after   dispatch {view.follows} has ended (its schedule's overlap = queue)")
    if view.series:
        times = "once" if view.series == 1 else f"{view.series} times"
        print(f"  retried {times} (each series of attempts below starts with its marker)")
    if view.error:
        print(f"  error   {view.error}")
    running = {branch.step for branch in view.running or ()}
    for index, step in enumerate(view.plan or ()):
        here = index == view.current_step and not running and view.status != "succeeded"
        mark = "*" if step.name in running or here else " "
        shown = step.to_json()
        needs = f" (needs {', '.join(shown['needs']) or 'nothing'})" if "needs" in shown else ""
        print(
            f"  {mark} step {index}: {step.name} [{step.runner}] {' '.join(shown['args'])}{needs}"
        )
    series = 0
    for attempt in view.attempts or ():
        if attempt.series != series:
            series = attempt.series
            print(f"    -- retry {series}")
        _print_attempt(attempt)
    return EX_OK


def _print_attempt(attempt: AttemptView) -> None:
    code = "" if attempt.exit_code is None else f" exit {attempt.exit_code}"
    error = f": {attempt.error}" if attempt.error else ""
    print(
        f"    {timestamp(attempt.started_at)}  {attempt.step} #{attempt.attempt} "
        f"{attempt.status}{code}{error}"
    )
    if attempt.result is not None:
        result = json.dumps(attempt.result, ensure_ascii=False)
        cut = result if len(result) <= RESULT_CHARS else result[:RESULT_CHARS] + " ..."
        print(f"      result {cut}")
    if attempt.output:
        print(_indent(service.tail_lines(attempt.output, OUTPUT_TAIL_LINES), "      | "))


def _status_text(view: DispatchView, now: datetime | None = None) -> str:
    """`waiting (runner:shell)` for a dispatch that waits for a gate, `due 10:30:00Z`
    for one that waits for its time (`--at`, `--in`), else its status."""
    if view.waiting_for:
        return f"waiting ({view.waiting_for})"
    due = view.not_before
    if now is not None and due and view.status == DispatchStatus.QUEUED and due > now:
        verb = "due" if view.started_at is None else "retry"
        return f"{verb} {_clock_time(due, now)}"
    return str(view.status)


def _clock_time(when: datetime, now: datetime) -> str:
    """A time of today as `10:30:00Z`, any other as `2026-12-01 10:30Z`."""
    if when.date() == now.date():
        return when.strftime("%H:%M:%SZ")
    return when.strftime("%Y-%m-%d %H:%MZ")


async def _list(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    if not 1 <= args.limit <= limits.INT_MAX:
        raise BadRequest(f"--limit must be between 1 and {limits.INT_MAX}")
    status = DispatchStatus(args.status) if args.status else None
    rows = await service.list_dispatches(store, status, args.limit, settings)
    if args.json:
        _print_json(json_list(rows))
        return EX_OK
    if not rows:
        print("no dispatches" + (f" with status {status}" if status else ""), file=sys.stderr)
        return EX_OK
    if status is DispatchStatus.FAILED:
        return _list_failed(rows)
    print(f"{'ID':>8}  {'STATUS':<24} {'TASK':<20} {'CREATED':<27} ERROR")
    now = SystemClock().now()
    for row in rows:
        print(
            f"{row.id:>8}  {_status_text(row, now):<24} {row.task:<20} "
            f"{timestamp(row.created_at):<27} {row.error or ''}"
        )
    return EX_OK


def _list_failed(rows: list[DispatchView]) -> int:
    """`list --status failed`: the dead letters, each with its whole error."""
    print(f"{'ID':>8}  {'TASK':<20} {'FAILED AT':<27} ERROR")
    for row in rows:
        retried = f" (retried {row.series}x)" if row.series else ""
        print(
            f"{row.id:>8}  {row.task:<20} {timestamp(row.finished_at) or '':<27} "
            f"{row.error or '(no error recorded)'}{retried}"
        )
    print(
        "dispatcher: `dispatcher show ID` has each one's output; "
        "`dispatcher retry ID` runs one again from its failed step",
        file=sys.stderr,
    )
    return EX_OK


def _tasks(args: argparse.Namespace, settings: Settings) -> int:
    view = service.tasks(settings)
    if args.json:
        _print_json(view.to_json())
        return EX_OK
    for task in view.tasks:
        about = f"  {task.description}" if task.description else ""
        print(f"{task.name}{about}")
        if not task.params:
            print("    (no params)")
        for param in task.params:
            print(f"    {_param_text(param, task.declared)}")
    return EX_OK


def _param_text(param: Mapping[str, Any], declared: bool) -> str:
    if not declared:
        return f"{param['name']:<16} required (used by a step; not declared)"
    kind = param["type"]
    kind = kind if isinstance(kind, str) else "one of " + ", ".join(json.dumps(v) for v in kind)
    if param["default"] is not None:
        need = f"default {json.dumps(param['default'])}"
    else:
        need = "required" if param["required"] else "optional"
    about = f"  {param['description']}" if param["description"] else ""
    return f"{param['name']:<16} {kind}, {need}{about}"


async def _cancel(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.cancel(store, SystemClock(), args.id)
    if args.json:
        _print_json(view.to_json())
    elif view.status == DispatchStatus.CANCELLED:
        print(f"{view.id} cancelled")
    elif view.cancel_requested:
        print(f"{view.id} {view.status}: cancel requested; the daemon stops it shortly")
    else:
        print(f"{view.id} already {view.status}; nothing to cancel")
    return EX_OK


async def _retry(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.retry(settings, store, SystemClock(), args.id)
    if args.json:
        _print_json(view.to_json())
    else:
        where = f"from step {view.from_step}" if view.from_step else "from its plan"
        print(f"{view.id} queued again {where} (retry {view.series})")
    return EX_OK


async def _schedules(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.schedules_report(settings, store, SystemClock())
    if args.json:
        _print_json(view.to_json())
        return EX_OK
    if not view.schedules:
        print("no schedules configured ([schedules.NAME] in the configuration)", file=sys.stderr)
        return EX_OK
    print(f"{'SCHEDULE':<20} {'WHEN':<32} {'NEXT FIRE':<22} {'LAST FIRE':<22} LAST DISPATCH")
    for item in view.schedules:
        print(_schedule_line(item))
    return EX_OK


def _schedule_line(item: ScheduleView) -> str:
    when = f"every {item.every}" if item.every else str(item.cron)
    if item.cron and item.timezone != "UTC":
        when += f" {item.timezone}"
    last = "-"
    if item.last_outcome == "skipped":
        last = "skipped (overlap)"
    elif item.last_dispatch_id is not None:
        last = f"{item.last_dispatch_id} {item.last_status or '(deleted)'}"
    return (
        f"{item.name:<20} {when:<32} {timestamp(item.next_fire) or 'never':<22} "
        f"{timestamp(item.last_fire) or 'never':<22} {last}"
    )


async def _gates(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.gates_report(settings, store, SystemClock())
    if args.json:
        _print_json(view.to_json())
        return EX_OK
    for gate in view.gates:
        holders = ", ".join(gate.holders[:5]) + (" ..." if len(gate.holders) > 5 else "")
        print(f"{gate.name:<30} {gate.held:>4}/{gate.capacity!s:<4} {holders}")
    rows = view.rows
    print(f"gate rows: {rows.held} held, {rows.released} released ({rows.purgeable} purgeable)")
    return EX_OK


async def _purge(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.purge(settings, store, SystemClock(), dry_run=args.dry_run)
    if args.json:
        _print_json(view.to_json())
        return EX_OK
    gates, dispatches = view.gates, view.dispatches
    gates_before = timestamp(gates.before)
    if view.dry_run:
        print(f"would purge {gates.deleted} gate rows released before {gates_before}")
    else:
        print(
            f"purged {gates.deleted} gate rows released before {gates_before} "
            f"in {gates.batches} batches"
        )
    if dispatches.before is None:
        print("dispatches: kept forever (retention.dispatches = 0)")
    elif view.dry_run:
        print(
            f"would delete {dispatches.dispatches} dispatches finished before "
            f"{timestamp(dispatches.before)} ({dispatches.attempts} attempts)"
        )
    else:
        print(
            f"deleted {dispatches.dispatches} dispatches finished before "
            f"{timestamp(dispatches.before)} ({dispatches.attempts} attempts)"
        )
    return EX_OK


async def _health(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.health(settings, store, SystemClock())
    if args.json:
        _print_json(view.to_json())
    elif view.live:
        inst = view.instances[0]
        print(
            f"ok: instance {inst.id} (pid {inst.pid} on {inst.hostname}) "
            f"heartbeat {timestamp(inst.heartbeat_at)}"
        )
    else:
        print("dispatcher: error: no live daemon heartbeats on this database", file=sys.stderr)
    return EX_OK if view.live else EX_UNAVAILABLE


async def _status(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    view = await service.status(settings, store, SystemClock())
    if args.json:
        _print_json(view.to_json())
        return EX_OK
    for line in _status_lines(view):
        print(line)
    return EX_OK


def _status_lines(view: StatusView) -> list[str]:
    lines = _daemon_lines(view)
    queue = view.queue
    global_gate = next((g for g in view.gates if g.name == GLOBAL), None)
    cap = f" (global {global_gate.held}/{global_gate.capacity})" if global_gate else ""
    finals = ", ".join(f"{queue[str(s)]} {s}" for s in service.FINAL_STATUSES)
    lines.append(
        f"queue     {queue['queued']} queued, {view.in_flight_count} in flight{cap}, {finals}"
    )
    gates = "  ".join(f"{g.name} {g.held}/{g.capacity}" for g in view.gates)
    lines.append(f"gates     {gates}")
    lines += _labelled("in flight", [_in_flight_text(item) for item in view.in_flight])
    lines += _labelled("queued", [_queued_text(item) for item in view.queued[:STATUS_QUEUED]])
    failures = []
    for item in view.recent_failures:
        failures.append(f"{item.id:>6} {item.task:<16} {item.error or ''}")
        if item.output_tail:
            failures += [" " * 24 + "| " + line for line in item.output_tail.splitlines()]
    return lines + _labelled("failures", failures)


def _daemon_lines(view: StatusView) -> list[str]:
    lines = [
        f"daemon    live: instance {inst.id} (pid {inst.pid} on "
        f"{inst.hostname}), heartbeat {timestamp(inst.heartbeat_at)}"
        for inst in view.instances
    ]
    if not view.live:
        lines.append("daemon    NOT RUNNING: no live instance heartbeats on this database")
    if view.stale_instances:
        lines.append(
            "stale     gate places still held by "
            + ", ".join(view.stale_instances)
            + " (not live): released when a daemon starts (or reaps them)"
        )
    return lines


def _labelled(label: str, items: list[str]) -> list[str]:
    return [f"{label if n == 0 else '':<9} {item}" for n, item in enumerate(items)]


def _in_flight_text(item: InFlightView) -> str:
    step = item.step or "(planning)"
    where = f"step {item.step_index + 1}/{item.steps} {step}" if item.steps else step
    if len(item.running) > 1:  # parallel branches
        where = "steps " + ", ".join(f"{b.step} #{b.attempt}" for b in item.running)
    state = f"waiting for {item.waiting_for} at {where}" if item.waiting_for else where
    return f"{item.id:>6} {item.task:<16} {state}  {item.running_s}s"


def _queued_text(item: QueuedView) -> str:
    if item.waiting_for:
        why = f"waiting for {item.waiting_for}"
    elif item.not_before:
        why = f"due at {timestamp(item.not_before)}"
    else:
        why = ""
    return f"{item.id:>6} {item.task:<16} {why}".rstrip()


def _print_json(data: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(data) + "\n")


async def _init(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    where = settings.database.url_redacted or settings.database.path
    print(f"database {where}: ready")
    return EX_OK


async def _check_db(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    started = time.monotonic()
    verdict = await store.check(full=True, budget=None)
    print(f"database {store.database}: {verdict} ({time.monotonic() - started:.1f}s)")
    return EX_OK


Handler = Callable[[argparse.Namespace, Settings, Store], Coroutine[Any, Any, int]]
_HANDLERS: dict[str, tuple[Handler, Access]] = {
    # Only `run` and `init` create a database; reading commands never write at all.
    "submit": (_submit, Access.WRITE),
    "cancel": (_cancel, Access.WRITE),
    "retry": (_retry, Access.WRITE),
    "schedules": (_schedules, Access.READ),
    "purge": (_purge, Access.WRITE),
    "init": (_init, Access.CREATE),
    "show": (_show, Access.READ),
    "list": (_list, Access.READ),
    "gates": (_gates, Access.READ),
    "health": (_health, Access.READ),
    "status": (_status, Access.READ),
    "check-db": (_check_db, Access.READ),
}
STATUS_QUEUED = 5
"""`status` lists this many queued dispatches (newest first) as text; --json has more."""

if __name__ == "__main__":
    sys.exit(main())
