"""Registries of named kinds: runner types (`dispatcher.runners.base.RUNNER_TYPES`) and
planners (`dispatcher.planners.PLANNERS`).

A kind registers itself in its own module, with one line; the configuration and the
daemon look kinds up here by the name the config gives. A name nobody registered is a
configuration error naming the known ones, never a silent default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


K = TypeVar("K", bound=Named)


class Registry(Generic[K]):
    """Kinds of one sort by name. `load` imports the modules that register the built-in
    kinds; it runs before the first look-up (those modules import the configuration,
    which looks kinds up: loading them on demand keeps the imports acyclic)."""

    def __init__(self, what: str, load: Callable[[], object]) -> None:
        self.what = what
        self._load: Callable[[], object] | None = load
        self._kinds: dict[str, K] = {}

    def register(self, kind: K) -> K:
        """Add `kind` under its name (a name is taken once); answers `kind`."""
        if kind.name in self._kinds:
            raise ValueError(f"{self.what} {kind.name!r} is already registered")
        self._kinds[kind.name] = kind
        return kind

    def unregister(self, name: str) -> None:
        """Remove a kind (tests that register one of their own)."""
        self._kinds.pop(name, None)

    def get(self, name: str) -> K | None:
        self._loaded()
        return self._kinds.get(name)

    def require(self, name: str) -> K:
        """The kind named `name`; `ValueError` saying which names are known."""
        kind = self.get(name)
        if kind is None:
            raise ValueError(self.unknown(name))
        return kind

    def unknown(self, name: object) -> str:
        """The message for a name nobody registered."""
        return f"unknown {self.what} {name!r} (known: {', '.join(self.names())})"

    def names(self) -> list[str]:
        self._loaded()
        return sorted(self._kinds)

    def __iter__(self) -> Iterator[K]:
        self._loaded()
        return iter([self._kinds[name] for name in sorted(self._kinds)])

    def _loaded(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()
