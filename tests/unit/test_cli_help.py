"""The command line explains itself, and refuses contradictions before touching anything."""

from __future__ import annotations

import argparse

import pytest

from dispatcher.cli import build_parser, main


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_and_option_is_explained() -> None:
    parser = build_parser()
    commands = subparsers(parser)
    assert {"run", "submit", "show", "list", "tasks", "status", "check-config"} <= set(commands)
    for name, command in commands.items():
        assert command.description, f"{name} has no description"
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    top = parser.format_help()
    assert "No logic" not in top
    assert "Submit work with `dispatcher submit TASK`" in top


def test_the_top_level_help_has_examples_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    examples = text.split("examples:", 1)[1].split("exit codes:", 1)[0]
    assert "dispatcher submit hello --param who=world --wait" in examples
    codes = text.split("exit codes:", 1)[1]
    for code in ("0", "1", "2", "65", "69", "73", "75", "77", "78"):
        assert f"\n  {code} " in codes, code


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["submit", "hello", "--batch", "-"], "TASK 'hello' and --batch exclude each other"),
        (["submit", "--batch", "-", "--param", "a=1"], "--param belongs in each batch line"),
        (["submit", "hello", "--timeout", "5s"], "--timeout only applies with --wait"),
        (["submit"], "submit needs a TASK (or --batch FILE)"),
    ],
)
def test_contradictory_submit_options_exit_2_before_reading_anything(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", "/nonexistent/dispatcher.toml", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dispatcher: error: ") and err.count("\n") == 1
    assert fragment in err
