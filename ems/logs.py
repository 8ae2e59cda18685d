"""Log output of EMS services: plain text lines or one JSON object per line.

`ems serve` and `ems manage serve` call configure() once, after parsing their options. In
JSON mode every record becomes one line with the fields time (UTC, ISO 8601), level,
component (the logger name), node_id and message. The ids a log call passes in `extra=`
(cluster, account, credential, key, peer and any other) are added as fields, and so is the
exception text when the record carries one. Uncaught exceptions, those of threads and
Python warnings go through logging too, so nothing else writes to stderr after configure().
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; any other attribute came from `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
# Fields the formatter writes itself; an `extra=` entry of the same name is dropped.
_CORE_FIELDS = ("time", "level", "component", "node_id", "message", "exception", "stack")


def default_format() -> str:
    """Return EMS_LOG_FORMAT, or "text" when it is unset or empty."""
    return os.environ.get("EMS_LOG_FORMAT") or "text"


def add_arguments(parser) -> None:
    """Add --log-format and --log-level to an argparse parser."""
    parser.add_argument("--log-format", default=default_format(), choices=FORMATS,
                        help="text lines, or json: one JSON object per line with time, level, "
                             "component, node_id, message and ids (default: EMS_LOG_FORMAT or "
                             "text)")
    parser.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO, WARNING or ERROR (default INFO)")


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON. node_id is the daemon's id, or None for a
    service that has none (the management service)."""

    def __init__(self, node_id: str | None = None):
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry = {"time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname, "component": record.name,
                 "node_id": self.node_id, "message": record.getMessage()}
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and name not in _CORE_FIELDS:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an id passed as bytes or a dataclass still yields one valid line.
        return json.dumps(entry, default=str)


def configure(log_format: str, level: str, node_id: str | None = None) -> None:
    """Send every log record to stderr in `log_format` ("text" or "json") at `level`.

    Raises ValueError naming an unknown format or level.
    """
    if log_format not in FORMATS:
        raise ValueError(f"invalid log format {log_format!r}; expected text or json")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"invalid log level {level!r}; expected DEBUG, INFO, WARNING or ERROR")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node_id) if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # kazoo warns on every reconnect attempt; ems.cluster.membership logs an outage once.
    logging.getLogger("kazoo.client").setLevel(logging.ERROR)

    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception


def _log_uncaught(kind, value, traceback) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("ems").critical("uncaught exception", exc_info=(kind, value, traceback))


def _log_thread_exception(args) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger("ems").error("uncaught exception in thread %s", name,
                                   exc_info=(args.exc_type, args.exc_value,
                                             args.exc_traceback))
