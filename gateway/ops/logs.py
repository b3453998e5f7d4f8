"""The service's logging set-up (``logging.level|format|file``) and task-labelled lines.

Log lines about a task carry its id (``task_id``): ``task_log(logger, id)`` gives an
adapter that sets it, and ``TaskIdFilter`` takes it from messages written
``"task %s ..."``. ``configure_logging`` applies the logging section.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from datetime import datetime
from typing import Any

from funnel_hpc.core.config import LoggingSection

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(task_label)s: %(message)s"
_TASK_IN_MESSAGE = re.compile(r"%[sdr]|\btask %s")


class TaskIdFilter(logging.Filter):
    """Give every record ``task_id`` (None when it is about no task) and ``task_label``.

    A record without one takes the argument of a ``task %s`` in its message, so the
    existing ``log.warning("task %s: ...", task_id)`` lines carry the id too."""

    def filter(self, record: logging.LogRecord) -> bool:
        task_id = getattr(record, "task_id", None)
        if task_id is None and isinstance(record.msg, str) and "task %s" in record.msg:
            args = record.args if isinstance(record.args, tuple) else ()
            index = 0
            for match in _TASK_IN_MESSAGE.finditer(record.msg):
                if match.group(0) == "task %s":
                    task_id = str(args[index]) if index < len(args) else None
                    break
                index += 1
        record.task_id = task_id
        record.task_label = f" [task {task_id}]" if task_id else ""
        return True


def task_log(logger: logging.Logger, task_id: str) -> logging.LoggerAdapter:
    """A logger whose lines carry task_id."""
    return logging.LoggerAdapter(logger, {"task_id": task_id})


def _iso_time(record: logging.LogRecord) -> str:
    """The record's local time with its UTC offset, to the millisecond (RFC 3339)."""
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with an RFC 3339 time (zone included)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, zone included), level, logger, message,
    task_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        task_id = getattr(record, "task_id", None)
        if task_id:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class QuietAlembic(logging.Filter):
    """Alembic's INFO lines only when it changes the schema ("Running upgrade ..."): at
    every start it otherwise says which dialect and DDL mode it found."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("alembic") or record.levelno > logging.INFO:
            return True
        return record.getMessage().startswith(("Running upgrade", "Running downgrade",
                                           "Running stamp"))


def configure_logging(section: LoggingSection) -> None:
    """Root logging from the `logging` section: level, text|json, stderr or a file
    (reopened when logrotate moves it). Raises ValueError naming a bad key."""
    level = section.level.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"logging.level: {section.level!r} is not a log level")
    if section.format not in LOG_FORMATS:
        raise ValueError(f"logging.format must be one of {', '.join(LOG_FORMATS)}, "
                         f"not {section.format!r}")
    handler: logging.Handler = (logging.handlers.WatchedFileHandler(section.file)
                                if section.file else logging.StreamHandler(sys.stderr))
    handler.addFilter(TaskIdFilter())
    handler.addFilter(QuietAlembic())
    handler.setFormatter(JsonFormatter() if section.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
