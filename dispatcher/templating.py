"""Templates in step args, kwargs and concurrency keys; pure functions.

Two kinds of placeholder:

- `{name}`: a param of the dispatch, filled when the plan is made.
- `{steps.NAME.result}` / `{steps.NAME.result.FIELD}` (FIELD may go deeper,
  `a.b.0`): the result of an earlier step, filled when the step that uses it starts.
  Only step args and kwargs may use them.

No other form is allowed inside braces (no attribute or index access, no format spec
or conversion), and `{{` / `}}` stand for literal braces. Filled values are strings
handed to argv directly: neither params nor results ever reach a shell.

A step whose args use a result is stored in *template form* until it starts: its
params are filled, its result references kept, and every literal brace escaped again
(`fill_params`); `fill_results` then gives the final text.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_FORMATTER = string.Formatter()

_REF = re.compile(r"steps\.(?P<step>[A-Za-z0-9_.-]+?)\.result(?P<path>(?:\.[A-Za-z0-9_-]+)*)")
"""The inside of a result reference (a step name may hold dots: the first `.result`
ends it)."""

_REF_IN_TEXT = re.compile(r"\{(" + _REF.pattern + r")\}")


@dataclass(frozen=True, slots=True)
class ResultRef:
    """`{steps.STEP.result.PATH}`: the result of step STEP, or a field inside it."""

    step: str
    path: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The placeholder as written: `{steps.build.result.path}`."""
        return "{" + ".".join(("steps", self.step, "result", *self.path)) + "}"


class MissingResult(ValueError):
    """A result reference that cannot be filled; the message is one line."""


def _ref(field: str) -> ResultRef | None:
    match = _REF.fullmatch(field)
    if match is None:
        return None
    path = match["path"]
    return ResultRef(match["step"], tuple(path[1:].split(".")) if path else ())


def _parse(template: str) -> list[tuple[str, str | None]]:
    """(literal, field) pairs; `ValueError` for a malformed template or field."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid template {template!r}: {exc}") from None
    pairs: list[tuple[str, str | None]] = []
    for literal, field, spec, conversion in parsed:
        plain = field is None or field.isidentifier() or _ref(field) is not None
        if not plain or spec or conversion:
            raise ValueError(
                f"invalid placeholder {{{field}}} in {template!r}: "
                "use {name} with a plain param name, or {steps.NAME.result[.FIELD]}"
            )
        pairs.append((literal, field))
    return pairs


def template_fields(template: str) -> tuple[list[str], list[ResultRef]]:
    """The param names and the result references a template uses; `ValueError` for a
    malformed template."""
    names: list[str] = []
    refs: list[ResultRef] = []
    for _literal, field in _parse(template):
        if field is None:
            continue
        ref = _ref(field)
        if ref is None:
            names.append(field)
        else:
            refs.append(ref)
    return names, refs


def placeholders(template: str) -> list[str]:
    """The param names a template uses; `ValueError` for a malformed template, and for
    a result reference (only step args and kwargs may use those)."""
    names, refs = template_fields(template)
    if refs:
        raise ValueError(
            f"{refs[0].text} in {template!r}: only step args and kwargs may use a result"
        )
    return names


def render_value(value: Any) -> str:
    """How a value appears in argv: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def escape(text: str) -> str:
    """`text` as a template that fills to itself."""
    return text.replace("{", "{{").replace("}", "}}")


def fill(template: str, params: Mapping[str, Any]) -> str:
    """Fill `{name}` from params; `KeyError(name)` names the first missing param."""
    out = []
    for literal, field, _spec, _conversion in _FORMATTER.parse(template):
        out.append(literal)
        if field is not None:
            out.append(render_value(params[field]))
    return "".join(out)


def fill_params(template: str, params: Mapping[str, Any]) -> str:
    """Fill `{name}` from params but keep result references: the template form of a
    step that uses a result (literal braces, filled values included, escaped)."""
    out = []
    for literal, field in _parse(template):
        out.append(escape(literal))
        if field is None:
            continue
        ref = _ref(field)
        out.append(ref.text if ref is not None else escape(render_value(params[field])))
    return "".join(out)


def fill_results(template: str, results: Mapping[str, str | None]) -> str:
    """Fill the result references of a template-form text from `results` (step name ->
    its result as JSON text, None when it gave none); `MissingResult` when one cannot
    be filled."""
    out = []
    for literal, field in _parse(template):
        out.append(literal)
        if field is None:
            continue
        ref = _ref(field)
        if ref is None:  # template form holds no param placeholder
            raise MissingResult(f"{{{field}}} is not a result reference")
        out.append(render_value(lookup(ref, results)))
    return "".join(out)


def lookup(ref: ResultRef, results: Mapping[str, str | None]) -> Any:
    """The value `ref` names; `MissingResult` saying what is missing."""
    text = results.get(ref.step)
    if text is None:
        raise MissingResult(f"{ref.text}: step {ref.step!r} gave no result")
    value: Any = json.loads(text)
    for depth, key in enumerate(ref.path):
        inner = _field(value, key)
        if inner is _MISSING:
            field = ".".join(ref.path[: depth + 1])
            raise MissingResult(
                f"{ref.text}: the result of step {ref.step!r} has no {field!r}{_has(value)}"
            )
        value = inner
    return value


def _has(value: Any) -> str:
    """What a value offers instead, for a message: ` (it has: a, b)`."""
    if isinstance(value, dict) and value:
        keys = sorted(str(key) for key in value)
        more = f", ... ({len(keys)} in all)" if len(keys) > 8 else ""
        return f" (it has: {', '.join(keys[:8])}{more})"
    if isinstance(value, list):
        return f" (it is a list of {len(value)})"
    return f" (it is {render_value(value)[:40]})"


_MISSING = object()


def _field(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return value.get(key, _MISSING)
    if isinstance(value, list) and key.isdigit() and int(key) < len(value):
        return value[int(key)]
    return _MISSING


def literal_with_refs(text: str) -> str:
    """A planner's literal text as a template: its braces escaped, except around the
    result references it holds."""
    out = []
    start = 0
    for match in _REF_IN_TEXT.finditer(text):
        out.append(escape(text[start : match.start()]))
        out.append(match.group(0))
        start = match.end()
    out.append(escape(text[start:]))
    return "".join(out)


def literal_refs(text: str) -> list[ResultRef]:
    """The result references inside a planner's literal text."""
    return [ref for match in _REF_IN_TEXT.finditer(text) if (ref := _ref(match[1]))]


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with `change(text)` applied to every string inside lists and dicts."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {key: map_strings(item, change) for key, item in value.items()}
    return value


def strings(value: Any) -> Iterable[str]:
    """Every string inside a string, list or dict."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)


def fill_value(value: Any, params: Mapping[str, Any]) -> Any:
    """Fill templates inside strings, lists and dicts (for python kwargs)."""
    return map_strings(value, lambda text: fill(text, params))


def value_placeholders(value: Any) -> Iterable[str]:
    """Every param placeholder inside a string, list or dict (result references are
    allowed there and left out)."""
    for text in strings(value):
        yield from template_fields(text)[0]
