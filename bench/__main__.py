"""`python -m bench`: run every measurement, print Markdown tables, write the JSON."""

from __future__ import annotations

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
