"""A step's result: one JSON value, stored with its attempt, at most `MAX_RESULT_BYTES`.

An exec step writes it to the file named by `DISPATCHER_RESULT`; a python step returns
it. Either way it is kept as compact JSON text, and a value that is not JSON or is too
large fails the step with one line saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

MAX_RESULT_BYTES = 64 * 1024
"""The largest result kept (compact JSON, UTF-8); a larger one fails the step."""


class ResultError(ValueError):
    """A result that cannot be kept; the message is one line."""


def encode_result(value: Any) -> str | None:
    """`value` as compact JSON text (None for None); `ResultError` when it is not JSON
    or is larger than `MAX_RESULT_BYTES`."""
    if value is None:
        return None
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ResultError(f"result is not JSON: {exc}") from None
    return _bounded(text)


def read_result_file(path: Path) -> str | None:
    """The JSON value an exec step wrote to `path`, as compact text; None when it wrote
    nothing (no file, or only white space). `ResultError` for a file that is too large
    or not one JSON value."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RESULT_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ResultError(f"result file {path.name}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_RESULT_BYTES:
        raise ResultError(f"result is larger than the limit of {MAX_RESULT_BYTES} bytes")
    if not data.strip():
        return None
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultError(f"result is not JSON: {_first_line(exc)}") from None
    return encode_result(value)


def _bounded(text: str) -> str:
    size = len(text.encode())
    if size > MAX_RESULT_BYTES:
        raise ResultError(
            f"result is {size} bytes of JSON, larger than the limit of {MAX_RESULT_BYTES}"
        )
    return text


def _no_constant(name: str) -> NoReturn:
    """NaN and Infinity (the only names json asks about) are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
