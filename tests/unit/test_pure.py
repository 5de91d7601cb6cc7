"""Pure policies: durations, templates, backoff, plan validation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dispatcher.config import Settings
from dispatcher.durations import format_duration, parse_duration
from dispatcher.errors import BadRequest, PlanError
from dispatcher.gate import task_gate_key
from dispatcher.planners import check_params, validate_plan
from dispatcher.retry import backoff_delay
from dispatcher.templating import fill, placeholders


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("10m", 600),
        ("12h", 43200),
        ("7d", 604800),
        ("1h30m", 5400),
        ("0", 0),
        (" 2s ", 2),
        ("1.5s", 1.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "7", "7 days", "-1s", "1y", "ms5"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(0.25) == "250ms"
    assert format_duration(90) == "1m30s"
    assert format_duration(7 * 86400) == "7d"


def test_templates() -> None:
    assert placeholders("hello {who} and {{literal}}") == ["who"]
    assert fill("hello {who} {{x}}", {"who": "world"}) == "hello world {x}"
    assert fill("{n}", {"n": 3}) == "3"
    with pytest.raises(KeyError):
        fill("{missing}", {})
    for bad in ["{a.b}", "{a[0]}", "{a!r}", "{a:>3}", "{"]:
        with pytest.raises(ValueError):
            placeholders(bad)


def test_backoff_grows_and_is_capped() -> None:
    rand = random.Random(7)
    for failures, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        delays = [backoff_delay(failures, 1.0, 30.0, rand) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jitter spreads them


def settings() -> Settings:
    return Settings.model_validate(
        {
            "runners": {"shell": {"type": "exec"}, "py": {"type": "python"}},
            "tasks": {
                "t": {
                    "steps": [{"name": "a", "runner": "shell", "args": ["{x}"]}],
                    "concurrency": 1,
                    "concurrency_key": "{repo}",
                }
            },
        }
    )


def test_missing_param_refused_at_submit() -> None:
    s = settings()
    with pytest.raises(BadRequest, match="task 't': missing params 'repo', 'x'"):
        check_params("t", s.tasks["t"], {})
    check_params("t", s.tasks["t"], {"x": 1, "repo": "r"})
    assert task_gate_key("t", s.tasks["t"], {"repo": "core"}) == "task:t:core"


def test_validate_plan_accepts_and_takes_args_literally() -> None:
    plan = validate_plan(
        {"steps": [{"name": "a", "runner": "shell", "args": ["echo", '{"json": 1}']}]}, settings()
    )
    assert plan[0].args == ("echo", '{"json": 1}')
    assert plan[0].timeout == 3600.0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"steps": []}, "plan has no steps"),
        ("nope", "plan must be"),
        ([1], "plan.steps[0]: a step must be an object"),
        ([{"name": "a", "runner": "nope"}], "plan.steps[0].runner: unknown runner 'nope'"),
        ([{"runner": "shell"}], "plan.steps[0].name: required key is missing"),
        ([{"name": "a", "runner": "shell", "timeout": "soon"}], "plan.steps[0].timeout"),
        ([{"name": "a", "runner": "shell", "bogus": 1}], "plan.steps[0].bogus: unknown key"),
        ([{"name": "a", "runner": "py"}], "python runner step needs call"),
        ([{"name": "a", "runner": "shell"}, {"name": "a", "runner": "shell"}], "unique"),
    ],
)
def test_validate_plan_refuses(raw: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(PlanError) as info:
        validate_plan(raw, settings())
    assert message in str(info.value)
