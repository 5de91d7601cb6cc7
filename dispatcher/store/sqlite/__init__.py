"""The SQLite backend: the embedded default, one daemon per database file."""

from dispatcher.store.sqlite.store import SQLiteStore, from_db_time, to_db_time

__all__ = ["SQLiteStore", "from_db_time", "to_db_time"]
