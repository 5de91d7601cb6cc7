"""`{param}` templates in step args, kwargs and concurrency keys; pure functions.

Only plain names are allowed inside braces (no attribute or index access), and `{{`
/ `}}` stand for literal braces. Filled values are strings handed to argv directly:
params never reach a shell.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping
from typing import Any

_FORMATTER = string.Formatter()


def placeholders(template: str) -> list[str]:
    """The param names a template uses; `ValueError` for a malformed template."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid template {template!r}: {exc}") from None
    names = []
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(
                f"invalid placeholder {{{field}}} in {template!r}: "
                "use {name} with a plain param name"
            )
        names.append(field)
    return names


def render_value(value: Any) -> str:
    """How a param value appears in argv: strings as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def fill(template: str, params: Mapping[str, Any]) -> str:
    """Fill `{name}` from params; `KeyError(name)` names the first missing param."""
    out = []
    for literal, field, _spec, _conversion in _FORMATTER.parse(template):
        out.append(literal)
        if field is not None:
            out.append(render_value(params[field]))
    return "".join(out)


def fill_value(value: Any, params: Mapping[str, Any]) -> Any:
    """Fill templates inside strings, lists and dicts (for python kwargs)."""
    if isinstance(value, str):
        return fill(value, params)
    if isinstance(value, list):
        return [fill_value(item, params) for item in value]
    if isinstance(value, dict):
        return {key: fill_value(item, params) for key, item in value.items()}
    return value


def value_placeholders(value: Any) -> Iterable[str]:
    """Every placeholder inside a string, list or dict."""
    if isinstance(value, str):
        yield from placeholders(value)
    elif isinstance(value, list):
        for item in value:
            yield from value_placeholders(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from value_placeholders(item)
