"""Runners execute steps: `exec` (a subprocess), `python` (a callable), `noop`."""

from dispatcher.runners.base import LineSink, Outcome, Runner, RunRequest, StepContext
from dispatcher.runners.exec import ExecRunner
from dispatcher.runners.noop import NoopRunner
from dispatcher.runners.process import run_process
from dispatcher.runners.python import PythonRunner, resolve_callable

__all__ = [
    "ExecRunner",
    "LineSink",
    "NoopRunner",
    "Outcome",
    "PythonRunner",
    "RunRequest",
    "Runner",
    "StepContext",
    "resolve_callable",
    "run_process",
]
