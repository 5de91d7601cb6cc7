"""The short chaos run: scripts/chaos with a few kills must hold every invariant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_chaos_run_holds_every_invariant(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "chaos"),
            *("--kills", "5", "--dispatches", "200", "--seed", "7"),
            *("--workdir", str(tmp_path / "run"), "--max-seconds", "200", "--json", str(report)),
        ],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["figures"]["kills"] == 5
    assert data["figures"]["dispatches"] == 200
    assert all(check["ok"] for check in data["checks"])
