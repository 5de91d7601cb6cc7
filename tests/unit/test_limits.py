"""What can be stored and passed on: the pure checks every input path calls."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dispatcher import limits, service
from dispatcher.config import Settings
from dispatcher.errors import BadRequest, PlanError
from dispatcher.limits import MAX_DEPTH, MAX_PARAMS_BYTES, Refused, load_json
from dispatcher.planners import parse_plan_output, validate_plan

SETTINGS = Settings.model_validate(
    {
        "runners": {"sh": {"type": "exec"}},
        "tasks": {
            "t": {"steps": [{"name": "s", "runner": "sh", "args": ["echo"]}]},
            "k": {
                "steps": [{"name": "s", "runner": "sh", "args": ["echo"]}],
                "concurrency": 1,
                "concurrency_key": "{lane}",
            },
        },
    }
)


def nested(levels: int, inner: str = "1") -> str:
    """JSON text: `levels` arrays around `inner`."""
    return "[" * levels + inner + "]" * levels


def refusal(text: str, **options: Any) -> Refused:
    with pytest.raises(Refused) as info:
        load_json(text, **options)
    return info.value


@pytest.mark.parametrize("levels", [60_000, 100_000])
def test_nesting_far_past_the_limit_is_refused_without_recursion(levels: int) -> None:
    refused = refusal('{"a": ' + nested(levels) + "}")
    assert refused.problem == f"nested deeper than {MAX_DEPTH} levels"
    assert refused.path == ("a", *[0] * (MAX_DEPTH - 1))


def test_params_may_nest_exactly_the_limit() -> None:
    assert load_json('{"a": ' + nested(MAX_DEPTH - 1) + "}")["a"] is not None
    assert refusal('{"a": ' + nested(MAX_DEPTH) + "}").path[0] == "a"


def test_a_body_is_one_level_around_its_params() -> None:
    inside = '{"params": {"a": ' + nested(MAX_DEPTH - 1) + "}}"
    assert load_json(inside, outer_levels=1)
    too_deep = refusal('{"params": {"a": ' + nested(MAX_DEPTH) + "}}", outer_levels=1)
    assert too_deep.path[:2] == ("params", "a")
    assert too_deep.problem == f"nested deeper than {MAX_DEPTH} levels"


def test_brackets_inside_strings_do_not_count() -> None:
    text = '{"a": "' + "[" * 1000 + '", "b": ["]]]]", {"c": "{{{{"}]}'
    assert load_json(text)["b"][1] == {"c": "{{{{"}


def test_the_pointer_names_keys_and_indexes() -> None:
    text = '{"x": [0, 1, {"a/b~c": ' + nested(40) + "}]}"
    assert refusal(text).located("--params").startswith("--params /x/2/a~1b~0c/0/0/")


@pytest.mark.parametrize(
    ("literal", "ok"),
    [
        (str(limits.INT_MAX), True),
        (str(limits.INT_MIN), True),
        (str(limits.INT_MAX + 1), False),
        (str(limits.INT_MIN - 1), False),
        ("9" * 25, False),
        ("9" * 5000, False),  # past Python's 4300-digit conversion limit
        ("-" + "9" * 100_000, False),
    ],
)
def test_integers_must_fit_in_64_bits(literal: str, ok: bool) -> None:
    text = '{"n": [' + literal + "]}"
    if ok:
        assert load_json(text) == {"n": [int(literal)]}
    else:
        refused = refusal(text)
        assert refused.path == ("n", 0)
        assert refused.problem.startswith("integer outside 64 bits")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_nan_and_infinity_are_refused(literal: str) -> None:
    refused = refusal('{"f": ' + literal + "}")
    assert refused.path == ("f",)
    assert "NaN and Infinity" in refused.problem


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        ('{"s": "\\ud800"}', ("s",), "not valid UTF-8"),
        ('{"s": "\udcff"}', ("s",), "not valid UTF-8"),  # a byte of argv that was not UTF-8
        ('{"s": ["a", "x\\u0000"]}', ("s", 1), "U+0000"),
        ('{"\\udfff": 1}', ("\udfff",), "name: text is not valid UTF-8"),
    ],
)
def test_text_must_be_utf8_without_nul(text: str, path: tuple[Any, ...], problem: str) -> None:
    refused = refusal(text)
    assert refused.path == path
    assert problem in refused.problem


def test_a_surrogate_pair_is_one_valid_character() -> None:
    assert load_json('{"s": "\\ud83d\\ude00"}') == {"s": "\U0001f600"}


def test_messages_stay_one_printable_line() -> None:
    refused = refusal('{"line\\nbreak\\udcff' + "k" * 100 + '": NaN}')
    message = refused.located("body")
    assert "\n" not in message and message.isprintable()
    assert "\\n" in message and "..." in message


def test_params_over_the_size_limit_are_refused() -> None:
    limits.check_params({"a": "x" * (MAX_PARAMS_BYTES - 8)})  # {"a":"..."} is 8 more
    with pytest.raises(Refused, match=f"the limit is {MAX_PARAMS_BYTES}"):
        limits.check_params({"a": "x" * (MAX_PARAMS_BYTES - 7)})
    with pytest.raises(Refused, match="bytes of JSON"):  # counted as UTF-8, not characters
        limits.check_params({"a": "é" * (MAX_PARAMS_BYTES // 2)})


def test_python_values_that_are_not_json_are_refused() -> None:
    looped: list[Any] = []
    looped.append(looped)
    for value, problem in [
        ({"a": {1, 2}}, "not a JSON value (set)"),
        ({"a": {1: "x"}}, "object keys must be text"),
        ({"a": looped}, "nested deeper"),
    ]:
        with pytest.raises(Refused, match=re.escape(problem)):
            limits.check_json(value)


def test_a_tuple_from_python_code_is_a_json_array() -> None:
    limits.check_json({"a": (1, "x", [2])})
    with pytest.raises(Refused, match="NaN"):
        limits.check_json({"a": (1, float("nan"))})


def test_storable_text_replaces_what_no_store_takes() -> None:
    assert limits.storable_text("plain") == "plain"
    assert limits.storable_text("a\x00b\udcffc") == "a\ufffdb?c"


def test_a_submission_with_hostile_params_is_refused_naming_the_param() -> None:
    for params, where in [
        ({"lane": "\udcff"}, "params /lane: text is not valid UTF-8"),
        ({"n": 2**64}, "params /n: integer outside 64 bits"),
        ({"f": [float("nan")]}, "params /f/0: NaN"),
        ({"big": "x" * MAX_PARAMS_BYTES}, "params: 65546 bytes of JSON"),
    ]:
        with pytest.raises(BadRequest) as info:
            service.validate_request(SETTINGS, service.SubmitRequest("k", params))
        assert info.value.message.startswith(where), info.value.message


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"task": "t", "params": {"a": ' + nested(100_000) + "}}", "batch line 3 /params/a/0"),
        ('{"task": "t", "params": {"a": ' + "1" * 5000 + "}}", "batch line 3 /params/a: integer"),
        ('{"task": "t", "params": {"a": NaN}}', "batch line 3 /params/a: NaN"),
        ('{"task": "t", "key": "\\u0000"}', "batch line 3 /key: text contains U+0000"),
    ],
)
def test_a_hostile_batch_line_is_refused_by_number(line: str, message: str) -> None:
    lines = ['{"task": "t"}', "", line]
    with pytest.raises(BadRequest) as info:
        service.validate_batch(SETTINGS, lines)
    assert info.value.message.startswith(message), info.value.message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([{"name": "s", "runner": "sh", "kwargs": {"x": float("inf")}}], "kwargs: /x: NaN"),
        ([{"name": "s", "runner": "sh", "kwargs": {"x": 2**70}}], "kwargs: /x: integer"),
        ([{"name": "s", "runner": "sh", "args": ["ok", "\udcff"]}], "args: [1]: text is not"),
    ],
)
def test_a_plan_that_cannot_be_stored_is_refused(raw: Any, message: str) -> None:
    with pytest.raises(PlanError) as info:
        validate_plan(raw, SETTINGS)
    assert message in info.value.message


def test_a_planner_printing_deep_json_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(PlanError, match="planner output /steps/0/kwargs/a/0"):
        parse_plan_output('{"steps": [{"kwargs": {"a": ' + nested(200_000) + "}}]}")
    with pytest.raises(PlanError, match="planner output is not JSON"):
        parse_plan_output("{nope")
    assert parse_plan_output(json.dumps({"steps": []})) == {"steps": []}
