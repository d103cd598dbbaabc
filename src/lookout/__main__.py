"""`python -m lookout` runs the same command line as `lookout`."""

import sys

from lookout.cli import main

sys.exit(main())
