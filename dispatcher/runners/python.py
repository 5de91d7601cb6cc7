"""The `python` runner: a step calls an importable function inside the daemon."""

from __future__ import annotations

import functools
import importlib
import inspect
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread

from dispatcher.config import RunnerSettings, Settings, StepFields
from dispatcher.durations import format_duration
from dispatcher.models import AttemptStatus
from dispatcher.runners.base import RUNNER_TYPES, Outcome, RunnerType, RunRequest
from dispatcher.runners.results import ResultError, encode_result

_MAX_ERROR = 500
_SPEC_FORMS = "'package.module:function' or 'package.module:Class.method'"


def resolve_callable(spec: str) -> Callable[..., Any]:
    """The callable named by `spec` ("package.module:function" or "...:Class.method").

    Imports the module. Raises `ValueError` with a one-line message when the spec is
    malformed, the module cannot be imported, an attribute is missing or the target is
    not callable. "Class.method" is looked up on the class, so it suits static and
    class methods; a plain method would need an instance.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"invalid callable {spec!r}: expected {_SPEC_FORMS}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {spec!r}: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"cannot import {spec!r}: {describe_exception(exc)}") from exc
    owner = module_name
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"cannot import {spec!r}: {owner} has no attribute {part!r}") from None
        owner = f"{owner}.{part}" if owner != module_name else f"{module_name}:{part}"
    if not callable(target):
        raise ValueError(f"cannot import {spec!r}: {owner} is not callable")
    return target  # type: ignore[no-any-return]  # callable() narrows, getattr gave Any


def describe_exception(exc: BaseException) -> str:
    """`"ValueError: message"` on one line (first line of the message, bounded)."""
    name = type(exc).__name__
    lines = str(exc).strip().splitlines()
    if not lines:
        return name
    text = f"{name}: {lines[0]}"
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


class PythonRunner:
    """Calls `request.call` with `*request.args, **request.kwargs`, and with
    `context=` the step's `StepContext` when the callable has a parameter of that name.

    Coroutine functions are awaited in the daemon's loop and cancelled properly on
    timeout or cancellation. Synchronous callables run in a worker thread. Python cannot
    stop a thread: on timeout or cancellation the runner returns (or re-raises) at once
    and abandons the thread, which runs on to its end in the background, its result
    dropped. Keep such callables short, or make them async.

    The return value is the step's result: it must be JSON (or None) and at most
    `MAX_RESULT_BYTES` as JSON, else the step fails saying so. Turned into text with
    `str()` and cut at `output_limit` characters, it is also `Outcome.output`. An
    exception becomes a failed Outcome whose `error` is "ValueError: message" and whose
    `output` is the end of the traceback.
    """

    effects = True

    def __init__(self, name: str, *, output_limit: int = 8192) -> None:
        self.name = name
        self.output_limit = output_limit

    async def run(self, request: RunRequest) -> Outcome:
        """Call the step's callable to an Outcome; raise only for cancellation."""
        if request.call is None:
            return Outcome(AttemptStatus.FAILED, error="the step names no callable ('call')")
        try:
            function = resolve_callable(request.call)
        except ValueError as exc:
            return Outcome(AttemptStatus.FAILED, error=str(exc))
        kwargs = _with_context(function, request)
        with anyio.move_on_after(request.timeout):
            try:
                result = await _invoke(function, request.args, kwargs)
                return self._succeeded(result)
            except (Exception, SystemExit) as exc:  # SystemExit: a callable's sys.exit()
                return Outcome(
                    AttemptStatus.FAILED,
                    error=describe_exception(exc),
                    output=self._clip_end("".join(traceback.format_exception(exc))),
                )
        return Outcome(
            AttemptStatus.TIMED_OUT, error=f"timed out after {format_duration(request.timeout)}"
        )

    def _succeeded(self, result: object) -> Outcome:
        output = self._render(result)
        try:
            encoded = encode_result(result)
        except ResultError as exc:
            return Outcome(AttemptStatus.FAILED, error=str(exc), output=output)
        return Outcome(AttemptStatus.SUCCEEDED, output=output, result=encoded)

    def _render(self, result: object) -> str | None:
        if result is None:
            return None
        text = str(result)
        if len(text) <= self.output_limit:
            return text
        return text[: self.output_limit] + f"... [{len(text) - self.output_limit} more chars]"

    def _clip_end(self, text: str) -> str:
        return text[-self.output_limit :] if self.output_limit > 0 else ""


def _with_context(function: Callable[..., Any], request: RunRequest) -> Mapping[str, Any]:
    """The step's kwargs, with `context` added when the callable names such a parameter
    (and the step's kwargs do not set it)."""
    if request.context is None or "context" in request.kwargs:
        return request.kwargs
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature asks for nothing
        return request.kwargs
    if "context" not in parameters:
        return request.kwargs
    return {**request.kwargs, "context": request.context}


async def _invoke(
    function: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Any:
    """Call `function`: awaited if async, in an abandonable worker thread if not."""
    if _is_async(function):
        result = function(*args, **kwargs)
    else:
        call = functools.partial(function, *args, **kwargs)
        result = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    if inspect.isawaitable(result):
        result = await result
    return result


def _is_async(function: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(function):
        return True
    # An instance whose __call__ is a coroutine function (not a class: calling one
    # makes an instance).
    return not inspect.isclass(function) and inspect.iscoroutinefunction(type(function).__call__)


def _build(name: str, spec: RunnerSettings, settings: Settings) -> PythonRunner:
    return PythonRunner(name)


def _step_names_a_callable(step: StepFields) -> str | None:
    return None if step.call is not None else 'a python runner step needs call = "module:func"'


# Its code runs in the daemon and may start processes of its own: they carry the
# orphan guard's token only if the guard started before them.
RUNNER_TYPES.register(
    RunnerType(
        "python",
        RunnerSettings,
        _build,
        spawns_processes=True,
        check_step=_step_names_a_callable,
    )
)
