"""Hostile input on every path, on both stores: one line and exit 65, or HTTP 422.

Nothing may give a traceback, a 500 or a store error (on PostgreSQL, NaN used to exit
73 with a two-line error), and nothing refused may be written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from dispatcher.limits import MAX_DEPTH, MAX_PARAMS_BYTES
from tests.helpers import postgres

from .conftest import ROOT, Daemon, _env
from .httphelp import api_url, call

pytestmark = pytest.mark.slow

CONFIG = """
[database]
{database}

[daemon]
poll_interval = "200ms"
shutdown_grace = "0s"

[runners.noop]
type = "noop"

[runners.sh]
type = "exec"

[tasks.prints]
steps = [{{ name = "p", runner = "sh", args = ["printf", 'a\\000b\\377c'] }}]

[tasks.t]
steps = [{{ name = "s", runner = "noop" }}]

[tasks.k]
concurrency = 1
concurrency_key = "{{lane}}"
steps = [{{ name = "s", runner = "noop", args = ["{{lane}}"] }}]

[api]
listen = "127.0.0.1:0"
"""


def nested(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def daemon(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[Daemon]:
    """A daemon with the HTTP API, on each store, shared by this module's tests."""
    workdir = tmp_path_factory.mktemp(request.param)
    shared = request.param == "postgres"
    with postgres.new_database() if shared else nullcontext(None) as url:
        database = f'url = "{url}"' if url else 'path = "state/dispatcher.db"'
        config = workdir / "dispatcher.toml"
        config.write_text(CONFIG.format(database=database))
        started = Daemon(config, workdir)
        try:
            started.start()
            yield started
            assert started.stop() == 0
            crashes = [e for e in started.events() if e.get("level") in ("error", "critical")]
            assert crashes == []  # e.g. api_request_failed, dispatch_crashed
        finally:
            started.close()


