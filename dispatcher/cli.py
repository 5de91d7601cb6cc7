"""Command line: parse, call a service function, print. No logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO

import structlog

from dispatcher import __version__, limits, purge, service
from dispatcher.clock import SystemClock
from dispatcher.config import Settings, find_config, load_settings
from dispatcher.errors import (
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
    BadRequest,
    ConfigError,
    DispatcherError,
)
from dispatcher.models import DispatchStatus, Reservation
from dispatcher.store.base import Store

EXIT_NOT_SUCCEEDED = 1
WAIT_POLL = 0.1
REMOTE_WAIT_POLL = 0.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher", description=__doc__)
    parser.add_argument(
        "--config",
        help="configuration file (default: $DISPATCHER_CONFIG, "
        "./config/dispatcher.toml, /etc/dispatcher/dispatcher.toml)",
    )
    parser.add_argument("--version", action="version", version=f"dispatcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon in the foreground")
    _add_submit(sub)
    show = sub.add_parser("show", help="one dispatch: status, params, plan, attempts")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    lst = sub.add_parser("list", help="recent dispatches, newest first")
    lst.add_argument("--status", choices=[str(s) for s in DispatchStatus])
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true")
    cancel = sub.add_parser("cancel", help="cancel a dispatch")
    cancel.add_argument("id", type=int)
    cancel.add_argument("--json", action="store_true")
    gates = sub.add_parser("gates", help="every gate: capacity, held, holders; row counts")
    gates.add_argument("--json", action="store_true")
    purge = sub.add_parser("purge", help="run the purge and retention jobs once, now")
    purge.add_argument(
        "--dry-run", action="store_true", help="report what would go; delete nothing"
    )
    purge.add_argument("--json", action="store_true")
    sub.add_parser("check-config", help="validate the configuration and exit")
    health = sub.add_parser("health", help="exit 0 when a live daemon heartbeats here")
    health.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="the whole picture: daemon, queue, gates, in flight")
    status.add_argument("--json", action="store_true")
    return parser


def _add_submit(sub: Any) -> None:
    submit = sub.add_parser("submit", help="submit a dispatch (or --batch FILE)")
    submit.add_argument("task", nargs="?")
    submit.add_argument("--param", action="append", default=[], metavar="K=V")
    submit.add_argument("--params", metavar="JSON", help="params as a JSON object")
    submit.add_argument("--key", help="idempotency key")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--wait", action="store_true", help="wait for a final status")
    submit.add_argument("--json", action="store_true")
    submit.add_argument("--batch", metavar="FILE", help="JSON lines to submit ('-' for stdin)")
    submit.add_argument(
        "--url", help="submit through this daemon's HTTP API (default: api.url, if set)"
    )
    submit.add_argument("--token-file", help="bearer token for --url (default: api.token_file)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dispatcher` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except DispatcherError as exc:
        print(f"dispatcher: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        settings = load_settings(args.config)
        print(
            f"{find_config(args.config)}: ok ({len(settings.tasks)} tasks, "
            f"{len(settings.runners)} runners, database {settings.database.path})"
        )
        return EX_OK
    if args.command == "submit" and args.url:
        return _submit_remote(args, _settings_if_any(args.config))
    settings = load_settings(args.config)
    if args.command == "submit" and settings.api.url:
        return _submit_remote(args, settings)
    if args.command == "run":
        return _run(args, settings)
    handler = _HANDLERS[args.command]
    return asyncio.run(_with_store(settings, lambda store: handler(args, settings, store)))


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher import logs
    from dispatcher.daemon import run_daemon

    logs.configure(settings.log.level, settings.log.format)
    config_path = find_config(args.config)
    try:
        asyncio.run(run_daemon(settings, reload=lambda: load_settings(config_path)))
    except DispatcherError:
        raise
    except Exception:  # a defect: say so in the log stream, as one structured event
        structlog.get_logger("dispatcher.daemon").exception("daemon_crashed")
        return EX_SOFTWARE
    return EX_OK


async def _with_store(settings: Settings, work: Callable[[Store], Awaitable[int]]) -> int:
    from dispatcher.store import open_store

    store = await open_store(settings)
    try:
        return await work(store)
    finally:
        await store.close()


# -- commands ---------------------------------------------------------------------------


async def _submit(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    clock = SystemClock()
    if args.batch is not None:
        return await _submit_batch(args, settings, store)
    if not args.task:
        raise BadRequest("submit needs a TASK (or --batch FILE)")
    request = service.SubmitRequest(args.task, _params(args), args.key, args.priority)
    reservation = await service.submit(settings, store, clock, request)
    if args.wait:
        return await _wait(store, reservation, args.json)
    if args.json:
        _print_json(service.reservation_json(reservation))
    else:
        how = "created" if reservation.created else f"existing dispatch for key {args.key!r}"
        print(f"{reservation.id} {reservation.status} ({how})")
    return EX_OK


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params is not None:
        try:
            loaded = limits.load_json(args.params)
        except ValueError as exc:
            raise limits.refuse_as(BadRequest, "--params", exc) from None
        if not isinstance(loaded, dict):
            raise BadRequest(f"--params: expected a JSON object, got {type(loaded).__name__}")
        params.update(loaded)
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BadRequest(f"--param {item!r}: expected NAME=VALUE")
        problem = limits.text_problem(item)  # e.g. bytes of argv that are not UTF-8
        if problem is not None:
            raise BadRequest(f"--param {name!r}: {problem}")
        params[name] = value
    return params


async def _submit_batch(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    lines = _read_batch(args.batch)
    news = service.validate_batch(settings, lines)
    answered: list[Reservation | Exception] = []

    def print_chunk(chunk: list[Reservation | Exception]) -> None:
        for answer in chunk:
            if isinstance(answer, Reservation):
                sys.stdout.write(json.dumps(service.reservation_json(answer)) + "\n")
            else:
                sys.stdout.write(json.dumps({"error": str(answer)}) + "\n")
        sys.stdout.flush()
        answered.extend(chunk)

    try:
        answers = await service.submit_batch(store, SystemClock(), news, on_chunk=print_chunk)
    except DispatcherError as exc:
        if answered:  # earlier chunks are committed: say so, they were answered above
            exc.message += f" ({len(answered)} of {len(news)} lines saved and answered)"
        raise
    failed = sum(not isinstance(answer, Reservation) for answer in answers)
    if failed:
        print(f"dispatcher: error: {failed} of {len(answers)} batch lines refused", file=sys.stderr)
        return BadRequest.exit_code
    return EX_OK


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


async def _wait(store: Store, reservation: Reservation, as_json: bool) -> int:
    while True:
        data = await service.show(store, reservation.id)
        if DispatchStatus(data["status"]).is_final:
            break
        await asyncio.sleep(WAIT_POLL)
    return _print_final(data, reservation.created, as_json)


def _print_final(data: dict[str, Any], created: bool, as_json: bool) -> int:
    if as_json:
        _print_json({**data, "created": created})
    else:
        error = f": {data['error']}" if data["error"] else ""
        print(f"{data['id']} {data['status']}{error}")
    return EX_OK if data["status"] == DispatchStatus.SUCCEEDED else EXIT_NOT_SUCCEEDED


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
    if not args.task:
        raise BadRequest("submit needs a TASK")
    token_file = Path(args.token_file) if args.token_file else settings.api.token_file
    token = read_token(token_file) if token_file is not None else None
    client = ApiClient(args.url or settings.api.url or "", token)
    request = service.SubmitRequest(args.task, _params(args), args.key, args.priority)
    answer = client.submit(request)
    if args.wait:
        data = client.show(answer["id"])
        while not DispatchStatus(data["status"]).is_final:
            time.sleep(REMOTE_WAIT_POLL)
            data = client.show(answer["id"])
        return _print_final(data, answer["created"], args.json)
    if args.json:
        _print_json(answer)
    else:
        how = "created" if answer["created"] else f"existing dispatch for key {args.key!r}"
        print(f"{answer['id']} {answer['status']} ({how})")
    return EX_OK


async def _show(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    data = await service.show(store, args.id)
    if args.json:
        _print_json(data)
        return EX_OK
    print(f"dispatch {data['id']}  task {data['task']}  status {data['status']}")
    print(f"  params  {json.dumps(data['params'])}")
    if data["key"]:
        print(f"  key     {data['key']}")
    if data["error"]:
        print(f"  error   {data['error']}")
    for index, step in enumerate(data["plan"] or []):
        mark = "*" if index == data["current_step"] else " "
        print(f"  {mark} step {index}: {step['name']} [{step['runner']}] {' '.join(step['args'])}")
    for attempt in data["attempts"]:
        code = "" if attempt["exit_code"] is None else f" exit {attempt['exit_code']}"
        print(
            f"    {attempt['started_at']}  {attempt['step']} #{attempt['attempt']} "
            f"{attempt['status']}{code}"
        )
    return EX_OK


async def _list(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    if not 1 <= args.limit <= limits.INT_MAX:
        raise BadRequest(f"--limit must be between 1 and {limits.INT_MAX}")
    status = DispatchStatus(args.status) if args.status else None
    rows = await service.list_dispatches(store, status, args.limit)
    if args.json:
        _print_json(rows)
        return EX_OK
    for row in rows:
        print(
            f"{row['id']:>8}  {row['status']:<10} {row['task']:<20} {row['created_at']}  "
            f"{row['error'] or ''}"
        )
    return EX_OK


async def _cancel(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    data = await service.cancel(store, SystemClock(), args.id)
    if args.json:
        _print_json(data)
    elif data["status"] == DispatchStatus.CANCELLED:
        print(f"{data['id']} cancelled")
    elif data["cancel_requested"]:
        print(f"{data['id']} {data['status']}: cancel requested; the daemon stops it shortly")
    else:
        print(f"{data['id']} already {data['status']}; nothing to cancel")
    return EX_OK


async def _gates(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    data = await service.gates_report(settings, store, SystemClock())
    if args.json:
        _print_json(data)
        return EX_OK
    for gate in data["gates"]:
        holders = ", ".join(gate["holders"][:5]) + (" ..." if len(gate["holders"]) > 5 else "")
        print(f"{gate['name']:<30} {gate['held']:>4}/{gate['capacity']:<4} {holders}")
    rows = data["rows"]
    print(
        f"gate rows: {rows['held']} held, {rows['released']} released "
        f"({rows['purgeable']} purgeable)"
    )
    return EX_OK


async def _purge(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    data = await purge.purge_now(settings, store, SystemClock(), dry_run=args.dry_run)
    if args.json:
        _print_json(data)
        return EX_OK
    gates, dispatches = data["gates"], data["dispatches"]
    if args.dry_run:
        print(f"would purge {gates['purgeable']} gate rows released before {gates['before']}")
    else:
        print(
            f"purged {gates['deleted']} gate rows released before {gates['before']} "
            f"in {gates['batches']} batches"
        )
    if dispatches["before"] is None:
        print("dispatches: kept forever (retention.dispatches = 0)")
    elif args.dry_run:
        print(
            f"would delete {dispatches['expired']} dispatches finished before "
            f"{dispatches['before']} ({dispatches['attempts']} attempts)"
        )
    else:
        print(
            f"deleted {dispatches['deleted']} dispatches finished before "
            f"{dispatches['before']} ({dispatches['attempts_deleted']} attempts)"
        )
    return EX_OK


async def _health(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    data = await service.health(settings, store, SystemClock())
    if args.json:
        _print_json(data)
    elif data["live"]:
        inst = data["instances"][0]
        print(
            f"ok: instance {inst['id']} (pid {inst['pid']} on {inst['hostname']}) "
            f"heartbeat {inst['heartbeat_at']}"
        )
    else:
        print("dispatcher: error: no live daemon heartbeats on this database", file=sys.stderr)
    return EX_OK if data["live"] else EX_UNAVAILABLE


async def _status(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    data = await service.status(settings, store, SystemClock())
    if args.json:
        _print_json(data)
        return EX_OK
    for line in _status_lines(data):
        print(line)
    return EX_OK


def _status_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    if data["live"]:
        for inst in data["instances"]:
            lines.append(
                f"daemon    live: instance {inst['id']} (pid {inst['pid']} on "
                f"{inst['hostname']}), heartbeat {inst['heartbeat_at']}"
            )
    else:
        lines.append("daemon    NOT RUNNING: no live instance heartbeats on this database")
    queue = data["queue"]
    lines.append("queue     " + ", ".join(f"{queue[name]} {name}" for name in queue))
    gates = "  ".join(f"{g['name']} {g['held']}/{g['capacity']}" for g in data["gates"])
    lines.append(f"gates     {gates}")
    label = "in flight"
    for item in data["in_flight"]:
        step = item["step"] or "(planning)"
        where = f"step {item['step_index'] + 1}/{item['steps']} {step}" if item["steps"] else step
        lines.append(f"{label:<9} {item['id']:>6} {item['task']:<16} {where}  {item['running_s']}s")
        label = ""
    label = "failures"
    for item in data["recent_failures"]:
        lines.append(f"{label:<9} {item['id']:>6} {item['task']:<16} {item['error'] or ''}")
        label = ""
    return lines


def _print_json(data: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(data) + "\n")


Handler = Callable[[argparse.Namespace, Settings, Store], Coroutine[Any, Any, int]]
_HANDLERS: dict[str, Handler] = {
    "submit": _submit,
    "show": _show,
    "list": _list,
    "cancel": _cancel,
    "gates": _gates,
    "purge": _purge,
    "health": _health,
    "status": _status,
}

if __name__ == "__main__":
    sys.exit(main())
