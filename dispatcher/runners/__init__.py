"""Runners execute steps: `exec` (a subprocess), `python` (a callable), `noop`.

Each runner type is one module of this package that registers it in
`dispatcher.runners.base.RUNNER_TYPES`; `load_modules` imports every module here, so a
new runner type needs no line anywhere else.
"""

import importlib
import pkgutil

from dispatcher.runners.base import (
    RUNNER_TYPES,
    LineSink,
    Outcome,
    Runner,
    RunnerType,
    RunRequest,
    StepContext,
)
from dispatcher.runners.exec import ExecRunner
from dispatcher.runners.noop import NoopRunner
from dispatcher.runners.process import run_process
from dispatcher.runners.python import PythonRunner, resolve_callable


def load_modules() -> None:
    """Import every module of this package (each runner type registers itself)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


__all__ = [
    "RUNNER_TYPES",
    "ExecRunner",
    "LineSink",
    "NoopRunner",
    "Outcome",
    "PythonRunner",
    "RunRequest",
    "Runner",
    "RunnerType",
    "StepContext",
    "load_modules",
    "resolve_callable",
    "run_process",
]