def cli(daemon: Daemon, *args: str | bytes, stdin: bytes | None = None) -> Any:
    """The CLI with argv as given (bytes reach it as they are, like a shell's)."""
    argv: list[str | bytes] = [sys.executable, "-m", "dispatcher", "--config", str(daemon.config)]
    return subprocess.run(
        [*argv, *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=daemon.workdir,
        env={**_env(), "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"},
    )


def refused_in_one_line(result: Any, fragment: str) -> None:
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 65, (result.returncode, stderr[-2000:])
    assert stderr.startswith("dispatcher: error: "), stderr[-2000:]
    assert stderr.count("\n") == 1, stderr[-2000:]
    assert fragment in stderr, stderr
    assert result.stdout == b""


DEEP = '{"a": ' + nested(60_000) + "}"
ENCODER_DEEP = '{"a": ' + nested(980) + "}"  # once a RecursionError while encoding
HUGE_INT = '{"a": ' + "9" * 5000 + "}"
TOO_BIG = json.dumps({"a": "x" * MAX_PARAMS_BYTES})

CLI_CASES = [
    (["t", "--params", DEEP], "--params /a" + "/0" * (MAX_DEPTH - 1) + ": nested deeper than 32"),
    (["t", "--params", ENCODER_DEEP], "--params /a/0/0/"),
    (["t", "--params", HUGE_INT], "--params /a: integer outside 64 bits"),
    (["t", "--params", '{"a": 18446744073709551616}'], "--params /a: integer outside 64 bits"),
    (["t", "--params", '{"a": [NaN]}'], "--params /a/0: NaN and Infinity are not JSON numbers"),
    (["t", "--params", '{"a": -Infinity}'], "--params /a: NaN and Infinity"),
    (["t", "--params", '{"a": 1e999}'], "--params /a: NaN and Infinity"),
    (["k", "--params", '{"lane": "\\ud800"}'], "--params /lane: text is not valid UTF-8"),
    (["k", "--params", b'{"lane": "\xff"}'], "--params /lane: text is not valid UTF-8"),
    (["k", "--param", b"lane=\xff\xfe"], "--param 'lane': text is not valid UTF-8"),
    (["k", "--param", "lane=a", "--key", b"k\xff"], "key: text is not valid UTF-8"),
    (["t", "--params", '{"a": "\\u0000"}'], "--params /a: text contains U+0000"),
    (["t", "--params", TOO_BIG], f"params: {MAX_PARAMS_BYTES + 8} bytes of JSON; the limit"),
]


@pytest.mark.parametrize(("args", "fragment"), CLI_CASES, ids=range(len(CLI_CASES)))
def test_hostile_params_on_the_command_line_are_one_line_and_exit_65(
    daemon: Daemon, args: list[str | bytes], fragment: str
) -> None:
    refused_in_one_line(cli(daemon, "submit", *args), fragment)


def test_hostile_batch_lines_are_refused_by_number_and_nothing_is_written(
    daemon: Daemon, tmp_path: Path
) -> None:
    good = json.dumps({"task": "t", "params": {"n": 1}}).encode()
    for bad, fragment in [
        (b'{"task": "t", "params": {"a": ' + nested(100_000).encode() + b"}}", "/params/a/0/0"),
        (b'{"task": "t", "params": {"a": ' + ENCODER_DEEP.encode() + b"}}", "/params/a/a/0"),
        (b'{"task": "t", "params": {"a": ' + b"1" * 5000 + b"}}", "/params/a: integer"),
        (b'{"task": "t", "params": {"a": NaN}}', "/params/a: NaN"),
        (b'{"task": "k", "params": {"lane": "\\udcff"}}', "/params/lane: text is not"),
        (b'{"task": "k", "params": {"lane": "\xff"}}', ": not UTF-8 text"),
    ]:
        data = b"\n".join([good, good, bad, good]) + b"\n"
        batch = tmp_path / "batch.jsonl"
        batch.write_bytes(data)
        refused_in_one_line(cli(daemon, "submit", "--batch", str(batch)), "batch line 3")
        refused_in_one_line(cli(daemon, "submit", "--batch", "-", stdin=data), "batch line 3")
        refused_in_one_line(cli(daemon, "submit", "--batch", "-", stdin=data), fragment)


@pytest.mark.parametrize("dispatch_id", ["99999999999999999999", "-99999999999999999999", "0"])
def test_ids_outside_64_bits_are_unknown_ids(daemon: Daemon, dispatch_id: str) -> None:
    for command in ("show", "cancel"):
        refused_in_one_line(cli(daemon, command, dispatch_id), "no dispatch with id")
        answer = call("GET", f"{api_url(daemon)}/v1/dispatches/{dispatch_id.lstrip('-')}")
        assert answer.status == 404


HTTP_CASES = [
    ('{"task": "t", "params": {"a": ' + nested(60_000) + "}}", "body /params/a/0/0/"),
    ('{"task": "t", "params": ' + ENCODER_DEEP + "}", "body /params/a/0/"),
    ('{"task": "t", "params": ' + HUGE_INT + "}", "body /params/a: integer outside 64 bits"),
    ('{"task": "t", "params": {"a": NaN}}', "body /params/a: NaN and Infinity"),
    ('{"task": "t", "params": {"a": Infinity}}', "body /params/a: NaN and Infinity"),
    ('{"task": "k", "params": {"lane": "\\ud800"}}', "body /params/lane: text is not valid"),
    ('{"task": "k", "params": {"lane": "\\u0000"}}', "body /params/lane: text contains U+0000"),
    ('{"task": "k", "params": {"lane": "a"}, "key": "\\udfff"}', "body /key: text is not"),
    ('{"task": "t", "params": ' + TOO_BIG + "}", "params: 65544 bytes of JSON"),
    ('{"task": "t", "priority": 9223372036854775808}', "body /priority: integer outside"),
    (nested(200_000), "body /0/0/0/"),
]


@pytest.mark.parametrize(("body", "fragment"), HTTP_CASES, ids=range(len(HTTP_CASES)))
def test_hostile_http_bodies_are_422_naming_the_place(
    daemon: Daemon, body: str, fragment: str
) -> None:
    url = api_url(daemon)
    answer = call("POST", f"{url}/v1/dispatches", raw=body.encode("utf-8", "surrogatepass"))
    assert answer.status == 422, answer.body[-500:]
    error = answer.json()["error"]
    assert error["code"] == "bad_request"
    assert error["message"].startswith(fragment), error["message"]
    assert "\n" not in error["message"]


def test_invalid_utf8_in_a_body_is_422(daemon: Daemon) -> None:
    answer = call(
        "POST", f"{api_url(daemon)}/v1/dispatches", raw=b'{"task": "k", "params": {"lane": "\xff"}}'
    )
    assert answer.status == 422
    assert answer.json()["error"]["message"] == "body: not UTF-8 text"


ACCEPTED_LANE = "édge \U0001f600"


def test_what_is_accepted_reads_back_as_strict_json(daemon: Daemon) -> None:
    """At the limits, everything is taken, stored and shown as it came (no NaN, no loss)."""
    params = {
        "lane": ACCEPTED_LANE,
        "deep": json.loads(nested(MAX_DEPTH - 1)),
        "ints": [2**63 - 1, -(2**63)],
        "float": 1.5e308,
    }
    result = cli(daemon, "submit", "k", "--params", json.dumps(params), "--json")
    assert result.returncode == 0, result.stderr
    dispatch_id = json.loads(result.stdout)["id"]
    shown = cli(daemon, "show", str(dispatch_id), "--json")
    assert json.loads(shown.stdout, parse_constant=_no_constant)["params"] == params
    answer = call("GET", f"{api_url(daemon)}/v1/dispatches/{dispatch_id}")
    assert json.loads(answer.body, parse_constant=_no_constant)["params"] == params


def _no_constant(name: str) -> Any:
    raise AssertionError(f"{name} in JSON output")


def test_what_a_step_prints_is_recorded_even_a_nul_byte(daemon: Daemon) -> None:
    """PostgreSQL text cannot hold U+0000: it used to fail the attempt's final write."""
    result = cli(daemon, "submit", "prints", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["status"] == "succeeded"
    assert shown["attempts"][0]["output"] == "a\ufffdb\ufffdc"


def test_the_daemon_survived_every_hostile_input_and_nothing_refused_was_written(
    daemon: Daemon,
) -> None:
    """Last in this module: only the one dispatch accepted above exists; the daemon
    still answers and still runs work."""
    result = cli(daemon, "list", "--json", "--limit", "1000")
    written = [d for d in json.loads(result.stdout) if d["task"] != "prints"]
    assert [d["params"]["lane"] for d in written] in ([], [ACCEPTED_LANE])
    assert call("GET", f"{api_url(daemon)}/healthz").status == 200
    result = cli(daemon, "submit", "k", "--param", "lane=after", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded"
