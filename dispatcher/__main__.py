"""`python -m dispatcher`: the same as the `dispatcher` console script."""

import sys

from dispatcher.cli import main

sys.exit(main())
