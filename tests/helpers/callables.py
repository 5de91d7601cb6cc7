"""Callables for the python runner's tests, importable as `tests.helpers.callables:NAME`."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel

NOT_CALLABLE = 42
release = threading.Event()


def add(a: str, b: str, *, scale: int = 1) -> int:
    return (int(a) + int(b)) * scale


def echo(*args: Any, **kwargs: Any) -> str:
    return f"args={list(args)} kwargs={dict(sorted(kwargs.items()))}"


def nothing() -> None:
    return None


def huge() -> str:
    return "x" * 100_000


async def async_add(a: str, b: str, *, scale: int = 1) -> int:
    await anyio.lowlevel.checkpoint()
    return (int(a) + int(b)) * scale


async def async_sleep(seconds: str) -> str:
    await anyio.sleep(float(seconds))
    return "woke"


def blocking_wait(seconds: str) -> str:
    """Blocks its thread until `release` is set or `seconds` pass."""
    release.wait(float(seconds))
    return "released"


def fail(message: str) -> None:
    raise ValueError(message)


async def async_fail() -> None:
    raise KeyError("missing")


def multiline_fail() -> None:
    raise RuntimeError("first line\nsecond line")


def exits() -> None:
    raise SystemExit(3)


class Tools:
    @staticmethod
    def double(x: str) -> int:
        return 2 * int(x)

    @classmethod
    async def name(cls) -> str:
        return cls.__name__


class _AsyncCallable:
    async def __call__(self, x: str) -> str:
        return f"called {x}"


async_instance = _AsyncCallable()


def who_am_i(tag: str, context: Any) -> dict[str, Any]:
    """Returns its context as a JSON result (asks for it by naming a parameter so)."""
    return {
        "tag": tag,
        "dispatch_id": context.dispatch_id,
        "task": context.task,
        "step": context.step,
        "attempt": context.attempt,
        "key": context.key,
        "token": context.step_token,
    }


def not_json() -> set[int]:
    return {1, 2}
