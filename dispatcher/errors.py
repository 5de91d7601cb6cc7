"""Exceptions that reach a user, each with its sysexits exit code."""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 2
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class DispatcherError(Exception):
    """Base of every error meant for a user: one line of text and an exit code."""

    exit_code = EX_SOFTWARE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DispatcherError):
    """The command line contradicts itself (e.g. one param given twice)."""

    exit_code = EX_USAGE


class ConfigError(DispatcherError):
    """The configuration file or an environment override is invalid."""

    exit_code = EX_CONFIG


class BadRequest(DispatcherError):
    """A submission names an unknown task, lacks a param, or carries bad data."""

    exit_code = EX_DATAERR


class KeyConflict(BadRequest):
    """An idempotency key was reused with another task or other params."""

    def __init__(self, key: str, existing_id: int) -> None:
        super().__init__(
            f"idempotency key {key!r} already belongs to dispatch {existing_id} "
            "with a different task or params"
        )
        self.key = key
        self.existing_id = existing_id


class NotFound(DispatcherError):
    """No dispatch has the given id."""

    exit_code = EX_DATAERR


class NotRetryable(DispatcherError):
    """`retry` of a dispatch that is neither failed nor cancelled."""

    exit_code = EX_DATAERR


class NoDatabase(DispatcherError):
    """The configured database does not exist (and this command does not create one)."""

    exit_code = EX_NOINPUT


class PlanError(DispatcherError):
    """A planner produced no usable plan."""

    exit_code = EX_DATAERR


class StoreBusy(DispatcherError):
    """The database stayed locked past the retry budget."""

    exit_code = EX_TEMPFAIL


class StoreError(DispatcherError):
    """The database cannot be opened, read or written."""

    exit_code = EX_CANTCREAT


class StoreUnwritable(StoreError):
    """The database cannot take writes right now: the disk is full, the file or its
    folder is read-only, or an I/O error. The daemon keeps its writes and tries again."""


class SchemaBehind(StoreError):
    """A command that only reads met a database this code has not migrated yet (the
    code was upgraded, the daemon not restarted): it goes away once the daemon starts."""

    exit_code = EX_TEMPFAIL


class DatabaseCorrupt(StoreError):
    """The database file is damaged: never retried; the daemon stops."""


class LeaseLost(DispatcherError):
    """This daemon's lease was taken (another daemon found it silent past the TTL and
    reaped its work): every write about that work is refused from now on."""

    exit_code = EX_TEMPFAIL


class Unavailable(DispatcherError):
    """A service the command needs (a live daemon, the instance lock) is unavailable."""

    exit_code = EX_UNAVAILABLE


class Unauthorized(DispatcherError):
    """A daemon's API refused the bearer token (missing or wrong)."""

    exit_code = EX_NOPERM
