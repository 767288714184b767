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

import functools
import logging
import os
import re
import sys
import time

LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_LETTER = {logging.DEBUG: "D", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E", logging.CRITICAL: "C"}

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\"]")
# anything but printable ASCII other than the backslash: looked at one character at a time
_SUSPECT = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
# The field grammar of an event line: fields are separated by ", ", a value is written bare,
# in <...>, in [...] or in "..."; a bare or bracketed value holding one of the characters that
# could end it (or start another field) is written as a quoted string instead (``escape``).
BARE, ANGLE, SQUARE, QUOTED, TEXT = "", "<", "[", '"', "text"
_END_CHARS = {BARE: ' ,"', ANGLE: ' ,"<>', SQUARE: ' ,"[]'}
_ENDS = {context: re.compile(f"[{re.escape(chars)}]") for context, chars in _END_CHARS.items()}
# per place, the search for a character that ``escape`` would change or quote: a text without
# one (most values: names, addresses, numbers as text) is written as it is, with no other test
_KEPT = {context: re.compile("[^" + "".join(re.escape(chr(c)) for c in range(0x20, 0x7F)
                                             if chr(c) != "\\" and chr(c) not in chars) + "]").search
         for context, chars in {**_END_CHARS, QUOTED: '"', TEXT: ""}.items()}
# a printf conversion as logging uses them: %s, %d, %.1f, %r, %(name)s, %%
_CONVERSION = re.compile(r"%(\([^)]*\))?([-#0 +]*\d*(?:\.\d+)?)([diouxXeEfFgGcrsa%])")

_MISSING = object()

root = logging.getLogger("smtpgw")
events = logging.getLogger("smtpgw.events")


class LineFormatter(logging.Formatter):
    def __init__(self, date_format: str = "%Y-%m-%d", time_format: str = "%H:%M:%S") -> None:
        super().__init__()
        self.stamp = f"{date_format} {time_format}"
        self._second: tuple[int, str] = (-1, "")  # the last second written and its text

    def when(self, created: float) -> str:
        """The date and time of a line (``formatTime`` with our format, which has no part below
        the second: each second is formatted once)."""
        second = int(created)
        if self._second[0] != second:
            self._second = (second, time.strftime(self.stamp, self.converter(created)))
        return self._second[1]

    def event_line(self, levelno: int, qid: str, text: str, created: float) -> str:
        """An event line (``event``) as ``format`` writes it."""
        return f"[{self.when(created)} {_LETTER.get(levelno, 'I')}] {escape(qid)}: {text}"

    def format(self, record: logging.LogRecord) -> str:
        when = self.when(record.created)
        letter = _LETTER.get(record.levelno, "I")
        qid = getattr(record, "qid", None)
        text = record.getMessage() if getattr(record, "built", False) else free_text(record)
        line = f"[{when} {letter}] {escape(qid)}: {text}" if qid else f"[{when} {letter}]: {text}"
        if record.exc_info:
            trace = self.formatException(record.exc_info).splitlines()
            line += " | " + " | ".join(escape(part, TEXT) for part in trace)
        return line


def free_text(record: logging.LogRecord) -> str:
    """A message that is not an event line, rendered by ``render``: its values (a next hop's
    reply, a HELO name, an exception's text) escaped as text (no quoting: free text has no
    fields) unless the message puts them in ``<>``, ``[]`` or ``""``; one without values is
    escaped whole."""
    if not record.args:
        return escape(record.msg, TEXT)
    try:
        return render(str(record.msg), record.args, TEXT)
    except (TypeError, ValueError, KeyError):  # a bad format string still logs what it was given
        return escape(f"{record.msg} {record.args!r}", TEXT)


class BufferedFileHandler(logging.Handler):
    """A log file written in batches: the gateway calls ``flush_all`` a few times a second
    (and at exit); errors and worse are written at once.

    The file is opened with O_APPEND and every write is one ``os.write`` of whole lines, so the
    gateway's processes (its incoming processes, IncomingProcesses) append to one file without
    ever cutting one another's lines."""

    MAX_BUFFERED = 64 * 1024  # characters held before a write, whatever the flush interval

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.lines: list[str] = []
        self.held = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.hold(self.format(record), record.levelno)
        except Exception:
            self.handleError(record)

    def hold(self, text: str, levelno: int) -> None:
        """A formatted line into the batch (the caller holds ``lock``)."""
        text += "\n"
        self.lines.append(text)
        self.held += len(text)
        if levelno >= logging.ERROR or self.held > self.MAX_BUFFERED:
            self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        if not self.lines or self.fd < 0:
            return
        data = "".join(self.lines).encode("utf-8", "backslashreplace")
        self.lines.clear()
        self.held = 0
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write()
            except OSError:
                pass
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        super().close()


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
    if type(value) is str and (kept := _KEPT.get(context)) is not None and kept(value) is None:
        return value  # printable ASCII, no backslash, nothing that ends its field: as it is
    if isinstance(value, (list, tuple)):
        return ",".join(escape(item, context) for item in value)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = value if isinstance(value, str) else str(value)
    if not (text.isascii() and text.isprintable()) or "\\" in text:  # else nothing _SUSPECT matches
        text = _SUSPECT.sub(_escape_char, text)
    if context == QUOTED:
        return text.replace('"', '\\"')
    ends = _ENDS.get(context)
    if ends is not None and ends.search(text):
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
    """An event line from its template (our own text) and its values (``render``): a value that
    the template does not put in ``<>``, ``[]`` or ``""`` is quoted when it holds a separator."""
    return render(template, args, BARE)


