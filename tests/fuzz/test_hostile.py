"""Hostile JSON on the CLI, batch and HTTP paths, on SQLite and on PostgreSQL.

Generated JSON text mixes ordinary values with what cannot be stored: nesting far past
the limit, integers past 64 bits (also past Python's 4300 digits), NaN and Infinity,
lone surrogates (escaped, or raw as undecodable argv bytes arrive), U+0000, params
over the size limit. Every input must be taken, or refused in one line with exit 65 /
HTTP 422; never a traceback, a 500 or a store error. What is taken reads back as
strict JSON, equal to what was sent.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from dispatcher import cli
from dispatcher.limits import MAX_DEPTH, MAX_PARAMS_BYTES
from tests.e2e.conftest import Daemon
from tests.e2e.httphelp import api_url, call
from tests.fuzz.profiles import FUZZ_SLOW, TIMEOUT
from tests.helpers import postgres

pytestmark = [pytest.mark.slow, TIMEOUT]

CONFIG = """
[database]
{database}

[daemon]
poll_interval = "200ms"
shutdown_grace = "0s"

[runners.noop]
type = "noop"

[tasks.t]
steps = [{{ name = "s", runner = "noop" }}]

[tasks.k]
concurrency = 1
concurrency_key = "{{lane}}"
steps = [{{ name = "s", runner = "noop", args = ["{{lane}}"] }}]

[api]
listen = "127.0.0.1:0"
"""

# -- hostile JSON text -------------------------------------------------------------------

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
undecodable = st.binary(min_size=1, max_size=4).map(lambda b: b.decode("utf-8", "surrogateescape"))
texts = st.text(max_size=8) | st.lists(
    st.text(max_size=3) | surrogates | undecodable | st.just("\x00"), max_size=4
).map("".join)
"""Text, sometimes with lone surrogates (as JSON escapes them, or raw) or a NUL."""


def string_literal(text: str, escaped: bool) -> str:
    """A JSON string for `text`: surrogates escaped (\\ud800) or left raw in the text."""
    return json.dumps(text, ensure_ascii=escaped)


scalar_texts = st.one_of(
    st.none().map(json.dumps),
    st.booleans().map(json.dumps),
    st.integers(-(2**70), 2**70).map(str),
    st.integers(19, 6000).map(lambda n: "-" * (n % 2) + "9" * n),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1e308", "-0"]),
    st.builds(string_literal, texts, st.booleans()),
    st.integers(MAX_PARAMS_BYTES - 100, MAX_PARAMS_BYTES + 100).map(lambda n: '"' + "x" * n + '"'),
)


def array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def obj(items: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{key}:{value}" for key, value in items) + "}"


keys = st.builds(string_literal, texts, st.booleans())
values = st.recursive(
    scalar_texts,
    lambda children: (
        st.lists(children, max_size=3).map(array)
        | st.lists(st.tuples(keys, children), max_size=3).map(obj)
    ),
    max_leaves=8,
)
deep_values = st.builds(
    lambda levels, inner: "[" * levels + inner + "]" * levels,
    st.sampled_from([MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 200, 20_000]),
    values,
)
param_objects = st.lists(st.tuples(keys, values | deep_values), max_size=4).map(obj)
"""The text of a params object (not always valid JSON: raw surrogates, long literals)."""


def lenient(text: str) -> Any:
    """What Python's own parser makes of accepted text (it must agree with the store)."""
    return json.loads(text)


def strict(text: str | bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


def same(a: Any, b: Any) -> bool:
    """Equal JSON values (floats compared as floats: 1.0 == 1 is fine)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def one_line(message: str) -> bool:
    return bool(message) and message.count("\n") == 1 and message.endswith("\n")


# -- the two stores ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def daemon(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[Daemon]:
    """A running daemon with the HTTP API on each store; its config serves the CLI too."""
    workdir = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    shared = request.param == "postgres"
    with postgres.new_database() if shared else contextlib.nullcontext(None) as url:
        database = f'url = "{url}"' if url else 'path = "state/dispatcher.db"'
        config = workdir / "dispatcher.toml"
        config.write_text(CONFIG.format(database=database))
        started = Daemon(config, workdir)
        try:
            started.start()
            yield started
            assert started.stop() == 0
            assert [e for e in started.events() if e.get("level") in ("error", "critical")] == []
        finally:
            started.close()


def run_cli(daemon: Daemon, *args: str) -> tuple[int, str, str]:
    """`dispatcher` in this process: (exit code, stdout, stderr). An exception escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["--config", str(daemon.config), *args])
    return code, out.getvalue(), err.getvalue()


def shown_params(daemon: Daemon, dispatch_id: int) -> Any:
    code, out, err = run_cli(daemon, "show", str(dispatch_id), "--json")
    assert code == 0, err
    return strict(out)["params"]


# -- the paths ---------------------------------------------------------------------------


