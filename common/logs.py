"""Log output of both daemons: plain text on a terminal, syslog priority prefixes under journald,
or one JSON object per line for log shippers.

``auto`` picks ``journal`` when stderr is the journal's stream (systemd sets JOURNAL_STREAM to
its ``device:inode``), else ``text``. journald reads a ``<N>`` prefix as the line's priority
and stamps the time itself, so ``journalctl -p warning`` filters and no time is printed twice.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMATS = ("auto", "text", "journal", "json")
LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# logging level -> syslog priority (sd-daemon(3))
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    return next((p for level, p in sorted(_PRIORITY.items(), reverse=True) if levelno >= level), 7)


class JournalFormatter(logging.Formatter):
    """``<6>name: message``; every line of a traceback carries the priority too (journald splits lines)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        text = f"{record.name}: {super().format(record)}"
        return "\n".join(prefix + line for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One object per line: ts (ISO 8601, UTC), level, priority, logger, message, and exc when raised."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "priority": priority(record.levelno),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def under_journal() -> bool:
    """True when stderr is connected to the journal (not merely a child of a service that was)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "auto":
        fmt = "journal" if under_journal() else "text"
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def setup(level: str, fmt: str = "auto") -> None:
    """Configure the root logger: ``level`` (debug … error) in format ``fmt`` (FORMATS) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
