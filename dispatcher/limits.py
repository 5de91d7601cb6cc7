"""What a value must be to be stored and passed on: the one check every input path calls.

Params (from `--param`, `--params`, `submit --batch`, HTTP bodies), step kwargs and args
(from the configuration and from planners) end up as JSON in the database (SQLite's
TEXT, PostgreSQL's `json`), in argv and in environments. So they must be:

- JSON values nested at most `MAX_DEPTH` levels (the params object is level 1);
- integers within 64 bits (what SQLite, PostgreSQL's `bigint` and most readers take);
- finite numbers (JSON has no NaN or Infinity);
- text that is valid UTF-8 without U+0000 (no lone surrogates, e.g. from undecodable
  bytes in argv; PostgreSQL text, argv and environments cannot hold a NUL);
- params at most `MAX_PARAMS_BYTES` bytes as compact JSON.

Everything here is a pure function. JSON text is parsed by `load_json`, which measures
the nesting before parsing (without recursion), so no input can raise `RecursionError`,
and which never converts an over-long integer literal (Python's `int()` refuses more
than 4300 digits and is quadratic below that). A refusal is a `Refused` naming the
place as a JSON pointer (RFC 6901); callers turn it into their own one-line error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 32
"""Levels of nesting in params: `{"a": [1]}` is 2 levels deep."""

MAX_PARAMS_BYTES = 64 * 1024
"""Size of a dispatch's params as compact UTF-8 JSON (well within one argv string)."""

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1

MAX_PRIORITY = 2**31 - 1
"""Priorities are 32-bit: what the API's schema says, well inside 64 bits."""

_MAX_SHOWN = 40
"""Characters of one pointer segment shown in a message (the rest is cut)."""

_INT_LITERAL_MAX = len(str(INT_MIN))
"""A JSON integer literal longer than this is outside 64 bits (JSON has no leading zeros)."""

_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)
"""Strings (skipped whole) and the structural characters of JSON text."""

Path = tuple[str | int, ...]


class Refused(ValueError):
    """A value that cannot be stored or passed on, and where it is."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{pointer(path)}: {problem}" if path else problem)
        self.path = path
        self.problem = problem

    def located(self, where: str) -> str:
        """One line: `where`, the pointer (if any) and the problem."""
        at = pointer(self.path)
        return f"{where} {at}: {self.problem}" if at else f"{where}: {self.problem}"


def pointer(path: Path) -> str:
    """A JSON pointer for messages: `/params/a~1b/0`; long or unprintable parts made safe."""
    return "".join("/" + _shown(str(part).replace("~", "~0").replace("/", "~1")) for part in path)


def _shown(segment: str) -> str:
    cut = segment[:_MAX_SHOWN]
    if not cut.isprintable():  # a newline, a control character or a lone surrogate
        cut = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in cut)
    return cut + "..." if len(segment) > _MAX_SHOWN else cut


# -- checks ----------------------------------------------------------------------------


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored or passed on, or None when it can."""
    if "\x00" in text:
        return "text contains U+0000 (NUL), which cannot be stored or passed to a program"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "text is not valid UTF-8 (undecodable bytes or a lone surrogate)"
    return None


def check_json(value: Any, max_depth: int = MAX_DEPTH, path: Path = ()) -> None:
    """Refuse (`Refused`) a value that is not storable JSON; iterative, any depth.

    Accepts None, bool, int (64-bit), finite float, valid text, and lists (tuples) and
    dicts (with text keys) of those, nested at most `max_depth` levels.
    """
    stack: list[tuple[Any, Path, int]] = [(value, path, 0)]
    while stack:
        item, at, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                raise Refused(at, _too_deep(max_depth))
            stack.extend(_children(item, at, depth + 1))
        else:
            problem = _scalar_problem(item)
            if problem is not None:
                raise Refused(at, problem)


def _children(
    item: dict[Any, Any] | list[Any] | tuple[Any, ...], at: Path, depth: int
) -> list[Any]:
    if not isinstance(item, dict):  # a list (or a tuple from Python code: a JSON array)
        return [(child, (*at, index), depth) for index, child in reversed(list(enumerate(item)))]
    children = []
    for key, child in reversed(item.items()):
        if not isinstance(key, str):
            raise Refused(at, f"object keys must be text, got {type(key).__name__}")
        problem = text_problem(key)
        if problem is not None:
            raise Refused((*at, key), f"name: {problem}")
        children.append((child, (*at, key), depth))
    return children


