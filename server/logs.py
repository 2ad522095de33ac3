"""How `letstalk serve` writes its log: lines for a terminal (the default), or one JSON object a line (`--log-format
json`) for a log collector (Loki, Elasticsearch, Cloud Logging, Datadog): a traceback stays inside its record instead
of becoming lines of its own, and the session or render a record is about is a field to filter on (`session_id`,
`render_id`). What the server says by itself (its URL, warnings at start, draining) goes the same way (`say`)."""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ABOUT = re.compile(r"(session|render) %s\b")  # "session %s: closing (%s)": the record is about that session
_said = logging.getLogger("letstalk.serve")
_json = False


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time (UTC, ISO 8601), level, logger, message, session_id / render_id where the
    message is about one, exception (the traceback) where it has one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        about = _ABOUT.match(record.msg) if isinstance(record.msg, str) else None
        if about and isinstance(record.args, tuple) and record.args:
            out[f"{about.group(1)}_id"] = str(record.args[0])
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(log_format: str = "text") -> None:
    """The process's log, as `letstalk serve --log-format` asks (where nothing configured it before: a test's)."""
    global _json
    _json = log_format == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if _json else logging.Formatter(TEXT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if _json:
        logging.captureWarnings(True)  # Python's warnings as records too, not lines of their own
    logging.getLogger("aioice").setLevel(logging.WARNING)  # one line per ICE check otherwise


def say(message: str, level: int = logging.INFO) -> None:
    """What the server says by itself: `letstalk serve: ...` on stderr (`warning: ` before a warning, `error: ` before
    an error), or a record of the "letstalk.serve" logger in JSON."""
    if _json:
        _said.log(level, message)
        return
    mark = "error: " if level >= logging.ERROR else "warning: " if level >= logging.WARNING else ""
    print(f"letstalk serve: {mark}{message}", file=sys.stderr, flush=True)
