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
