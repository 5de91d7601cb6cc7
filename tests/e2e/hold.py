"""A step for the e2e tests that runs until its test lets it go.

usage: hold.py FILE [EXIT_CODE] [MESSAGE]

Waits until FILE exists, prints MESSAGE (if any) on stderr, then exits with EXIT_CODE
(default 0). A test decides when a step ends without guessing how long it takes.
"""

import os
import sys
import time


def main() -> int:
    release = sys.argv[1]
    code = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    while not os.path.exists(release):
        time.sleep(0.02)
    if len(sys.argv) > 3:
        print(sys.argv[3], file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
