"""`python -m adaptlab` runs the CLI."""

import sys

from adaptlab.cli import main

sys.exit(main())
