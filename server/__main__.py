"""`python -m letstalk_rt.server`: the same as `letstalk serve`."""

import sys

from letstalk_rt.errors import engine_not_installed

try:
    from .app import main
except ModuleNotFoundError as e:  # the engine's packages, in an install of the SDK alone: one line saying so
    error = engine_not_installed(e, "python -m letstalk_rt.server")
    if error is None:
        raise
    sys.exit(f"letstalk serve: error: {error}")

sys.exit(main())
