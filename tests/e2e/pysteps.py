"""Callables for the e2e tests' `python` runner (the daemon imports them by name)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def leave_a_process(pidfile: str) -> None:
    """Start a `sleep` in a session of its own and return at once: it outlives the step."""
    proc = subprocess.Popen(
        ["sleep", "300"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    Path(pidfile).write_text(f"{proc.pid}\n")
