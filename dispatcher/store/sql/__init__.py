"""Named SQL blocks, read once per backend.

A block starts with a line `-- name: NAME`; everything up to the next such line is the
statement. `common.sql` (here) holds what SQLite and PostgreSQL both understand; each
backend package adds its own `statements.sql`. Statements take named parameters
(`:now`) only, never formatted values.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>\w+)\s*$", re.MULTILINE)


def parse_queries(text: str, source: str = "queries") -> dict[str, str]:
    """Split `text` into `{name: statement}`; a duplicate name is a `ValueError`."""
    queries: dict[str, str] = {}
    matches = list(_NAME_LINE.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        name = match["name"]
        if name in queries:
            raise ValueError(f"{source}: duplicate query name {name!r}")
        queries[name] = text[match.end() : end].strip()
    return queries


def _read(package: str, filename: str) -> dict[str, str]:
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    return parse_queries(text, f"{package}/{filename}")


@functools.cache
def statements(package: str) -> dict[str, str]:
    """`common.sql` and the `statements.sql` of a backend's `package`, loaded once; a
    name defined in both is a `ValueError`."""
    common = _read(__name__, "common.sql")
    own = _read(package, "statements.sql")
    both = sorted(common.keys() & own.keys())
    if both:
        raise ValueError(f"{package}/statements.sql redefines common statements: {both}")
    return {**common, **own}
