"""`python -m safealign ...`: the same as the `safealign` command."""

import sys

from .cli import main

sys.exit(main())
