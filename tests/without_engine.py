"""Python code that makes a process an install of the SDK alone (`pip install letstalk-rt`, no `[engine]`): put before
a subprocess's own code, it makes every import of the engine's packages fail as a missing package does, so what runs
there cannot lean on one that happens to be installed in the test environment."""

from letstalk_rt.errors import ENGINE_PACKAGES

PRELUDE = f"""
import importlib.abc, sys
class _NoEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in {sorted(ENGINE_PACKAGES)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _NoEngine())
"""
