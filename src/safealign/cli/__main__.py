"""`python -m safealign.cli ...`: the same as the `safealign` command."""

import sys

from . import main

sys.exit(main())
