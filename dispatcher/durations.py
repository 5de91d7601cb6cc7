"""Durations such as "500ms", "30s", "10m", "12h", "7d" or "1h30m"; pure functions."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
MAX_SECONDS = 100 * 365 * 86400.0
"""A hundred years: longer durations are a mistake (and overflow dates and timers)."""


def parse_duration(text: object) -> float:
    """Seconds in a duration string; `ValueError` with a one-line reason otherwise.

    "0" alone is accepted and means zero. Bare numbers are refused: "30" could be
    seconds or minutes, and a config must not leave that to guessing.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected a duration string such as "30s" or "7d", got {_shown(text)}')
    compact = text.strip().replace(" ", "")
    if compact == "0":
        return 0.0
    if not _WHOLE.fullmatch(compact):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d), "
            'such as "500ms", "30s" or "1h30m"'
        )
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(compact))
    if not seconds <= MAX_SECONDS:  # also catches a sum that overflowed to inf
        raise ValueError(f"invalid duration {_shown(text)}: longer than 100 years")
    return seconds


def _shown(value: object) -> str:
    """A value in a message, cut when long (an int's repr is not built past 40 digits)."""
    if isinstance(value, int) and not -(10**40) < value < 10**40:
        return "a number too large to show"
    text = repr(value)
    return text if len(text) <= 42 else text[:40] + "..."


def format_duration(seconds: float) -> str:
    """A short human form: 0.5 -> "500ms", 90 -> "1m30s", 604800 -> "7d"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
