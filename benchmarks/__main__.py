"""`python -m benchmarks`: the whole suite (see `benchmarks/run.py`)."""

import sys

from .run import main

sys.exit(main())
