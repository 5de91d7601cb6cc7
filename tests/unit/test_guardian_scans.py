"""The guardian's scan for a step's leftovers: over only after two empty scans in a row.

A process in the middle of an exec cannot have its environment read for a moment, so
one scan can miss it; the guardian must not stop at that one.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Collection, Iterator

import pytest

from dispatcher.runners.orphan_guard import guardian


def test_a_leftover_missed_by_one_scan_is_found_by_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = secrets.token_hex(16)
    env = {**os.environ, guardian.STEP_VARIABLE: token}
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        real = guardian.carriers_of
        scans: list[int] = []

        def first_scan_misses(
            needles: Collection[bytes], proc: str = "/proc"
        ) -> Iterator[tuple[int, bytes]]:
            scans.append(len(scans))
            if len(scans) == 1:
                return iter(())  # its environment could not be read just then
            return real(needles, proc)

        monkeypatch.setattr(guardian, "carriers_of", first_scan_misses)
        killed = guardian.kill_steps({token.encode(): b"flaky"})

        assert killed == 1
        assert leftover.wait(5) == -9  # SIGKILL
        assert len(scans) >= 4  # miss, find, then two empty scans in a row
    finally:
        leftover.kill()
        leftover.wait()