def _scalar_problem(item: Any) -> str | None:
    if item is None or isinstance(item, bool):
        return None
    if isinstance(item, str):
        return text_problem(item)
    if isinstance(item, int):
        if INT_MIN <= item <= INT_MAX:
            return None
        return _INT_RANGE
    if isinstance(item, float):
        return None if math.isfinite(item) else _NOT_FINITE
    if isinstance(item, _BigInt):
        return _INT_RANGE
    return f"not a JSON value ({type(item).__name__})"


_INT_RANGE = f"integer outside 64 bits ({INT_MIN} to {INT_MAX})"
_NOT_FINITE = "NaN and Infinity are not JSON numbers (nor is a number too large for a double)"


def check_params(params: dict[str, Any]) -> None:
    """Params a dispatch can carry: storable JSON, at most `MAX_PARAMS_BYTES`."""
    check_json(params)
    size = len(json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_PARAMS_BYTES:
        raise Refused((), f"{size} bytes of JSON; the limit is {MAX_PARAMS_BYTES}")


def storable_text(text: str) -> str:
    """`text` made storable: NUL and lone surrogates replaced (for what programs print
    or raise, which is recorded rather than refused)."""
    if text_problem(text) is None:
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


# -- parsing ---------------------------------------------------------------------------


class _BigInt:
    """An integer literal too long to be in range, kept unconverted."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(literal: str) -> int | _BigInt:
    if len(literal) > _INT_LITERAL_MAX:
        return _BigInt(len(literal))
    return int(literal)


def load_json(text: str | bytes, *, outer_levels: int = 0) -> Any:
    """Parse JSON text into storable values, or raise `ValueError`.

    The text may nest `MAX_DEPTH + outer_levels` levels: a batch line or an HTTP body
    is one object around the params (`outer_levels=1`). `Refused` (a `ValueError`)
    names the place of a value that cannot be stored; `json.JSONDecodeError` (also one)
    says where the text is not JSON. Bytes must be UTF-8 (`UnicodeDecodeError`, again a
    `ValueError`, otherwise).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    levels = MAX_DEPTH + outer_levels
    too_deep = nesting_beyond(text, levels)
    if too_deep is not None:
        raise Refused(too_deep, _too_deep(MAX_DEPTH))
    try:
        value = json.loads(text, parse_int=_parse_int)
    except RecursionError:  # not reached: the nesting was measured first
        raise Refused((), _too_deep(MAX_DEPTH)) from None
    try:
        check_json(value, levels)
    except Refused as exc:
        if exc.problem == _too_deep(levels):
            raise Refused(exc.path, _too_deep(MAX_DEPTH)) from None
        raise
    return value


def _too_deep(levels: int) -> str:
    return f"nested deeper than {levels} levels"


def nesting_beyond(text: str, max_depth: int) -> Path | None:
    """Where JSON text first nests deeper than `max_depth`, or None; no recursion.

    Strings are skipped whole, so brackets inside them do not count. Text that is not
    JSON may be measured wrongly, but only ever too deep: the parser then refuses it.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return None
    stack: list[list[Any]] = []  # [kind, position]: an array's index, an object's key
    last_string = ""
    for match in _TOKENS.finditer(text):
        token = match.group()
        kind = token[0]
        if kind == '"':
            last_string = token
        elif kind in "[{":
            if len(stack) >= max_depth:
                return tuple(position for _, position in stack)
            stack.append([kind, 0 if kind == "[" else ""])
        elif kind in "]}":
            if stack:
                stack.pop()
        elif stack and kind == "," and stack[-1][0] == "[":
            stack[-1][1] += 1
        elif stack and kind == ":" and stack[-1][0] == "{":
            stack[-1][1] = _key(last_string)
    return None


def _key(token: str) -> str:
    try:
        key = json.loads(token)
    except ValueError:
        return token
    return key if isinstance(key, str) else token


def refuse_as(error: Callable[[str], Exception], where: str, exc: ValueError) -> Exception:
    """`exc` from `load_json` as the caller's one-line error about `where`."""
    if isinstance(exc, Refused):
        return error(exc.located(where))
    if isinstance(exc, json.JSONDecodeError):
        line = f"line {exc.lineno} " if exc.lineno > 1 else ""
        return error(f"{where}: invalid JSON: {exc.msg} at {line}column {exc.colno}")
    if isinstance(exc, UnicodeDecodeError):
        return error(f"{where}: not UTF-8 text")
    return error(f"{where}: {exc}")
