"""Persistence. Only this package speaks SQL; everyone else calls `Store` verbs."""

from dispatcher.store.base import Store

__all__ = ["Store"]
