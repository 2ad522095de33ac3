"""`python -m server`: the same as `letstalk serve`."""

import sys

from .app import main

sys.exit(main())