def render(template: str, args: tuple[object, ...] | dict[str, object], default: str) -> str:
    """``template % args``, each value escaped for its place (``escape``): a text conversion
    (``%s``, ``%r``) right after ``<``, ``[`` or ``"`` in the template gets that context, any
    other the ``default``; a number conversion formats its number, and a value that is not
    one is written as text. KeyError or TypeError when values and conversions do not agree."""
    literals, conversions = _parsed(template)
    values = iter(args) if isinstance(args, tuple) else iter(())
    out = [literals[0]]
    for (key, spec, kind, place), literal in zip(conversions, literals[1:]):
        value = args[key] if key is not None and isinstance(args, dict) else next(values, _MISSING)
        if value is _MISSING:
            raise TypeError(f"not enough values for {template!r}")
        if kind in "sra":
            text = value if kind == "s" else repr(value) if kind == "r" else ascii(value)
            out.append(escape(text, place or default))
        else:
            try:
                out.append(spec % (value,))
            except (TypeError, ValueError):
                out.append(escape(value, default))
        out.append(literal)
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _parsed(template: str) -> tuple[list[str], list[tuple[str | None, str, str, str]]]:
    """A template cut at its conversions: the literal texts (``%%`` made ``%``) around them, and
    per conversion its mapping key, its spec without the key, its kind and the place it has
    (``<``, ``[`` or ``"`` right before it, else "")."""
    literals, conversions, text, pos = [], [], "", 0
    for found in _CONVERSION.finditer(template):
        key, flags, kind = found.groups()
        text += template[pos : found.start()]
        pos = found.end()
        if kind == "%":
            text += "%"
            continue
        before = template[found.start() - 1] if found.start() else ""
        conversions.append((key[1:-1] if key else None, f"%{flags}{kind}", kind,
                            before if before in (ANGLE, SQUARE, QUOTED) else ""))
        literals.append(text)
        text = ""
    literals.append(text + template[pos:])
    return literals, conversions


Event = tuple[str, list]  # (template, values) of an event line made in a scanner worker, logged by the gateway


def event(qid: str, template: str, *args: object, level: int = logging.INFO) -> None:
    """A per-message event line: RECEIVED, SCANNED, SPLITTED, DELIVERED, BLOCKED, ...,
    built by ``line``: every value escaped, so none can forge a field or a line."""
    if not events.isEnabledFor(level):
        return
    handler = _only_file_handler(level)
    if handler is None:
        events.log(level, line(template, *args), extra={"qid": qid, "built": True})
        return
    # the line the logging machinery would write, without a LogRecord (a few per message)
    text = handler.formatter.event_line(level, qid, line(template, *args), time.time())  # type: ignore[union-attr]
    try:
        with handler.lock:  # type: ignore[union-attr]
            handler.hold(text, level)
    except Exception:  # the log file went away: told as ``emit`` tells it (``handleError``)
        handler.handleError(events.makeRecord(events.name, level, "", 0, text, (), None))


def _only_file_handler(level: int) -> BufferedFileHandler | None:
    """The log file's handler when it is where an event line goes and nothing else sees the line
    (the loggers as ``setup`` left them: no filter, no other handler, no propagation further)."""
    handlers = root.handlers
    if len(handlers) != 1 or root.propagate or events.handlers or events.filters or root.filters or not events.propagate:
        return None
    handler = handlers[0]
    if type(handler) is not BufferedFileHandler or handler.filters or level < handler.level:
        return None
    return handler if type(handler.formatter) is LineFormatter else None


def quoted(text: str) -> str:
    """Text from a message (file names, virus names) made one line without control characters
    or double quotes, for a header field that quotes it (X-Anti-Virus). Not for the log: there
    every value goes through ``escape``, which keeps what was there, escaped, instead."""
    return " ".join(_UNSAFE.sub(" ", text).split())
