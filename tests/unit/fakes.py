"""Fake runners for pipeline and daemon unit tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dispatcher.models import AttemptStatus
from dispatcher.runners.base import Outcome, RunRequest


def ok() -> Outcome:
    return Outcome(AttemptStatus.SUCCEEDED, exit_code=0)


def failed(code: int = 1) -> Outcome:
    return Outcome(AttemptStatus.FAILED, exit_code=code, error=f"exited with status {code}")


@dataclass
class ScriptedRunner:
    """Answers scripted outcomes in order (success once the script runs out)."""

    name: str
    script: list[Outcome] = field(default_factory=list)
    gate: asyncio.Event | None = None
    calls: list[RunRequest] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0
    peak: int = 0
    effects: bool = True

    async def run(self, request: RunRequest) -> Outcome:
        self.calls.append(request)
        self.started.set()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            return self.script.pop(0) if self.script else ok()
        finally:
            self.running -= 1


class CrashingRunner:
    name = "crash"
    effects = True

    async def run(self, request: RunRequest) -> Outcome:
        raise RuntimeError("boom")
