"""Property-based input fuzzing: every input works or is one line with its exit code.

Config files and environment overrides (exit 78), durations, `{param}` templates,
planner plans (exit 65) and submissions (exit 65) get generated inputs; none may
raise anything but the documented error, no message may span lines, and a refused
batch writes nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import string
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import assume, example, given
from hypothesis import strategies as st

from dispatcher import service
from dispatcher.config import Settings, load_settings
from dispatcher.durations import format_duration, parse_duration
from dispatcher.errors import EX_CONFIG, EX_DATAERR, BadRequest, ConfigError, PlanError
from dispatcher.limits import check_json
from dispatcher.models import NewDispatch, Reservation
from dispatcher.planners import validate_plan
from dispatcher.store.sqlite import SQLiteStore
from dispatcher.templating import fill, placeholders
from dispatcher.testing import FakeClock, InMemoryStore
from tests.fuzz.profiles import FUZZ, TIMEOUT

pytestmark = TIMEOUT

# -- generated values --------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
names = st.sampled_from(["hello", "t", "sh", "noop", "py", "x", "", "a b", "ü", "n"]) | st.text(
    max_size=6
)
duration_texts = st.one_of(
    st.text(max_size=12),
    st.builds(
        lambda parts: "".join(f"{n}{u}" for n, u in parts),
        st.lists(
            st.tuples(st.integers(0, 10**6), st.sampled_from(["ms", "s", "m", "h", "d", "x"])),
            max_size=3,
        ),
    ),
)


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "\r" not in message


# -- durations and templates -----------------------------------------------------------


@FUZZ
@given(duration_texts)
@example("1h30m")
@example("0")
@example("1e309s")
def test_any_duration_text_parses_or_is_one_line_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        assert one_line(str(exc))
    else:
        assert seconds >= 0 and math.isfinite(seconds)
        if seconds < 10**9:
            assert math.isclose(parse_duration(format_duration(seconds)), seconds, abs_tol=0.5)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 999), st.sampled_from(["ms", "s", "m", "h", "d"]))))
def test_a_composed_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    assume(parts)
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert math.isclose(parse_duration(text), sum(n * unit[u] for n, u in parts))


@FUZZ
@given(st.text(max_size=30), st.dictionaries(st.text(max_size=5), json_values, max_size=4))
@example("{a.b}", {})
@example("{0}", {})
@example("{a!r}", {"a": 1})
def test_any_template_is_used_or_refused_in_one_line(template: str, params: dict[str, Any]) -> None:
    try:
        used = placeholders(template)
    except ValueError as exc:
        assert one_line(str(exc))
        return
    assert all(name.isidentifier() for name in used)
    if set(used) <= set(params):
        filled = fill(template, params)
        assert isinstance(filled, str)
    else:
        try:
            fill(template, params)
        except KeyError as exc:
            assert exc.args[0] in set(used) - set(params)
        else:
            raise AssertionError("a missing param must be a KeyError")


@FUZZ
@given(
    st.lists(st.text(alphabet=string.ascii_letters + " -/{}", max_size=6), max_size=4),
    st.dictionaries(st.from_regex(r"[a-z]{1,4}", fullmatch=True), st.text(max_size=8), max_size=3),
)
def test_filled_values_reach_argv_literally(literals: list[str], params: dict[str, str]) -> None:
    """A param's value is put in as it is: braces or spaces in it are never re-parsed."""
    names = sorted(params)
    assume(names)
    escaped = [text.replace("{", "{{").replace("}", "}}") for text in literals]
    template = "".join(e + "{" + names[i % len(names)] + "}" for i, e in enumerate(escaped))
    expected = "".join(t + params[names[i % len(names)]] for i, t in enumerate(literals))
    assert fill(template, params) == expected


# -- configuration -----------------------------------------------------------------------

BASE: dict[str, Any] = {
    "database": {"path": "db/d.db", "busy_timeout": "5s"},
    "daemon": {"poll_interval": "1s", "kill_grace": "5s"},
    "gate": {"global": 4},
    "runners": {"sh": {"type": "exec", "concurrency": 2}, "noop": {"type": "noop"}},
    "tasks": {
        "hello": {
            "steps": [{"name": "s", "runner": "sh", "args": ["echo", "{who}"], "timeout": "30s"}]
        }
    },
    "purge": {"gate_retention": "7d", "schedule": "17 3 * * *"},
    "log": {"level": "info", "format": "json"},
}
PATHS = [
    ("database", "busy_timeout"),
    ("database", "path"),
    ("daemon", "poll_interval"),
    ("daemon", "kill_grace"),
    ("daemon", "max_interruptions"),
    ("gate", "global"),
    ("runners", "sh", "type"),
    ("runners", "sh", "concurrency"),
    ("runners", "sh", "env"),
    ("tasks", "hello", "steps"),
    ("tasks", "hello", "planner"),
    ("tasks", "hello", "concurrency_key"),
    ("tasks", "hello", "priority"),
    ("purge", "schedule"),
    ("purge", "batch_size"),
    ("log", "level"),
    ("unknown",),
    ("tasks", "x y"),
]


