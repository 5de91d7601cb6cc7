"""Settings: TOML plus `DISPATCHER_SECTION__KEY` environment overrides, validated.

Every mistake becomes a `ConfigError` whose message is one line naming the file (or
the environment variable) and the key, e.g.
`config/dispatcher.toml: tasks.build.steps[0].runner: unknown runner 'shel'`.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from dispatcher import limits
from dispatcher.durations import parse_duration
from dispatcher.errors import ConfigError, DispatcherError
from dispatcher.graph import Node
from dispatcher.params import ParamSpec
from dispatcher.templating import placeholders, strings, template_fields, value_placeholders

if TYPE_CHECKING:
    from dispatcher.planners import Planner
    from dispatcher.registry import Registry
    from dispatcher.runners.base import RunnerType

ENV_PREFIX = "DISPATCHER_"
ENV_CONFIG = "DISPATCHER_CONFIG"
DEFAULT_PATHS = (Path("/etc/dispatcher/dispatcher.toml"), Path("config/dispatcher.toml"))
"""Where the CLI looks when neither `--config` nor $DISPATCHER_CONFIG says: the
installed service's file first, so that on a host with the service the CLI reaches the
service's database from any folder (a checkout's example config included); the
checkout's example only where no service is installed."""

Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=100)]
ParamName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=100)]
"""A declared param: a name a `{name}` template can use."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    path: Path = Path("var/dispatcher.db")
    busy_timeout: Duration = 5.0
    busy_patience: Duration = 600.0
    """How long the daemon waits out a busy database before it gives up (exit 75)."""
    url: str | None = None
    """`postgresql://user@host/db`: several daemons share this database (`path` is then
    ignored). Unset: the SQLite file at `path`."""
    pool_size: int = Field(default=10, ge=1, le=1000)
    """PostgreSQL connections per process (with `url`)."""

    @property
    def url_redacted(self) -> str | None:
        """`url` without its password (for messages), or None."""
        return None if self.url is None else redact_url(self.url)

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql://user@host:port/database URL")
        return value


class DaemonSettings(_Section):
    poll_interval: Duration = Field(default=1.0, gt=0)
    shutdown_grace: Duration = 30.0
    kill_grace: Duration = 5.0
    heartbeat_interval: Duration = Field(default=5.0, gt=0)
    instance_ttl: Duration = Field(default=30.0, gt=0)
    max_interruptions: int = Field(default=3, ge=1)
    """A step interrupted this many times (daemon crashes) fails instead of running again."""

    @model_validator(mode="after")
    def _ttl_covers_heartbeats(self) -> DaemonSettings:
        if self.instance_ttl <= self.heartbeat_interval:
            raise ValueError("instance_ttl must be longer than heartbeat_interval")
        return self


class GateSettings(_Section):
    global_: int = Field(default=4, ge=1, alias="global")


def runner_types() -> Registry[RunnerType[Any]]:
    """The registry of runner types (`dispatcher.runners.base.RUNNER_TYPES`)."""
    from dispatcher.runners.base import RUNNER_TYPES  # the runner modules import this one

    return RUNNER_TYPES


def planners() -> Registry[Planner]:
    """The registry of planners (`dispatcher.planners.PLANNERS`)."""
    from dispatcher.planners import PLANNERS  # planners.py imports this module

    return PLANNERS


class RunnerSettings(_Section):
    """`[runners.NAME]`: the keys of every runner type. A type that reads more declares
    a subclass as its settings model (see `dispatcher.runners.base.RunnerType`)."""

    type: str
    concurrency: int | None = Field(default=None, ge=1)

    @field_validator("type")
    @classmethod
    def _type_is_registered(cls, name: str) -> str:
        runner_types().require(name)
        return name


def _runner_by_type(value: Any, handler: ValidatorFunctionWrapHandler) -> RunnerSettings:
    """`[runners.NAME]` validated by the settings model of its `type`."""
    name = value.get("type") if isinstance(value, dict) else None
    kind = runner_types().get(name) if isinstance(name, str) else None
    if kind is None:  # not a table, no type or an unknown one: the base model says so
        validated: RunnerSettings = handler(value)
    else:
        validated = kind.settings.model_validate(value)
    return validated


class StepFields(_Section):
    """The fields of a step, as a planner's plan carries them (args taken literally)."""

    name: Name
    runner: str
    args: list[str] = Field(default_factory=list)
    timeout: Duration = Field(default=3600.0, gt=0)
    retries: int = Field(default=0, ge=0, le=100)
    backoff: Duration = 1.0
    backoff_max: Duration = 300.0
    call: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    needs: list[Name] | None = Field(default=None, max_length=1000)
    """Steps that must succeed first; unset: the step before it."""
    on_failure: Literal["finish_siblings", "cancel_siblings"] = "finish_siblings"

    @field_validator("call")
    @classmethod
    def _call_is_spec(cls, call: str | None) -> str | None:
        if call is not None:
            check_call_spec(call)
        return call

    @field_validator("args")
    @classmethod
    def _args_are_storable(cls, args: list[str]) -> list[str]:
        for index, arg in enumerate(args):
            problem = limits.text_problem(arg)
            if problem is not None:
                raise ValueError(f"[{index}]: {problem}")
        return args

    @field_validator("kwargs")
    @classmethod
    def _kwargs_are_storable(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            limits.check_json(kwargs)
        except limits.Refused as exc:
            raise ValueError(str(exc)) from None
        return kwargs


class StepSettings(StepFields):
    """A step in the config: its args and kwargs are `{param}` templates."""

    @field_validator("args")
    @classmethod
    def _args_are_templates(cls, args: list[str]) -> list[str]:
        for arg in args:
            template_fields(arg)
        return args

    @field_validator("kwargs")
    @classmethod
    def _kwargs_are_templates(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        list(value_placeholders(kwargs))
        return kwargs

    def params_used(self) -> set[str]:
        used = {name for arg in self.args for name in template_fields(arg)[0]}
        return used | set(value_placeholders(self.kwargs))

    @functools.cached_property
    def results_used(self) -> frozenset[str]:
        """Steps whose results its args and kwargs use (worked out once: each plan of
        the task asks)."""
        texts = [*self.args, *strings(self.kwargs)]
        return frozenset(ref.step for text in texts for ref in template_fields(text)[1])

    def node(self) -> Node:
        """The step as the graph check sees it."""
        needs = None if self.needs is None else tuple(self.needs)
        return Node(self.name, needs, self.results_used)


DEFAULT_PLANNER = "steps"


class TaskSettings(_Section):
    """`[tasks.NAME]`: the keys of every task. A planner declares a subclass with the
    keys it reads as its settings model (see `dispatcher.planners.Planner`)."""

    planner: str = DEFAULT_PLANNER
    concurrency: int | None = Field(default=None, ge=1)
    concurrency_key: str | None = None
    priority: int = Field(default=0, ge=-limits.MAX_PRIORITY, le=limits.MAX_PRIORITY)
    description: str = ""
    params: dict[ParamName, ParamSpec] | None = None
    """Declared params (`[tasks.NAME.params.P]`); None: undeclared (any params taken)."""
    key_reuse: Literal["never", "after_failure"] = "never"
    """`after_failure`: a submission with the key of a failed or cancelled dispatch
    (same task and params) starts that dispatch again instead of answering it."""

    @field_validator("planner")
    @classmethod
    def _planner_is_registered(cls, name: str) -> str:
        planners().require(name)
        return name

    @model_validator(mode="after")
    def _task_is_complete(self) -> TaskSettings:
        self.check_planner_keys()
        if self.concurrency_key is not None:
            if not placeholders(self.concurrency_key):
                raise ValueError("concurrency_key must use at least one {param}")
            if self.concurrency is None:
                raise ValueError("concurrency_key needs concurrency (how many per key value)")
        self._templates_use_declared_params()
        return self

    def check_planner_keys(self) -> None:
        """Check what the planner's keys must be together (`ValueError`); each key alone
        is checked by its field."""

    def configured_steps(self) -> Sequence[StepSettings]:
        """The steps written in the config, whose templates use params (the `steps`
        planner plans from them; other planners have none)."""
        return ()

    def _templates_use_declared_params(self) -> None:
        """With declarations, every `{name}` a template uses must be declared, and be
        required or have a default (else the plan could not be made)."""
        if self.params is None:
            return
        declared = ", ".join(sorted(self.params)) or "none"
        for where, names in self._template_uses():
            for name in names:
                spec = self.params.get(name)
                if spec is None:
                    raise ValueError(
                        f"{where} uses {{{name}}}, which is not a declared param "
                        f"(declared: {declared})"
                    )
                if not spec.is_required and spec.default is None:
                    raise ValueError(
                        f"{where} uses {{{name}}}: params.{name} must be required or have a default"
                    )

    def _template_uses(self) -> list[tuple[str, list[str]]]:
        steps = self.configured_steps()
        uses = [(f"step {step.name!r}", sorted(step.params_used())) for step in steps]
        if self.concurrency_key:
            uses.append(("concurrency_key", placeholders(self.concurrency_key)))
        return uses

    def params_used(self) -> set[str]:
        """Params every submission must carry (step args and the concurrency key)."""
        used = {name for step in self.configured_steps() for name in step.params_used()}
        if self.concurrency_key:
            used |= set(placeholders(self.concurrency_key))
        return used


def _task_by_planner(value: Any, handler: ValidatorFunctionWrapHandler) -> TaskSettings:
    """`[tasks.NAME]` validated by the settings model of its `planner`."""
    name = value.get("planner", DEFAULT_PLANNER) if isinstance(value, dict) else None
    planner = planners().get(name) if isinstance(name, str) else None
    if planner is None:  # not a table or an unknown planner: the base model says so
        validated: TaskSettings = handler(value)
        return validated
    return planner.settings.model_validate(value)


class ScheduleSettings(_Section):
    """`[schedules.NAME]`: a task dispatched on a cron or an interval."""

    task: Name
    cron: str | None = None
    """Five crontab fields (minute hour day month weekday), in `timezone`."""
    every: Duration | None = None
    """An interval of whole seconds, aligned to the Unix epoch in UTC ("10m" fires at
    :00, :10, :20 ...)."""
    params: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(default=None, ge=-limits.MAX_PRIORITY, le=limits.MAX_PRIORITY)
    timezone: str | None = None
    """The zone the cron fields are read in (an IANA name); UTC when unset."""
    overlap: Literal["skip", "queue", "allow"] = "skip"
    catch_up: Literal["none", "last", "all"] = "last"
    catch_up_limit: int = Field(default=100, ge=1, le=10_000)
    """With `catch_up = "all"`: the most missed fires made up for after a downtime."""

    @field_validator("timezone")
    @classmethod
    def _zone_is_known(cls, timezone: str | None) -> str | None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if timezone is not None:
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone {timezone!r} (an IANA name such as 'Europe/Berlin')"
                ) from None
        return timezone

    @model_validator(mode="after")
    def _cron_or_every(self) -> ScheduleSettings:
        if (self.cron is None) == (self.every is None):
            raise ValueError('give either cron = "MIN HOUR DAY MONTH WEEKDAY" or every = "10m"')
        if self.every is not None:
            if self.timezone is not None:
                raise ValueError("timezone applies to cron only (every is counted in UTC)")
            if self.every < 1 or self.every != int(self.every):
                raise ValueError("every must be a whole number of seconds, at least 1s")
        if self.cron is not None:
            from dispatcher.schedules import cron_trigger

            try:
                cron_trigger(self.cron, self.timezone or "UTC")
            except ValueError as exc:
                raise ValueError(f"invalid cron {self.cron!r}: {exc}") from None
        return self


class PurgeSettings(_Section):
    gate_retention: Duration = 7 * 86400.0
    schedule: str = "17 3 * * *"
    batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    startup_delay: Duration = 30.0
    """The purge and retention jobs also run once this long after the daemon starts."""

    @field_validator("schedule")
    @classmethod
    def _schedule_is_cron(cls, schedule: str) -> str:
        from dispatcher.schedules import cron_trigger

        try:
            cron_trigger(schedule, "UTC")
        except ValueError as exc:
            raise ValueError(f"invalid cron schedule {schedule!r}: {exc}") from None
        return schedule


class RetentionSettings(_Section):
    dispatches: Duration = 30 * 86400.0
    """Finished dispatches older than this are deleted with their attempts; 0 keeps them."""
    batch_size: int = Field(default=1000, ge=1, le=1_000_000)


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    child_lines: bool = True
    """Log each line a step prints (with dispatch_id and step)."""
    child_lines_per_second: float = Field(default=100.0, gt=0)
    """Flood limit, per attempt: lines a second, on average, beyond the burst."""
    child_lines_burst: int = Field(default=1000, ge=1)
    """Flood limit, per attempt: lines logged at any speed before the rate applies."""
    child_line_max_bytes: int = Field(default=4096, ge=64)
    """A longer line is cut to this many bytes in the log (`truncated: true`)."""


class ApiSettings(_Section):
    """`[api]`: the HTTP API (served when `listen` is set) and where `submit --url` goes."""

    token_file: Path | None = None
    """A file holding the bearer token; required when `listen` is not loopback."""
    listen: str | None = None
    """`HOST:PORT` (`[::1]:8080` for IPv6); port 0 picks a free one (logged)."""
    max_body: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Open connections at most (and at most half the process's descriptor limit); at
    the cap, the longest-idle connection is closed for a new one."""
    idle_timeout: Duration = Field(default=15.0, gt=0)
    """A connection with no request in progress for this long is closed (one that sends
    nothing, one that trickles its request head, an idle keep-alive one)."""
    read_timeout: Duration = Field(default=30.0, gt=0)
    """How long a request's body may take to arrive (then 408)."""
    url: str | None = None
    """Base URL of a daemon's API: `dispatcher submit` then goes there, not to the database."""

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, listen: str | None, info: ValidationInfo) -> str | None:
        if listen is None:
            return None
        host, _ = split_listen(listen)
        # token_file is declared before listen, so it is validated (and known) by now
        if not is_loopback(host) and info.data.get("token_file") is None:
            raise ValueError(
                "not a loopback address: set api.token_file "
                "(a bearer token) to serve the API off loopback"
            )
        return listen

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return url


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` as (host, port); ValueError naming what is wrong."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Only 127.0.0.0/8, ::1 and `localhost` count; any other name or address does not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(_Section):
    """The whole validated configuration."""

    database: DatabaseSettings = DatabaseSettings()
    daemon: DaemonSettings = DaemonSettings()
    gate: GateSettings = GateSettings()
    runners: dict[Name, Annotated[RunnerSettings, WrapValidator(_runner_by_type)]] = Field(
        default_factory=dict
    )
    tasks: dict[Name, Annotated[TaskSettings, WrapValidator(_task_by_planner)]] = Field(
        default_factory=dict
    )
    purge: PurgeSettings = PurgeSettings()
    retention: RetentionSettings = RetentionSettings()
    log: LogSettings = LogSettings()
    api: ApiSettings = ApiSettings()
    schedules: dict[Name, ScheduleSettings] = Field(default_factory=dict)
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _steps_run_on_their_runners(self) -> Settings:
        for task_name, task in self.tasks.items():
            for index, step in enumerate(task.configured_steps()):
                problem = self.step_problem(step)
                if problem is not None:
                    raise ValueError(f"tasks.{task_name}.steps[{index}]{problem}")
        return self

    def step_problem(self, step: StepFields) -> str | None:
        """Why `step` (of the config or of a plan) cannot run on the configured runners,
        as `.KEY: message` or `: message` to append to where the step is; None if it can."""
        runner = self.runners.get(step.runner)
        if runner is None:
            known = ", ".join(sorted(self.runners)) or "none defined"
            return f".runner: unknown runner {step.runner!r} (known: {known})"
        problem = runner_types().require(runner.type).check_step(step)
        return None if problem is None else f": {problem}"

    @model_validator(mode="after")
    def _schedules_make_valid_dispatches(self) -> Settings:
        """A schedule's task exists and its params pass the task's checks, as a
        submission's would: a fire never fails for what the file says."""
        from dispatcher.service import SubmitRequest, validate_request

        for name, spec in self.schedules.items():
            request = SubmitRequest(spec.task, spec.params, f"schedule:{name}:", spec.priority)
            try:
                validate_request(self, request)
            except DispatcherError as exc:
                raise ValueError(f"schedules.{name}: {exc.message}") from None
        return self

    @model_validator(mode="after")
    def _lease_leaves_room_to_renew(self) -> Settings:
        """On a shared database a daemon ends its steps `fence_after(ttl)` seconds after
        its last renewed lease: a heartbeat must fit in that time."""
        from dispatcher.lease import fence_after

        daemon = self.daemon
        if self.database.url is not None and fence_after(daemon.instance_ttl) <= (
            daemon.heartbeat_interval
        ):
            raise ValueError(
                "daemon.instance_ttl: with a shared database a daemon ends its own steps "
                f"{daemon.instance_ttl - fence_after(daemon.instance_ttl):g}s before the TTL; "
                "make instance_ttl longer (or heartbeat_interval shorter) so that a "
                "heartbeat fits before that"
            )
        return self

    @property
    def db_path(self) -> Path:
        return self.database.path


def check_call_spec(spec: str) -> None:
    """`ValueError` unless `spec` reads `package.module:function` (nothing imported)."""
    module, sep, attr = spec.partition(":")
    parts = module.split(".") + attr.split(".")
    if not sep or not all(part.isidentifier() for part in parts):
        raise ValueError(f"invalid callable {spec!r}: use 'package.module:function'")


# -- loading ----------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """A database URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def find_config(explicit: str | Path | None, environ: Mapping[str, str] = os.environ) -> Path:
    """`--config`, then $DISPATCHER_CONFIG, then /etc/dispatcher/dispatcher.toml, then
    ./config/dispatcher.toml (see `DEFAULT_PATHS`)."""
    if explicit:
        return Path(explicit)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    searched = ", ".join(str(path) for path in DEFAULT_PATHS)
    raise ConfigError(f"no configuration file found (looked for {searched}); pass --config")


def load_settings(
    explicit: str | Path | None = None, environ: Mapping[str, str] = os.environ
) -> Settings:
    """Read, override from the environment, validate; `ConfigError` on any mistake."""
    path = find_config(explicit, environ)
    data = _read_toml(path)
    overridden = _apply_env(data, environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, overridden)) from None
    except ValueError as exc:  # raised outside a field, e.g. by a model validator
        raise ConfigError(f"{path}: {exc}") from None
    db_path = settings.database.path
    if not db_path.is_absolute():
        db_path = (path.resolve().parent / db_path).resolve()
    database = settings.database.model_copy(update={"path": db_path})
    api = settings.api
    if api.token_file is not None and not api.token_file.is_absolute():
        api = api.model_copy(update={"token_file": (path.resolve().parent / api.token_file)})
    return settings.model_copy(update={"database": database, "api": api, "source": path})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {_toml_limit(exc)}") from None


def _toml_limit(exc: RecursionError | ValueError) -> str:
    """tomllib's own limits: it recurses into arrays and tables, and `int()` takes at
    most 4300 digits."""
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return "a number too long"


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Apply `DISPATCHER_A__B__C=value` onto data; answer which keys came from where."""
    overridden: dict[tuple[str, ...], str] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        path = tuple(part.lower() for part in var[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            raise ConfigError(f"environment {var}: empty key segment")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"environment {var}: {'.'.join(path)} is not a table")
            node = child
        try:
            node[path[-1]] = _env_value(raw)
        except (RecursionError, ValueError) as exc:
            raise ConfigError(f"environment {var}: invalid TOML: {_toml_limit(exc)}") from None
        overridden[path] = var
    return overridden


def _env_value(raw: str) -> Any:
    """A TOML literal when the value is one (8, true, ["a"]), the raw string otherwise.

    tomllib's `RecursionError` (deep nesting) and `ValueError` (an integer of more than
    4300 digits) go to the caller."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def describe_error(exc: ValidationError) -> tuple[tuple[str, ...], str]:
    """The first problem of a validation error as (location, one-line message)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        value = first.get("input")
        named = isinstance(value, str) and repr(value) in message  # said once is enough
        if isinstance(value, str | int | float | bool) and not named:
            message += f" (got {_shown(value)})"
    key = format_loc(first["loc"])
    located = f"{key}: {message}" if key else message
    more = len(errors) - 1
    if more:
        located += f" (and {more} more problem{'s' if more > 1 else ''})"
    return loc, located


_INT_SHOWN = 10**80


def _shown(value: str | float | bool) -> str:
    """A value in a message: its repr, cut when long (an int's repr is not built past
    4300 digits)."""
    if isinstance(value, int) and not -_INT_SHOWN <= value <= _INT_SHOWN:
        return "a number too large to show"
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _describe(exc: ValidationError, path: Path, overridden: dict[tuple[str, ...], str]) -> str:
    loc, message = describe_error(exc)
    source = str(path)
    for length in range(len(loc), 0, -1):
        if loc[:length] in overridden:
            source = f"environment {overridden[loc[:length]]}"
            break
    return f"{source}: {message}"


def format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out
