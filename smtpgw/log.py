"""Plain-text logging in the reference's line format (kmg-spec §7.1).

Owns: the log file (or stderr in the foreground), the line format
``[date time L] queue-id: MESSAGE`` for per-message events and
``[date time L]: MESSAGE`` otherwise (L = first letter of the level), and
reopening the file on HUP so logrotate can move it.

Must never: raise into the caller because the log file went away.
"""

from __future__ import annotations

import logging
import os
import re
import sys

LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_LETTER = {logging.DEBUG: "D", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "C"}

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\"]")

root = logging.getLogger("smtpgw")
events = logging.getLogger("smtpgw.events")


class LineFormatter(logging.Formatter):
    def __init__(self, date_format: str = "%Y-%m-%d", time_format: str = "%H:%M:%S") -> None:
        super().__init__()
        self.stamp = f"{date_format} {time_format}"

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, self.stamp)
        letter = _LETTER.get(record.levelno, "I")
        qid = getattr(record, "qid", None)
        text = record.getMessage().replace("\n", " ").replace("\r", " ")
        line = f"[{when} {letter}] {qid}: {text}" if qid else f"[{when} {letter}]: {text}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class BufferedFileHandler(logging.FileHandler):
    """A log file written in batches: the gateway calls ``flush_all`` a few times a second
    (and at exit); errors and worse are written at once."""

    def __init__(self, path: str) -> None:
        super().__init__(path, encoding="utf-8", delay=False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            assert self.stream is not None
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= logging.ERROR:
                self.stream.flush()
        except Exception:
            self.handleError(record)


def flush_all() -> None:
    for handler in root.handlers:
        try:
            handler.flush()
        except (OSError, ValueError):
            pass


def setup(path: str | None, level: str = "info", date_format: str = "%Y-%m-%d", time_format: str = "%H:%M:%S",
          echo: bool = False) -> None:
    """(Re)configure the ``smtpgw`` logger; called at start and on HUP.

    Without a log file, lines go to stderr; with one, ``echo`` also copies them
    to stderr (the gateway does so when it runs in the foreground on a terminal).
    The new log file is opened before the old handlers are let go: when it cannot be
    (OSError raised), logging goes on exactly as before.
    """
    handlers: list[logging.Handler] = []
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handlers.append(BufferedFileHandler(path))
    if not path or echo:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(LineFormatter(date_format, time_format))
        root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    root.propagate = False


def event(qid: str, text: str, *args: object, level: int = logging.INFO) -> None:
    """A per-message event line: RECEIVED, SCANNED, SPLITTED, DELIVERED, BLOCKED, ..."""
    events.log(level, text, *args, extra={"qid": qid})


def quoted(text: str) -> str:
    """The inside of a ``name="..."`` field (kmg-spec §7.1: ``status="..."``, ``names="..."``):
    one line without control characters or double quotes, so that text taken from a message
    (file names, addresses, tokens) can neither end the field early nor fake the fields after it."""
    return " ".join(_UNSAFE.sub(" ", text).split())
