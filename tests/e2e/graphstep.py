"""A step for the graph e2e tests: records its own start and end like `step.py`, and
what it was given (argv and the DISPATCHER_* context) as a JSON line beside.

usage: graphstep.py LOG LABEL SECONDS [RESULT_JSON [FAIL_ON_ATTEMPTS]] [-- ARG...]

SECONDS may be `FIRST/LATER`: sleep FIRST on attempt 1, LATER on the others.
RESULT_JSON (`-` for none) is written to $DISPATCHER_RESULT; FAIL_ON_ATTEMPTS (e.g.
`1` or `1,2`) makes those attempts exit 3.
"""

import json
import os
import sys
import time

from step import record  # type: ignore[import-not-found]  # a sibling script


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    log, label, seconds = argv[0], argv[1], argv[2]
    result = argv[3] if len(argv) > 3 else "-"
    fail_on = set(argv[4].split(",")) if len(argv) > 4 else set()
    attempt = os.environ.get("DISPATCHER_ATTEMPT", "1")
    first, _, later = seconds.partition("/")
    record(log, "start", label)
    facts = {
        "label": label,
        "argv": extra,
        "env": {k: v for k, v in os.environ.items() if k.startswith("DISPATCHER_")},
    }
    with open(log + ".json", "a") as out:
        out.write(json.dumps(facts) + "\n")
    time.sleep(float(first if attempt == "1" or not later else later))
    if result != "-":
        with open(os.environ["DISPATCHER_RESULT"], "w") as out:
            out.write(result)
    record(log, "end", label)
    return 3 if attempt in fail_on else 0


if __name__ == "__main__":
    sys.exit(main())
