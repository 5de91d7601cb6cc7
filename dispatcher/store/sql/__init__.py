"""Named SQL blocks, read once from `queries.sql`.

A block starts with a line `-- name: NAME`; everything up to the next such line is
the statement. `queries.sql` serves SQLite, `postgres.sql` PostgreSQL. Statements
take named parameters (`:now`) only, never formatted values.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>\w+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split `text` into `{name: statement}`; a duplicate name is a `ValueError`."""
    queries: dict[str, str] = {}
    matches = list(_NAME_LINE.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        name = match["name"]
        if name in queries:
            raise ValueError(f"queries.sql: duplicate query name {name!r}")
        queries[name] = text[match.end() : end].strip()
    return queries


@functools.cache
def queries(filename: str = "queries.sql") -> dict[str, str]:
    """Every named statement of `filename` (default: the SQLite store's), loaded once."""
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    return parse_queries(text)


def query(name: str) -> str:
    """The statement called `name` (a `KeyError` names a missing one)."""
    return queries()[name]
