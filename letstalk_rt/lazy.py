"""Names a package imports on first use (PEP 562), so that importing the package for its light parts does not load its
heavy ones (the engine, and with it torch)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from .errors import engine_not_installed


def lazy_attributes(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: each of `names` is imported from its module (relative to `package`) when
    first used, and kept in the package. In an install of the SDK alone (no torch), the engine's names raise
    EngineNotInstalledError, saying how to install it."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            imported = importlib.import_module(module, package)
        except ModuleNotFoundError as e:
            raise (engine_not_installed(e, f"{package}.{name}") or e) from e
        value = getattr(imported, name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
