"""Step context and results in the python runner, and the result rules themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.models import AttemptStatus
from dispatcher.runners import PythonRunner, RunRequest, StepContext
from dispatcher.runners.results import (
    MAX_RESULT_BYTES,
    ResultError,
    encode_result,
    read_result_file,
)

MOD = "tests.helpers.callables"
CONTEXT = StepContext(
    dispatch_id=7, task="ci", step="build", attempt=2, key="k-1", token=lambda: "tok"
)


def request(call: str, *args: str, context: StepContext | None = CONTEXT) -> RunRequest:
    return RunRequest(
        dispatch_id=7, step="build", attempt=2, args=args, timeout=5, call=call, context=context
    )


async def test_a_python_step_that_asks_for_context_gets_it_and_returns_its_result() -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:who_am_i", "t"))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.result == (
        '{"tag":"t","dispatch_id":7,"task":"ci","step":"build","attempt":2,'
        '"key":"k-1","token":"tok"}'
    )


async def test_a_python_step_that_does_not_ask_for_context_is_called_as_before() -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:add", "1", "2"))
    assert (outcome.status, outcome.result, outcome.output) == (AttemptStatus.SUCCEEDED, "3", "3")
    nothing = await PythonRunner("py").run(request(f"{MOD}:nothing"))
    assert nothing.result is None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("not_json", "result is not JSON: Object of type set is not JSON serializable"),
        ("huge", f"result is 100002 bytes of JSON, larger than the limit of {MAX_RESULT_BYTES}"),
    ],
)
async def test_a_python_result_that_cannot_be_kept_fails_the_step(call: str, error: str) -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:{call}"))
    assert (outcome.status, outcome.error, outcome.result) == (AttemptStatus.FAILED, error, None)


def test_context_environment_names_every_variable() -> None:
    assert StepContext(1, "t", "s", 3, None, lambda: "x").environment() == {
        "DISPATCHER_DISPATCH_ID": "1",
        "DISPATCHER_TASK": "t",
        "DISPATCHER_STEP": "s",
        "DISPATCHER_ATTEMPT": "3",
        "DISPATCHER_KEY": "",
        "DISPATCHER_STEP_TOKEN": "x",
    }


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, None),
        (b"  \n", None),
        (b'{ "path": "/out/app.tar",\n  "n": 1 }\n', '{"path":"/out/app.tar","n":1}'),
        ('"caf\u00e9"'.encode(), '"caf\u00e9"'),
        (b"null", None),
    ],
)
def test_a_result_file_is_read_as_compact_json(
    tmp_path: Path, content: bytes | None, expected: str | None
) -> None:
    path = tmp_path / "result.json"
    if content is not None:
        path.write_bytes(content)
    assert read_result_file(path) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{oops", "result is not JSON: Expecting property name enclosed in double quotes"),
        (b"1 2", "result is not JSON: Extra data"),
        (b"NaN", "result is not JSON: NaN is not a JSON value"),
        (b"\xff", "result is not JSON: 'utf-8' codec can't decode byte 0xff"),
        (b" " * (MAX_RESULT_BYTES + 1), "result is larger than the limit of 65536 bytes"),
    ],
)
def test_a_bad_result_file_is_one_clear_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(content)
    with pytest.raises(ResultError) as caught:
        read_result_file(path)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_encode_result_keeps_unicode_and_refuses_nan() -> None:
    assert encode_result({"a": "\u2713"}) == '{"a":"\u2713"}'
    with pytest.raises(ResultError, match="Out of range float values are not JSON compliant"):
        encode_result(float("nan"))
