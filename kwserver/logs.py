"""Logging: text for people, JSON (one object per line, shaped like the reference's) for collectors."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

from kwserver.truncation import bounded

# The reference server's log levels (`--log-level`), as Python logging levels.
LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
          "warn": logging.WARNING, "error": logging.ERROR}


class TextFormatter(logging.Formatter):
    """One line per record; the message and the traceback are bounded (guests choose their length)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = bounded(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return bounded(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"message": bounded(record.getMessage())}
        for key in ("policy_id", "data"):
            if hasattr(record, key):
                value = getattr(record, key)
                fields[key] = bounded(value) if isinstance(value, str) else value
        if record.exc_info:
            fields["exception"] = bounded(self.formatException(record.exc_info))
        return orjson.dumps({
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.replace("WARNING", "WARN"),
            "target": record.name,
            "pid": record.process,
            "fields": fields,
        }).decode()


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])


def gunicorn_log_level(level: str) -> str:
    """gunicorn's names: it has no `trace`, and reads `warn` as `info`."""
    return {"trace": "debug", "warn": "warning"}.get(level, level)
