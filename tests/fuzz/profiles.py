"""Hypothesis settings of the fuzz tests, applied to each of them (never loaded as the
global default, which would change every other hypothesis test of the suite too).

`ci` (the default) is derandomized and modest; `deep` digs:

    HYPOTHESIS_PROFILE=deep .venv/bin/pytest tests/fuzz

Tests that go through a real store or process per example take a third as many.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
"""The settings of a fuzz test on pure functions."""

FUZZ_SLOW = settings(FUZZ, max_examples=max(FUZZ.max_examples // 3, 1))
"""The settings of a fuzz test whose examples each go through a store or a process."""

TIMEOUT = pytest.mark.timeout(120 if FUZZ.max_examples <= 150 else 3600)
"""The per-test timeout of the fuzz modules: the suite's 120 s, an hour for `deep`."""
