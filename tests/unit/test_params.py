"""Declared params: the config checks the declarations, submit checks each submission."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from dispatcher import service
from dispatcher.config import Settings, load_settings
from dispatcher.errors import BadRequest, ConfigError
from dispatcher.params import ParamSpec, check_value, from_text

RUNNERS = """
[runners.shell]
type = "exec"
"""

DECLARED = (
    RUNNERS
    + """
[tasks.build]
steps = [{ name = "make", runner = "shell", args = ["make", "{target}", "-j{jobs}"] }]

[tasks.build.params.target]
type = "str"
description = "what to build"

[tasks.build.params.jobs]
type = "int"
default = 4

[tasks.build.params.mode]
type = ["debug", "release"]
default = "debug"

[tasks.build.params.ratio]
type = "float"
required = false

[tasks.build.params.clean]
type = "bool"
default = false

[tasks.free]
steps = [{ name = "echo", runner = "shell", args = ["echo", "{who}"] }]
"""
)


def settings_of(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "dispatcher.toml"
    path.write_text(text)
    return load_settings(path, {})


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        settings_of(tmp_path, text)
    assert "\n" not in info.value.message
    return info.value.message


def submit_params(settings: Settings, task: str, params: dict[str, Any]) -> dict[str, Any]:
    new = service.validate_request(settings, service.SubmitRequest(task, params))
    return new.params


def refusal(settings: Settings, task: str, params: dict[str, Any]) -> str:
    with pytest.raises(BadRequest) as info:
        submit_params(settings, task, params)
    assert info.value.exit_code == 65
    return info.value.message


# -- the configuration -----------------------------------------------------------------


def test_declarations_load_with_their_types_defaults_and_descriptions(tmp_path: Path) -> None:
    declared = settings_of(tmp_path, DECLARED).tasks["build"].params
    assert declared is not None
    assert declared["target"].is_required and declared["target"].description == "what to build"
    assert not declared["jobs"].is_required and declared["jobs"].default == 4
    assert declared["mode"].type == ("debug", "release")
    assert not declared["ratio"].is_required and declared["ratio"].default is None
    assert settings_of(tmp_path, DECLARED).tasks["free"].params is None


@pytest.mark.parametrize(
    ("declaration", "expected"),
    [
        ('n.type = "int"\nn.default = "four"', "params.n: default 'four': expected an integer"),
        ('n.type = "bool"\nn.default = 1', "params.n: default 1: expected true or false"),
        ('n.type = ["a", "b"]\nn.default = "c"', "params.n: default 'c': expected one of"),
        ('n.type = "string"', 'params.n.type: expected "str", "int", "float", "bool"'),
        ("n.type = []", "params.n.type: a list of allowed values must not be empty"),
        ('n.type = ["a", "a"]', "params.n.type: allowed values must be unique"),
        ("n.default = 1\nn.required = true", "params.n: a required param cannot have a default"),
        ('n.descripton = "typo"', "params.n.descripton: unknown key"),
        ('"bad-name".type = "str"', "tasks.t.params.bad-name.[key]: String should match"),
    ],
)
def test_a_wrong_declaration_is_refused_naming_the_param(
    tmp_path: Path, declaration: str, expected: str
) -> None:
    text = RUNNERS + (
        '[tasks.t]\nsteps = [{ name = "s", runner = "shell" }]\n'
        f"[tasks.t.params]\n{declaration}\n"
    )
    message = config_error(tmp_path, text)
    assert expected in message, message
    assert message.startswith(str(tmp_path / "dispatcher.toml"))


def test_a_template_must_use_declared_params(tmp_path: Path) -> None:
    text = RUNNERS + (
        '[tasks.t]\nsteps = [{ name = "s", runner = "shell", args = ["{who}"] }]\n'
        '[tasks.t.params.whom]\ntype = "str"\n'
    )
    message = config_error(tmp_path, text)
    assert "tasks.t: step 's' uses {who}, which is not a declared param (declared: whom)" in message


def test_a_template_cannot_use_an_optional_param_without_a_default(tmp_path: Path) -> None:
    text = RUNNERS + (
        '[tasks.t]\nconcurrency = 1\nconcurrency_key = "{lane}"\n'
        'steps = [{ name = "s", runner = "shell" }]\n'
        "[tasks.t.params.lane]\nrequired = false\n"
    )
    message = config_error(tmp_path, text)
    assert "concurrency_key uses {lane}: params.lane must be required or have a default" in message


# -- a submission ------------------------------------------------------------------------


def test_defaults_are_filled_in_and_values_normalised(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, DECLARED)
    params = submit_params(settings, "build", {"target": "all", "ratio": 1})
    assert params == {"target": "all", "jobs": 4, "mode": "debug", "ratio": 1.0, "clean": False}


def test_a_default_given_or_left_out_is_the_same_dispatch_for_a_key(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, DECLARED)
    with_default = service.SubmitRequest("build", {"target": "all", "jobs": 4}, key="k")
    without = service.SubmitRequest("build", {"target": "all"}, key="k")
    first = service.validate_request(settings, with_default)
    assert first.fingerprint == service.validate_request(settings, without).fingerprint


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "task 'build': missing param 'target' (str)"),
        ({"target": "a", "job": 2}, "task 'build': unknown param 'job' (declared: clean, jobs,"),
        ({"target": "a", "jobs": "8"}, "param 'jobs': expected an integer, got a string ('8')"),
        ({"target": "a", "jobs": True}, "param 'jobs': expected an integer, got a boolean"),
        ({"target": "a", "jobs": 2.5}, "param 'jobs': expected an integer, got a number (2.5)"),
        ({"target": "a", "mode": "fast"}, "param 'mode': expected one of 'debug', 'release'"),
        ({"target": 1}, "param 'target': expected a string, got an integer (1)"),
        ({"target": "a", "clean": "yes"}, "param 'clean': expected true or false, got a string"),
        ({"target": "a", "ratio": math.nan}, "params /ratio: NaN and Infinity are not JSON"),
        ({"target": None}, "param 'target': expected a string, got null"),
    ],
)
def test_a_wrong_submission_is_refused_naming_the_param(
    tmp_path: Path, params: dict[str, Any], expected: str
) -> None:
    assert expected in refusal(settings_of(tmp_path, DECLARED), "build", params)


def test_text_values_are_converted_to_the_declared_type(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, DECLARED)
    texts = {"jobs": "8", "mode": "release", "clean": "yes", "ratio": "0.5", "target": "x"}
    assert service.params_from_text(settings, "build", texts) == {
        "jobs": 8,
        "mode": "release",
        "clean": True,
        "ratio": 0.5,
        "target": "x",
    }
    assert service.params_from_text(settings, "free", {"who": "7"}) == {"who": "7"}
    with pytest.raises(BadRequest, match="--param jobs: task 'build': expected an integer"):
        service.params_from_text(settings, "build", {"jobs": "many"})


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [
        ("int", "-3", -3),
        ("float", "1e3", 1000.0),
        ("bool", "False", False),
        ("bool", "1", True),
        ("str", "  spaced ", "  spaced "),
    ],
)
def test_from_text(kind: str, text: str, value: Any) -> None:
    assert from_text(ParamSpec(type=kind), text) == value


def test_choices_may_be_numbers_and_match_their_text() -> None:
    spec = ParamSpec(type=[1, 2, 3])
    assert from_text(spec, "2") == 2
    assert check_value(spec, 3) == 3
    with pytest.raises(ValueError, match="expected one of 1, 2, 3"):
        check_value(spec, "3")


def test_an_undeclared_task_warns_on_params_no_template_uses(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, DECLARED)
    request = service.SubmitRequest("free", {"who": "a", "whom": "b"})
    assert submit_params(settings, "free", request.params) == {"who": "a", "whom": "b"}
    (warning,) = service.param_warnings(settings, request)
    assert "task 'free': param 'whom' used by no step" in warning
    assert service.param_warnings(settings, service.SubmitRequest("free", {"who": "a"})) == []


def test_tasks_lists_every_task_with_its_params(tmp_path: Path) -> None:
    listed = service.tasks(settings_of(tmp_path, DECLARED)).to_json()["tasks"]
    tasks = {t["name"]: t for t in listed}
    assert tasks["build"]["declared"] is True
    assert [p["name"] for p in tasks["build"]["params"]] == [
        "clean",
        "jobs",
        "mode",
        "ratio",
        "target",
    ]
    mode = next(p for p in tasks["build"]["params"] if p["name"] == "mode")
    assert mode == {
        "name": "mode",
        "type": ["debug", "release"],
        "required": False,
        "default": "debug",
        "description": "",
    }
    assert tasks["free"]["declared"] is False
    assert tasks["free"]["params"] == [
        {"name": "who", "type": None, "required": True, "default": None, "description": ""}
    ]


def test_a_batch_reports_every_bad_line(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, DECLARED)
    lines = [
        '{"task": "build", "params": {"target": "a"}}',
        '{"task": "build", "params": {"target": "a", "jobs": "x"}}',
        "not json",
        "",
        '{"task": "nope"}',
        '{"task": "free", "params": {"who": "a", "extra": 1}}',
    ]
    checked = service.check_batch(settings, lines)
    assert len(checked.news) == 2
    assert [error.split(":")[0] for error in checked.errors] == [
        "batch line 2",
        "batch line 3",
        "batch line 5",
    ]
    assert "param 'jobs': expected an integer" in checked.errors[0]
    assert checked.warnings == [
        "batch line 6: task 'free': param 'extra' used by no step "
        "(stored anyway; declare the task's params to refuse unknown ones)"
    ]
