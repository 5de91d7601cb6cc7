"""The PostgreSQL backend: one database shared by several daemons."""

from dispatcher.store.postgres.store import PostgresStore, redact

__all__ = ["PostgresStore", "redact"]
