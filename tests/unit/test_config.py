"""Configuration: TOML + environment, and one clear line for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.config import load_settings
from dispatcher.errors import ConfigError

BASE = """
[runners.shell]
type = "exec"
concurrency = 2

[tasks.hello]
steps = [{ name = "greet", runner = "shell", args = ["echo", "hello {who}"], timeout = "30s" }]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dispatcher.toml"
    path.write_text(text)
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_config_loads_with_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE), {})
    assert settings.gate.global_ == 4
    step = settings.tasks["hello"].steps[0]
    assert step.timeout == 30.0 and step.retries == 0
    assert settings.purge.gate_retention == 7 * 86400
    assert settings.database.path == tmp_path / "var" / "dispatcher.db"
    assert settings.tasks["hello"].params_used() == {"who"}


def test_environment_overrides_a_key(tmp_path: Path) -> None:
    env = {"DISPATCHER_GATE__GLOBAL": "9", "DISPATCHER_LOG__FORMAT": "console"}
    settings = load_settings(write(tmp_path, BASE), env)
    assert settings.gate.global_ == 9
    assert settings.log.format == "console"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[gate]\nglobal = 0", "gate.global: Input should be greater than or equal to 1"),
        ("[gate]\nglobal = 'four'", "gate.global: Input should be a valid integer"),
        ("[gate]\nglobl = 3", "gate.globl: unknown key"),
        ("[purge]\ngate_retention = '7 days'", "purge.gate_retention: invalid duration"),
        ("[purge]\ngate_retention = 7", "purge.gate_retention: expected a duration string"),
        ("[purge]\nschedule = '61 * * * *'", "purge.schedule: invalid cron schedule"),
        ("[log]\nformat = 'xml'", "log.format: Input should be 'json' or 'console'"),
        (
            "[runners.x]\ntype = 'ssh'",
            "runners.x.type: unknown runner type 'ssh' (known: exec, noop, python)",
        ),
        (
            "[tasks.x]\nplanner = 'http'",
            "tasks.x.planner: unknown planner 'http' (known: command, python, steps)",
        ),
        ("[runners.x]\ntype = 'noop'\ncwd = '/tmp'", "runners.x.cwd: unknown key"),
    ],
)
def test_each_mistake_names_file_and_key(tmp_path: Path, extra: str, expected: str) -> None:
    path = write(tmp_path, BASE + "\n" + extra + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_unknown_runner_in_step(tmp_path: Path) -> None:
    text = BASE.replace('runner = "shell"', 'runner = "shel"')
    message = error_of(write(tmp_path, text))
    assert "tasks.hello.steps[0].runner: unknown runner 'shel' (known: shell)" in message


def test_bad_placeholder_is_refused(tmp_path: Path) -> None:
    text = BASE.replace("hello {who}", "hello {who.__class__}")
    assert "invalid placeholder" in error_of(write(tmp_path, text))


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[gate\nglobal = 1\n"))
    assert "invalid TOML" in message and "line 1" in message


def test_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nope.toml")
    assert message == f"{tmp_path / 'nope.toml'}: configuration file not found"


def test_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, BASE), {"DISPATCHER_GATE__GLOBAL": "-1"})
    assert message.startswith("environment DISPATCHER_GATE__GLOBAL: gate.global:")


def test_concurrency_key_needs_concurrency(tmp_path: Path) -> None:
    text = (
        BASE
        + '\n[tasks.lane]\nconcurrency_key = "{repo}"\nsteps = [{ name = "a", runner = "shell" }]\n'
    )
    assert "concurrency_key needs concurrency" in error_of(write(tmp_path, text))


def test_command_planner_needs_command(tmp_path: Path) -> None:
    text = BASE + '\n[tasks.p]\nplanner = "command"\n'
    assert 'planner "command" needs command' in error_of(write(tmp_path, text))
