"""`python -m minquant ...` is the `minquant` command (minquant/cli.py)."""
import sys

from minquant.cli import main

sys.exit(main())
