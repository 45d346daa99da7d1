"""`python -m dpcompile ...`: the dpcompile command line (dpcompile/tools/cli.py)."""
import sys

from .tools.cli import main

sys.exit(main())
