"""The program's entry: `python -m dispatcher` and the `dispatcher` console script."""

from __future__ import annotations

import os
import sys


def main() -> int:
    # Two costs other packages put on every start, for features this program never
    # uses (each command is a new process, so they add up; see docs/benchmarks.md):
    # - pydantic scans the metadata of every installed package for its plugins;
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    # - structlog imports rich, where it is installed, for pretty tracebacks; our log
    #   lines are one line each and name `plain_traceback`.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

    from dispatcher.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
