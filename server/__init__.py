"""The letstalk-rt server: HTTP + WebRTC + websocket API around a `StreamEngine` (see docs/server.md)."""

from .app import add_serve_arguments, create_app, serve_main
from .sessions import ServerConfig

__all__ = ["ServerConfig", "add_serve_arguments", "create_app", "serve_main"]