def toml_value(value: Any) -> str:
    """A TOML literal for a JSON-like value (strings as basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '""'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(data: dict[str, Any]) -> str:
    lines = []
    for section, body in data.items():
        if isinstance(body, dict):
            lines.append(f"[{json.dumps(section)}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
        else:
            lines.insert(0, f"{json.dumps(section)} = {toml_value(body)}")
    return "\n".join(lines) + "\n"


def with_value(data: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(data))
    node = copy
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return copy
    node[path[-1]] = value
    return copy


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    config = tmp_path / "fuzz.toml"
    config.write_text(text, encoding="utf-8", errors="surrogatepass")
    return load_settings(config, environ or {})


def assert_config_error(exc: ConfigError, tmp_path: Path) -> None:
    assert exc.exit_code == EX_CONFIG
    assert one_line(exc.message), exc.message
    assert exc.message.startswith((str(tmp_path / "fuzz.toml"), "environment DISPATCHER_"))


@FUZZ
@given(st.sampled_from(PATHS), json_values | duration_texts)
def test_any_value_anywhere_in_the_config_loads_or_is_one_line(
    tmp_path_factory: Any, path: tuple[str, ...], value: Any
) -> None:
    tmp_path = tmp_path_factory.mktemp("cfg")
    try:
        settings = load_text(tmp_path, toml_document(with_value(BASE, path, value)))
    except ConfigError as exc:
        assert_config_error(exc, tmp_path)
    else:
        assert isinstance(settings, Settings)


@FUZZ
@given(st.text(max_size=200))
@example("[gate]\nglobal = 1e999\n")
@example("[database]\nbusy_timeout = '9999999999999999999999d'\n")
def test_any_text_as_a_config_file_loads_or_is_one_line(tmp_path_factory: Any, text: str) -> None:
    tmp_path = tmp_path_factory.mktemp("cfg")
    try:
        load_text(tmp_path, text)
    except ConfigError as exc:
        assert_config_error(exc, tmp_path)


env_names = st.sampled_from(
    [
        "DISPATCHER_GATE__GLOBAL",
        "DISPATCHER_DATABASE__BUSY_TIMEOUT",
        "DISPATCHER_RUNNERS__SH__CONCURRENCY",
        "DISPATCHER_TASKS__HELLO__STEPS",
        "DISPATCHER_LOG",
        "DISPATCHER_LOG__",
        "DISPATCHER___X",
        "DISPATCHER_GATE__GLOBAL__DEEPER",
        "DISPATCHER_RUNNERS__NEW__TYPE",
        "DISPATCHER_TASKS__HELLO__PRIORITY",
        "DISPATCHER_RUNNERS__SH__ENV",
        "DISPATCHER_DAEMON__KILL_GRACE",
    ]
)
hostile_env_values = st.one_of(
    st.builds(lambda n: "[" * n + "]" * n, st.sampled_from([10, 5000, 100_000])),
    st.builds(lambda n: "9" * n, st.integers(18, 6000)),
    st.sampled_from(["nan", "inf", "-inf", "1e999", '"\\u0000"', "{A = '\\u0000'}"]),
    st.builds(
        lambda value: '[{name="s", runner="sh", kwargs={a=' + value + "}}]",
        st.sampled_from(["nan", "inf", "9" * 30, "[" * 50 + "]" * 50, '"\\udcff"']),
    ),
    st.binary(max_size=6).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
"""What an environment can carry: deep TOML, long numbers, NaN, undecodable bytes."""


@FUZZ
@given(st.dictionaries(env_names, st.text(max_size=20) | hostile_env_values, max_size=3))
@example({"DISPATCHER_GATE__GLOBAL__DEEPER": "1"})
@example({"DISPATCHER_LOG__": "x"})
@example({"DISPATCHER_GATE__GLOBAL": "[" * 100_000 + "]" * 100_000})
@example({"DISPATCHER_TASKS__HELLO__PRIORITY": "9" * 5000})
@example({"DISPATCHER_DATABASE__BUSY_TIMEOUT": "9" * 1000})
@example({"DISPATCHER_TASKS__HELLO__STEPS": '[{name="s", runner="sh", kwargs={a=nan}}]'})
def test_any_environment_override_loads_or_is_one_line(
    tmp_path_factory: Any, environ: dict[str, str]
) -> None:
    tmp_path = tmp_path_factory.mktemp("cfg")
    try:
        settings = load_text(tmp_path, toml_document(BASE), environ)
    except ConfigError as exc:
        assert_config_error(exc, tmp_path)
        assert len(exc.message) < 1000  # a huge value is never echoed whole
    else:
        for task in settings.tasks.values():  # what is loaded can be stored with a plan
            for step in task.configured_steps():
                check_json(step.kwargs)


# -- plans -------------------------------------------------------------------------------

SETTINGS = Settings.model_validate(
    {
        "runners": {"sh": {"type": "exec"}, "py": {"type": "python"}, "noop": {"type": "noop"}},
        "tasks": {
            "hello": {"steps": [{"name": "s", "runner": "sh", "args": ["echo", "{who}"]}]},
            "pair": {
                "steps": [{"name": "a", "runner": "noop"}, {"name": "b", "runner": "noop"}],
                "concurrency": 1,
                "concurrency_key": "{repo}",
            },
        },
    }
)
step_dicts = st.fixed_dictionaries(
    {"name": names, "runner": names},
    optional={
        "args": st.lists(st.text(max_size=5), max_size=3) | json_values,
        "timeout": duration_texts | json_values,
        "retries": st.integers(-3, 200) | json_values,
        "backoff": duration_texts,
        "call": st.sampled_from(["m:f", "a.b:c.d", "bad", ":", "m:"]) | st.text(max_size=5),
        "kwargs": json_values,
        "extra": json_values,
    },
)
plans = (
    json_values
    | st.lists(step_dicts, max_size=4)
    | st.fixed_dictionaries({"steps": st.lists(step_dicts | json_values, max_size=4)})
)


@FUZZ
@given(plans)
@example({"steps": [{"name": "a", "runner": "sh"}, {"name": "a", "runner": "sh"}]})
@example([{"name": "a", "runner": "py"}])
def test_any_plan_validates_or_is_one_line_plan_error(raw: Any) -> None:
    try:
        steps = validate_plan(raw, SETTINGS)
    except PlanError as exc:
        assert exc.exit_code == EX_DATAERR and one_line(exc.message), exc.message
    else:
        assert steps and all(step.runner in SETTINGS.runners for step in steps)
        assert len({step.name for step in steps}) == len(steps)


# -- submissions -------------------------------------------------------------------------

params_values = json_values | st.dictionaries(
    st.sampled_from(["who", "repo", "n"]) | st.text(max_size=4), json_values, max_size=4
)
requests = st.builds(
    service.SubmitRequest,
    task=st.sampled_from(["hello", "pair", "nope"]) | st.text(max_size=4),
    params=params_values,
    key=st.none() | st.text(max_size=6) | st.just("x" * 501),
    priority=st.none() | st.integers(-(2**70), 2**70) | json_values,
)


@FUZZ
@given(requests)
@example(service.SubmitRequest("hello", {"who": "w"}, "\udcff", None))
@example(service.SubmitRequest("hello", {"who": "w"}, None, 2**64))
def test_any_submission_validates_or_is_one_line_bad_request(
    request: service.SubmitRequest,
) -> None:
    try:
        new = service.validate_request(SETTINGS, request)
    except BadRequest as exc:
        assert exc.exit_code == EX_DATAERR and one_line(exc.message), exc.message
        return
    # What validation accepts, the real store must take.
    answer = asyncio.run(_reserve_in_sqlite([new]))[0]
    assert isinstance(answer, Reservation) and answer.created


async def _reserve_in_sqlite(news: list[NewDispatch]) -> list[Reservation | Exception]:
    with tempfile.TemporaryDirectory() as folder:
        store = await SQLiteStore.open(Path(folder) / "fuzz.db")
        try:
            answers = await service.submit_batch(store, FakeClock(), news)
            assert len(await store.list_dispatches(limit=1000)) == sum(
                isinstance(a, Reservation) and a.created for a in answers
            )
            return answers
        finally:
            await store.close()


batch_lines = st.one_of(
    st.text(max_size=30),
    st.builds(json.dumps, json_values),
    st.builds(
        lambda r: json.dumps(
            {"task": r.task, "params": r.params, "key": r.key, "priority": r.priority}
        ),
        requests,
    ),
    st.builds(
        lambda n, key: json.dumps({"task": "hello", "params": {"who": n}, "key": key}),
        st.text(max_size=3),
        st.none() | st.sampled_from(["k1", "k2"]),
    ),
)


@FUZZ
@given(st.lists(batch_lines, max_size=8))
def test_a_batch_is_written_whole_or_refused_writing_nothing(lines: list[str]) -> None:
    store = InMemoryStore()
    clock = FakeClock()
    try:
        news = service.validate_batch(SETTINGS, lines)
    except BadRequest as exc:
        assert one_line(exc.message) and exc.message.startswith("batch line "), exc.message
        assert store.dispatches == {}  # refused before anything was written
        return
    answers = asyncio.run(service.submit_batch(store, clock, news))
    assert len(answers) == len(news)
    created = [a for a in answers if isinstance(a, Reservation) and a.created]
    assert len(store.dispatches) == len(created)
    keys = [d.key for d in store.dispatches.values() if d.key is not None]
    assert len(keys) == len(set(keys))
    assert [type(a) for a in asyncio.run(_reserve_in_sqlite(news))] == [type(a) for a in answers]
