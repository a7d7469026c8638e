"""``python -m exponential_euler_solver.benchmark``: the benchmark command (:mod:`.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
