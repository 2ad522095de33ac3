"""The letstalk-rt server: HTTP + WebRTC + websocket API around a `StreamEngine` (see docs/server.md).

`app` (and with it the engine and torch) loads on first use of one of its names: `server.options` (the command line,
`ServerConfig`) is read without it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from letstalk_rt.lazy import lazy_attributes

_LAZY = {"ServerConfig": ".options", "add_serve_arguments": ".options", "create_app": ".app", "serve_main": ".app"}

if TYPE_CHECKING:
    from .app import create_app, serve_main
    from .options import ServerConfig, add_serve_arguments


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = ["ServerConfig", "add_serve_arguments", "create_app", "serve_main"]
