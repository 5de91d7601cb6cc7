"""The python and noop runners."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from dispatcher.models import AttemptStatus
from dispatcher.runners import NoopRunner, PythonRunner, RunRequest, resolve_callable
from tests.helpers import callables

MOD = "tests.helpers.callables"


def request(call: str | None, *args: str, timeout: float = 5.0, **kwargs: Any) -> RunRequest:
    return RunRequest(
        dispatch_id=1, step="s", attempt=1, args=args, timeout=timeout, call=call, kwargs=kwargs
    )


@pytest.fixture
def release_threads() -> Iterator[None]:
    callables.release.clear()
    yield
    callables.release.set()  # lets an abandoned worker thread finish


async def test_sync_callable_with_args_and_kwargs() -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:add", "2", "3", scale=10))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.output == "50"
    assert outcome.error is None


async def test_args_and_kwargs_arrive_as_given() -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:echo", "a", "b", y=2, x="1"))
    assert outcome.output == "args=['a', 'b'] kwargs={'x': '1', 'y': 2}"


async def test_async_callable_is_awaited() -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:async_add", "1", "1", scale=3))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.output == "6"


@pytest.mark.parametrize(
    ("call", "args", "expected"),
    [
        ("Tools.double", ("21",), "42"),
        ("Tools.name", (), "Tools"),
        ("async_instance", ("x",), "called x"),
    ],
)
async def test_methods_and_callable_instances(
    call: str, args: tuple[str, ...], expected: str
) -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:{call}", *args))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.output == expected


async def test_none_result_has_no_output() -> None:
    outcome = await PythonRunner("py").run(request(f"{MOD}:nothing"))
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.output is None


async def test_long_result_is_truncated() -> None:
    outcome = await PythonRunner("py", output_limit=100).run(request(f"{MOD}:huge"))
    assert outcome.output is not None
    assert outcome.output.startswith("x" * 100)
    assert outcome.output.endswith("[99900 more chars]")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("fail", "ValueError: bad input"),
        ("async_fail", "KeyError: 'missing'"),
        ("multiline_fail", "RuntimeError: first line"),
        ("exits", "SystemExit: 3"),
    ],
)
async def test_exception_is_a_one_line_failure(call: str, error: str) -> None:
    args = ("bad input",) if call == "fail" else ()
    outcome = await PythonRunner("py").run(request(f"{MOD}:{call}", *args))
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.error == error
    assert outcome.output is not None
    assert "Traceback" in outcome.output


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            "nosuch.module:f",
            "cannot import 'nosuch.module:f': No module named 'nosuch'",
        ),
        (
            f"{MOD}:missing",
            f"cannot import '{MOD}:missing': {MOD} has no attribute 'missing'",
        ),
        (
            f"{MOD}:Tools.missing",
            f"cannot import '{MOD}:Tools.missing': {MOD}:Tools has no attribute 'missing'",
        ),
        (
            f"{MOD}:NOT_CALLABLE",
            f"cannot import '{MOD}:NOT_CALLABLE': {MOD}:NOT_CALLABLE is not callable",
        ),
        (
            "tests.helpers.broken_module:f",
            "cannot import 'tests.helpers.broken_module:f': RuntimeError: broken at import",
        ),
        (
            "no_colon",
            "invalid callable 'no_colon': expected 'package.module:function' "
            "or 'package.module:Class.method'",
        ),
    ],
)
async def test_unresolvable_callable_fails_clearly(call: str, error: str) -> None:
    outcome = await PythonRunner("py").run(request(call))
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.error == error
    with pytest.raises(ValueError, match="^" + error.split(":")[0]):
        resolve_callable(call)


async def test_missing_call_fails() -> None:
    outcome = await PythonRunner("py").run(request(None))
    assert outcome.status is AttemptStatus.FAILED
    assert outcome.error is not None


def test_resolve_callable_returns_the_function() -> None:
    assert resolve_callable(f"{MOD}:add") is callables.add
    assert resolve_callable(f"{MOD}:Tools.double") is callables.Tools.double


@pytest.mark.parametrize("spec", ["", ":f", "mod:", "a:b:c"])
def test_resolve_callable_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid callable"):
        resolve_callable(spec)


async def test_async_callable_times_out() -> None:
    started = time.monotonic()
    outcome = await PythonRunner("py").run(request(f"{MOD}:async_sleep", "30", timeout=0.1))
    assert outcome.status is AttemptStatus.TIMED_OUT
    assert outcome.error == "timed out after 100ms"
    assert time.monotonic() - started < 2


@pytest.mark.usefixtures("release_threads")
async def test_sync_callable_times_out_and_its_thread_is_abandoned() -> None:
    started = time.monotonic()
    outcome = await PythonRunner("py").run(request(f"{MOD}:blocking_wait", "30", timeout=0.1))
    assert outcome.status is AttemptStatus.TIMED_OUT
    assert time.monotonic() - started < 2


async def test_cancellation_propagates() -> None:
    with anyio.move_on_after(0.1) as scope:
        await PythonRunner("py").run(request(f"{MOD}:async_sleep", "30"))
    assert scope.cancelled_caught


async def test_noop_succeeds_at_once() -> None:
    runner = NoopRunner()
    outcome = await runner.run(request(None))
    assert runner.name == "noop"
    assert outcome.status is AttemptStatus.SUCCEEDED
    assert outcome.exit_code == 0
    assert outcome.ok
