import sys

from minquant.cli import main

sys.exit(main())
