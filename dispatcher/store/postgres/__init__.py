"""The PostgreSQL backend: one database shared by several daemons."""

from dispatcher.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