@FUZZ_SLOW
@given(param_objects)
@example('{"a": ' + "[" * 60_000 + "]" * 60_000 + "}")
@example('{"a": ' + "9" * 5000 + "}")
@example('{"lane": "\udcff"}')
@example('{"a": NaN, "b": Infinity}')
def test_cli_params_are_taken_or_refused_in_one_line(daemon: Daemon, text: str) -> None:
    code, out, err = run_cli(daemon, "submit", "t", "--params", text, "--json")
    event(f"exit {code}")
    if code == 65:
        assert one_line(err) and err.startswith("dispatcher: error: "), err
        assert err.startswith(("dispatcher: error: --params", "dispatcher: error: params")), err
        return
    assert code == 0, err
    assert same(shown_params(daemon, strict(out)["id"]), lenient(text))


@FUZZ_SLOW
@given(st.lists(st.tuples(texts.map(lambda t: "n" + t.replace("=", "")), texts), max_size=3))
@example([("lane", "\udcff\udcfe")])
def test_cli_param_pairs_are_taken_or_refused_in_one_line(
    daemon: Daemon, pairs: list[tuple[str, str]]
) -> None:
    """`--param NAME=VALUE` as argv gives it, undecodable bytes as surrogates."""
    argv = [arg for name, value in pairs for arg in ("--param", f"{name}={value}")]
    code, out, err = run_cli(daemon, "submit", "k", "--param", "lane=x", *argv, "--json")
    event(f"exit {code}")
    if code == 65 or (code == 2 and "given twice" in err):  # a name twice: a usage error
        assert one_line(err) and err.startswith("dispatcher: error: "), err
        return
    assert code == 0, err
    expected = {"lane": "x", **dict(pairs)}
    assert shown_params(daemon, strict(out)["id"]) == expected


batch_lines = st.one_of(
    st.builds(lambda params: '{"task": "t", "params": ' + params + "}", param_objects),
    st.builds(lambda lane: '{"task": "k", "params": {"lane": ' + lane + "}}", keys),
    st.builds(lambda key: '{"task": "t", "key": ' + key + "}", keys),
    st.builds(lambda priority: '{"task": "t", "priority": ' + priority + "}", scalar_texts),
)


@FUZZ_SLOW
@given(st.lists(batch_lines, min_size=1, max_size=4))
@example(['{"task": "t"}', '{"task": "t", "params": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"])
def test_batch_lines_are_taken_or_refused_by_line_number(
    daemon: Daemon, tmp_path_factory: Any, lines: list[str]
) -> None:
    batch = tmp_path_factory.mktemp("batch") / "lines.jsonl"
    batch.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    code, out, err = run_cli(daemon, "submit", "--batch", str(batch))
    event(f"exit {code}")
    if code == 65:  # one line for each bad line, then one that counts them
        lines_of_err = err.splitlines()
        assert err.endswith("\n") and lines_of_err, err
        bad, last = lines_of_err[:-1] or lines_of_err, lines_of_err[-1]
        assert all(line.startswith("dispatcher: error: batch line ") for line in bad), err
        assert len(lines_of_err) == 1 or "nothing was submitted" in last, err
        assert out == ""  # refused whole: nothing written, nothing answered
        return
    assert code == 0, err
    answers = [strict(line) for line in out.splitlines()]
    assert len(answers) == len(lines)
    for line, answer in zip(lines, answers, strict=True):
        submitted = lenient(line).get("params", {})
        assert same(shown_params(daemon, answer["id"]), submitted)


@FUZZ_SLOW
@given(
    st.one_of(
        st.builds(lambda params: '{"task": "t", "params": ' + params + "}", param_objects),
        st.builds(lambda lane: '{"task": "k", "params": {"lane": ' + lane + "}}", keys),
        st.builds(lambda key: '{"task": "t", "key": ' + key + "}", keys),
        st.builds(lambda p: '{"task": "t", "priority": ' + p + "}", scalar_texts),
        values,
    )
)
@example('{"task": "t", "params": {"a": ' + "[" * 200_000 + "]" * 200_000 + "}}")
@example('{"task": "k", "params": {"lane": "\\ud800"}}')
def test_http_bodies_are_taken_or_422_never_500(daemon: Daemon, body: str) -> None:
    url = api_url(daemon)
    answer = call("POST", f"{url}/v1/dispatches", raw=body.encode("utf-8", "surrogatepass"))
    event(f"HTTP {answer.status}")
    assert answer.status in (200, 201, 409, 422), (answer.status, answer.body[-300:])
    if answer.status >= 400:
        message = strict(answer.body)["error"]["message"]
        assert message and "\n" not in message
        return
    dispatch = strict(call("GET", f"{url}/v1/dispatches/{strict(answer.body)['id']}").body)
    assert same(dispatch["params"], lenient(body).get("params", {}))
