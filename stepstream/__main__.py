"""`python -m stepstream`: the same as the `stepstream` command."""

import sys

from stepstream.cli import main

sys.exit(main())
