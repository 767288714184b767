"""Plain-text logging in the reference's line format (kmg-spec §7.1).

Owns: the log file (or stderr in the foreground), the line format
``[date time L] queue-id: MESSAGE`` for per-message events and
``[date time L]: MESSAGE`` otherwise (L = first letter of the level), and
reopening the file on HUP so logrotate can move it; ``escape``, the one function
every value written to the log goes through, and the event-line builder that
applies it to each field (``EVENT, name=value, name=<value>, name="value"``).

Must never: raise into the caller because the log file went away, or write a
value taken from a peer (HELO, addresses, Message-ID, a next hop's reply) raw:
no control byte reaches the file, and no value can end its field or line early.
"""

from __future__ import annotations

import logging
import os
import re
import sys

LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_LETTER = {logging.DEBUG: "D", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "C"}

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\"]")
# anything but printable ASCII other than the backslash: looked at one character at a time
_SUSPECT = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
# The field grammar of an event line: fields are separated by ", ", a value is written bare,
# in <...>, in [...] or in "..."; a bare or bracketed value holding one of the characters that
# could end it (or start another field) is written as a quoted string instead (``escape``).
BARE, ANGLE, SQUARE, QUOTED, TEXT = "", "<", "[", '"', "text"
_ENDS = {BARE: ' ,"', ANGLE: ' ,"<>', SQUARE: ' ,"[]'}
_CONVERSION = re.compile(r"%[sd%]")

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
        text = record.getMessage() if getattr(record, "built", False) else free_text(record)
        line = f"[{when} {letter}] {escape(qid)}: {text}" if qid else f"[{when} {letter}]: {text}"
        if record.exc_info:
            trace = self.formatException(record.exc_info).splitlines()
            line += " | " + " | ".join(escape(part, TEXT) for part in trace)
        return line


def free_text(record: logging.LogRecord) -> str:
    """A message that is not an event line: its arguments (a next hop's reply, a HELO name, an
    exception's text) are escaped as text (control bytes as \\xNN, no quoting: free text has no
    fields), numbers are left to their conversions; a message without arguments is escaped whole."""
    args = record.args
    if not args:
        return escape(record.msg, TEXT)
    if isinstance(args, dict):
        safe: object = {key: _text_arg(value) for key, value in args.items()}
    else:
        safe = tuple(_text_arg(value) for value in args)
    try:
        return str(record.msg) % safe
    except (TypeError, ValueError, KeyError):  # a bad format string still logs what it was given
        return escape(f"{record.msg} {args!r}", TEXT)


def _text_arg(value: object) -> object:
    if isinstance(value, (int, float)):
        return value
    return escape(value, TEXT)


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


def escape(value: object, context: str = BARE) -> str:
    """The one function every value written to the log goes through.

    Any character that is not printable (C0 controls, DEL, C1 controls, and the other
    non-printable code points, such as bidirectional overrides and line separators) is
    written as ``\\xNN`` (below U+0100, and a byte that was not UTF-8), ``\\uNNNN`` or
    ``\\UNNNNNNNN`` above, as Python's ``backslashreplace``; a backslash is doubled, so
    an escape cannot be faked; printable text (UTF-8 included) stays readable. Then by
    ``context``, the place the value has in its line: ``QUOTED`` (inside ``"..."``): a
    double quote becomes ``\\"``; ``BARE``, ``ANGLE``, ``SQUARE``: a value holding a space,
    a comma, a double quote or its own brackets is written as a quoted string, so it can
    neither end its field nor add one; ``TEXT`` (free text): escaped only. A list or tuple
    is its items escaped and joined by ``,``.
    """
    if isinstance(value, (list, tuple)):
        return ",".join(escape(item, context) for item in value)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = value if isinstance(value, str) else str(value)
    text = _SUSPECT.sub(_escape_char, text)
    if context == QUOTED:
        return text.replace('"', '\\"')
    ends = _ENDS.get(context)
    if ends is not None and any(c in ends for c in text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _escape_char(found: re.Match[str]) -> str:
    char = found.group()
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): the byte itself
        code -= 0xDC00
    if code < 0x100:
        return f"\\x{code:02x}"
    return char.encode("ascii", "backslashreplace").decode("ascii")  # \\uNNNN, \\UNNNNNNNN


def line(template: str, *args: object) -> str:
    """An event line from its template (our own text: ``%s`` and ``%d`` conversions, ``%%``)
    and its values: each ``%s`` value is escaped for the place the template gives it (after
    ``<``, ``[`` or ``"``, else bare), each ``%d`` value is written as an integer."""
    values = iter(args)

    def convert(found: re.Match[str]) -> str:
        kind = found.group()
        if kind == "%%":
            return "%"
        value = next(values, "")
        if kind == "%d" and isinstance(value, int):
            return str(int(value))
        before = template[found.start() - 1] if found.start() else ""
        return escape(value, before if before in (ANGLE, SQUARE, QUOTED) else BARE)

    return _CONVERSION.sub(convert, template)


Event = tuple[str, list]  # (template, values) of an event line made in a scanner worker, logged by the gateway


def event(qid: str, template: str, *args: object, level: int = logging.INFO) -> None:
    """A per-message event line: RECEIVED, SCANNED, SPLITTED, DELIVERED, BLOCKED, ...,
    built by ``line``: every value escaped, so none can forge a field or a line."""
    events.log(level, line(template, *args), extra={"qid": qid, "built": True})


def quoted(text: str) -> str:
    """Text from a message (file names, virus names) made one line without control characters
    or double quotes, for a header field that quotes it (X-Anti-Virus). Not for the log: there
    every value goes through ``escape``, which keeps what was there, escaped, instead."""
    return " ".join(_UNSAFE.sub(" ", text).split())
