"""The `jq` recipes that the documentation gives for reading the logs.

Every `journalctl ... | jq ...`, `docker logs ... | jq ...`, `podman logs ... | jq ...`
and `scripts/run | jq ...` command in the README, docs/logs.md, docs/deploy.md and
the message of scripts/install-systemd. `tests/e2e/test_log_recipes.py` runs them over
a captured stream; scripts/check-systemd runs them against a real journal.

    python3 tests/helpers/recipes.py     # one recipe a line: FILE<TAB>COMMAND
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("README.md", "docs/logs.md", "docs/deploy.md", "scripts/install-systemd")
_READERS = r"(?:journalctl|docker logs|podman logs|scripts/run)\b"
_RECIPE = re.compile(rf"({_READERS}[^`\n]*?\|\s*jq\b[^`\n]*)")


@dataclass(frozen=True)
class Recipe:
    source: str
    command: str
    """The whole command, as documented (table cells' `\\|` unescaped)."""

    @property
    def reader(self) -> str:
        """What produces the stream (`journalctl -o cat -u dispatcher -f`)."""
        return self.command.split("|", 1)[0].strip()

    @property
    def filters(self) -> str:
        """The rest: `jq ...` and whatever follows it."""
        return self.command.split("|", 1)[1].strip()

    @property
    def journal(self) -> bool:
        return self.reader.startswith("journalctl")


def documented_recipes(root: Path = ROOT) -> list[Recipe]:
    recipes = []
    for source in SOURCES:
        for line in (root / source).read_text().splitlines():
            line = line.replace("\\|", "|")
            recipes += [Recipe(source, m.strip()) for m in _RECIPE.findall(line)]
    return recipes


if __name__ == "__main__":
    for recipe in documented_recipes():
        sys.stdout.write(f"{recipe.source}\t{recipe.command}\n")
