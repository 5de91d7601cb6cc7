"""Declared params of a task (`[tasks.NAME.params.P]`): types, defaults, checks.

A task that declares its params (even an empty `[tasks.NAME.params]` table) accepts
exactly those: a submission is checked against the declarations, unknown params are
refused, and defaults are filled in before the dispatch is stored (so the stored
params, and the idempotency fingerprint, always carry every param). A task without
declarations keeps the old rule: every param a template uses is required, anything
else is stored as given (`unused` names what no template uses, for a warning).

Pure functions; `BadRequest` names the task and the param.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from dispatcher.errors import BadRequest
from dispatcher.templating import render_value

Scalar: TypeAlias = str | int | float
Kind: TypeAlias = Literal["str", "int", "float", "bool"]
KINDS: tuple[Kind, ...] = ("str", "int", "float", "bool")
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def _parse_type(value: Any) -> Kind | tuple[Scalar, ...]:
    """`"str" | "int" | "float" | "bool"`, or a list of allowed values."""
    if isinstance(value, str) and value in KINDS:
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError("a list of allowed values must not be empty")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise ValueError(f"allowed values must be strings or numbers, got {item!r}")
        if len(set(map(render_value, value))) != len(value):
            raise ValueError("allowed values must be unique")
        return tuple(value)
    raise ValueError(
        f'expected "str", "int", "float", "bool" or a list of allowed values, got {value!r}'
    )


ParamType = Annotated[Kind | tuple[Scalar, ...], BeforeValidator(_parse_type)]


class ParamSpec(BaseModel):
    """One declared param: `type`, `default`, `required`, `description`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType = "str"
    default: Any = None
    """None: no default (TOML has no null, so a default is always a real value)."""
    required: bool | None = None
    """Unset: required exactly when there is no default."""
    description: str = ""

    @model_validator(mode="after")
    def _default_fits(self) -> ParamSpec:
        if self.required and self.default is not None:
            raise ValueError("a required param cannot have a default (drop one of them)")
        if self.default is not None:
            try:
                check_value(self, self.default)
            except ValueError as exc:
                raise ValueError(f"default {self.default!r}: {exc}") from None
        return self

    @property
    def is_required(self) -> bool:
        return self.default is None if self.required is None else self.required

    @property
    def type_name(self) -> str:
        """`int`, or `one of 'a', 'b'` for a list of allowed values."""
        if isinstance(self.type, str):
            return self.type
        return "one of " + ", ".join(repr(choice) for choice in self.type)

    def to_json(self, name: str) -> dict[str, Any]:
        """As `dispatcher tasks --json` shows it."""
        return {
            "name": name,
            "type": self.type if isinstance(self.type, str) else list(self.type),
            "required": self.is_required,
            "default": self.default,
            "description": self.description,
        }


# -- checking one value --------------------------------------------------------------------


def check_value(spec: ParamSpec, value: Any) -> Any:
    """`value` (as JSON decodes it) if it fits `spec`, normalised; ValueError otherwise."""
    kind = spec.type
    if not isinstance(kind, str):
        for choice in kind:
            if type(choice) is type(value) and choice == value:
                return value
        raise ValueError(f"expected {spec.type_name}, got {value!r}")
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return float(value)
    raise ValueError(f"expected {_article(kind)}, got {_describe(value)}")


def from_text(spec: ParamSpec, text: str) -> Any:
    """A value given as text (`--param NAME=VALUE`) converted to the declared type."""
    kind = spec.type
    if not isinstance(kind, str):
        for choice in kind:
            if render_value(choice) == text:
                return choice
        raise ValueError(f"expected {spec.type_name}, got {text!r}")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if kind == "float":
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        return check_value(spec, number)
    if kind == "bool":
        word = text.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"expected true or false, got {text!r}")
    return text


def _article(kind: str) -> str:
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}[
        kind
    ]


def _describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    shown = names.get(type(value))
    if shown is None:
        return "null" if value is None else f"a JSON {type(value).__name__}"
    return f"{shown} ({value!r})" if not isinstance(value, str) or len(value) < 40 else shown


# -- checking a submission ----------------------------------------------------------------


def apply_declared(
    task: str, declared: Mapping[str, ParamSpec], params: Mapping[str, Any]
) -> dict[str, Any]:
    """The params of a submission checked against the declarations, defaults filled in.

    `BadRequest` names the task and the first param that is wrong (in name order).
    """
    unknown = sorted(set(params) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise BadRequest(f"task {task!r}: unknown param {unknown[0]!r} (declared: {known})")
    checked: dict[str, Any] = {}
    for name in sorted(declared):
        spec = declared[name]
        if name in params:
            try:
                checked[name] = check_value(spec, params[name])
            except ValueError as exc:
                raise BadRequest(f"task {task!r}: param {name!r}: {exc}") from None
        elif spec.default is not None:
            checked[name] = spec.default
        elif spec.is_required:
            raise BadRequest(f"task {task!r}: missing param {name!r} ({spec.type_name})")
    return checked


def unused(params: Collection[str], used: Collection[str]) -> list[str]:
    """Params that no template of an undeclared task uses (a typo, most often)."""
    return sorted(set(params) - set(used))
