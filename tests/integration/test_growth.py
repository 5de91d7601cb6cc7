"""Growth is bounded: 90 simulated days through the real daemon (scaled down).

Full scale (10,000 dispatches a day) is `scripts/bench growth`; see docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.growth import simulate

DAYS, PER_DAY = 90, 12


async def test_ninety_days_leave_seven_days_of_gate_rows_and_only_real_attempts(
    tmp_path: Path,
) -> None:
    result = await simulate(tmp_path / "growth.db", DAYS, PER_DAY)

    # One `global` row per dispatch; the purge at each midnight keeps the last 7 days.
    assert result.gate_rows <= 7 * PER_DAY
    assert result.gate_rows == 7 * PER_DAY  # and it does not purge too much
    # Retention keeps 30 days of finished dispatches, with their attempts.
    assert result.dispatch_rows == 30 * PER_DAY
    # Every attempt row is one execution the runner really saw: no stub rows.
    assert result.attempt_rows == result.runner_executions_retained == result.dispatch_rows
