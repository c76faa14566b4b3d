"""python -m pilot.report RUN_DIR: the report CLI (pilot/report/cli.py)."""

import sys

from pilot.report.cli import main

sys.exit(main())
