"""`python -m dpcompile ...`: the dpcompile command line (dpcompile/cli.py)."""
import sys

from .cli import main

sys.exit(main())
