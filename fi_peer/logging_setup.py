"""Process logging for the CLI and the daemon: readable text by default, JSON lines on request.

``configure(level, fmt)`` replaces the root handler (stderr). ``fmt`` is
``"text"`` (``2026-11-27 04:40:52,123 INFO fi_peer.daemon: ...``) or ``"json"``:
one object per line with ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger``, ``msg`` (the formatted message), ``pid``, ``exc`` when an exception
is attached, and any ``extra={...}`` fields given to the logging call, so a log
shipper can index them without parsing sentences. The format comes from
``--log-format`` or ``$FI_PEER_LOG_FORMAT``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENV_VAR = "FI_PEER_LOG_FORMAT"
_HANDLER_NAME = "fi-peer"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (never raises on an odd ``extra`` value)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def default_format() -> str:
    """``$FI_PEER_LOG_FORMAT`` if it names a format, else text."""
    value = os.environ.get(ENV_VAR, "text").strip().lower()
    return value if value in FORMATS else "text"


def configure(level: int, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record of ``level`` and above to ``stream`` (stderr) as ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):  # only ours: a test harness's capture handler stays
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
