"""Errors a user of letstalk-rt can act on.

Every error carries one line saying what is wrong and how to fix it; the CLI prints exactly that line
and exits non-zero. Lower layers raise these instead of letting raw library exceptions escape.
"""

from __future__ import annotations


class LetsTalkError(Exception):
    """Base class: the message is one line, written for the person running the program."""


class InputError(LetsTalkError):
    """A file or argument given by the user cannot be used (wrong format, empty, unreadable)."""


class NoFaceError(InputError):
    """The portrait image holds no detectable frontal face."""


class ModelError(LetsTalkError):
    """A model directory is missing, incomplete or does not match the code's configuration."""


class OutputError(LetsTalkError):
    """The output path cannot be written."""


class Stopped(KeyboardInterrupt):
    """Stopped on request (Ctrl-C, SIGTERM) with what was done kept: the message (empty on a training run's other
    ranks) says what was kept and how to go on. A KeyboardInterrupt, so code that stops on Ctrl-C stops on it too."""


# The import names of the `[engine]` extra's packages (pyproject.toml), with the name pip installs each by: what a
# torch-free install (`pip install letstalk-rt`: the SDK, `letstalk camera --server`) lacks.
ENGINE_PACKAGES = {"torch": "torch", "einops": "einops", "safetensors": "safetensors", "transformers": "transformers",
                   "skimage": "scikit-image", "tqdm": "tqdm", "pi_heif": "pi-heif"}


class EngineNotInstalledError(LetsTalkError, ModuleNotFoundError):
    """The model and its engine were asked for in an install of the SDK alone (`pip install letstalk-rt`, without
    `[engine]`). Also a ModuleNotFoundError, so that code that tries an import and falls back still does."""


def engine_not_installed(error: ModuleNotFoundError, what: str) -> EngineNotInstalledError | None:
    """The error to raise for `error` when it is one of the engine's packages missing (None when it is another
    module): `what` (e.g. "letstalk demo") needs the engine, and the line says how to install it."""
    top = (error.name or "").partition(".")[0]
    if top not in ENGINE_PACKAGES:
        return None
    return EngineNotInstalledError(
        f"{what} needs the engine (the model and what runs it), which this install lacks ({ENGINE_PACKAGES[top]} is "
        "not installed: `pip install letstalk-rt` alone is the SDK). Install the engine: `bash scripts/setup.sh` in a "
        "checkout (it picks torch's CPU or CUDA build), or `pip install 'letstalk-rt[engine]'` after installing the "
        "torch build you want",
        name=error.name)
