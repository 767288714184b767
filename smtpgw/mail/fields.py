"""Reading a header section: the one field splitter and the one Content-Type reader.

Owns: where an entity's header fields are and where its body starts (``split``), a field's
unfolded value, the Content-Type with its parameters (RFC 2045 §5.1, RFC 2231 continuations
and charsets) and the fallback on a missing or unreadable one, and header bytes decoded as
text. Every part that reads header fields (MIME decomposition, the 7-bit conversion, the
disclaimer, byte-exact header edits) reads them here, so they all see the same fields, the
same body and the same type.

Must never: raise on any input (hostile parameters included), take time or memory more than
linear in the header (parameters, fields kept past ``max_fields`` and decoded names are
bounded), or edit bytes (editing is `smtpgw.mail.headers`).

How a header section is read (RFC 5322 §2.2, as mail readers read it):

* a field starts with a field name (printable ASCII but ":", RFC 5322 §3.6.8), optional
  white space (the obsolete syntax, RFC 5322 §4.5) and ":"; a line starting with a space or
  tab continues the field before it (RFC 5322 §2.2.3);
* an empty line (CRLF or LF) ends the header; the body follows it;
* a line that is neither ends the header early: the body starts at that line (``stray``;
  CPython's ``MissingHeaderBodySeparatorDefect``, and what other readers do), so a field
  written after it is body text for every reader and for us;
* the end of the input ends a header with no body;
* a whole message's header starts past a leading mbox ``From `` line (`message_start`).

The Content-Type fallback, one for every caller (RFC 2045 §5.2): no Content-Type field means
the caller's default (text/plain; charset=us-ascii, or message/rfc822 in a multipart/digest,
RFC 2046 §5.1.5); a field whose type/subtype is not valid syntax is read as text/plain
(``valid`` False: the caller may note the defect). Its parameters are still read (a file
name there still names the part for the attachment filter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

__all__ = ["ContentType", "Field", "Header", "content_type", "decode_charset", "decode_text",
           "message_start", "parameters", "split"]

# RFC 5322 §3.6.8 field-name, obsolete white space before the colon (§4.5), the rest of the
# line, and the continuation lines (§2.2.3): one field
_FIELD = re.compile(rb"([!-9;-~]+)([ \t]*):[^\n]*\n?(?:[ \t][^\n]*\n?)*")
MAX_PARAMETERS = 200  # name=value pairs read from one field
_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")  # RFC 2045 §5.1 token/token


def decode_text(value: bytes) -> str:
    """Header bytes → str: UTF-8 (RFC 6532) when valid, else Latin-1 (never fails)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def decode_charset(raw: bytes, charset: str) -> str:
    """Decode in a charset the message names; unknown or unusable ones → Latin-1."""
    try:
        return raw.decode(charset, "replace")
    except (LookupError, ValueError):  # unknown, not a text codec, NUL in the name
        return raw.decode("latin-1")


# region the header section


class Field(NamedTuple):
    """One header field: lower-case name, and its bytes ``buf[start:end]`` (continuation lines
    and the last line ending included; the value starts at ``value_at``)."""

    name: str
    start: int
    end: int
    value_at: int

    def value(self, buf: bytes) -> bytes:
        """The unfolded value (RFC 5322 §2.2.3), surrounding white space removed."""
        return re.sub(rb"\r?\n", b"", buf[self.value_at : self.end]).strip()


@dataclass
class Header:
    fields: list[Field] = field(default_factory=list)
    end: int = 0  # where the header fields end (the empty line, the stray line or the end)
    body: int = 0  # where the body starts
    blank: bool = False  # an empty line ends the header
    stray: bool = False  # a line that is neither a field nor a continuation ends it
    over: bool = False  # more than ``max_fields`` fields: some were not kept
    # where the first field with white space before its colon starts (RFC 5322 §4.5 obsolete
    # syntax): readers that refuse it (CPython's email) end the header there, with no blank line
    obsolete_at: int | None = None

    def first(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    def get(self, buf: bytes, name: str) -> bytes | None:
        """The unfolded value of the first ``name`` field (lower case), or None."""
        found = self.first(name)
        return None if found is None else found.value(buf)


def message_start(raw: bytes) -> int:
    """Where a message's header starts: past a leading mbox ``From `` line (RFC 4155), which
    is no header field and which mail readers (CPython's email too) and the scanner skip."""
    if not raw.startswith(b"From "):
        return 0
    nl = raw.find(b"\n")
    return len(raw) if nl < 0 else nl + 1


def split(buf: bytes, start: int = 0, end: int | None = None, max_fields: int | None = None,
          keep_beyond: frozenset[str] = frozenset()) -> Header:
    """The header section of the entity in ``buf[start:end]`` (see the module documentation).

    Past ``max_fields`` fields, only the first field of each name in ``keep_beyond`` is kept
    (``over`` says some were dropped): the list stays bounded while the fields readers
    still read there are seen."""
    stop = len(buf) if end is None else end
    head = Header(end=stop, body=stop)
    seen: set[str] = set()
    fields = head.fields
    pos = start
    while pos < stop:
        match = _FIELD.match(buf, pos, stop)  # one field with its continuation lines
        if match is None:
            if buf.startswith(b"\n", pos, stop) or buf.startswith(b"\r\n", pos, stop):  # an empty line
                head.end, head.blank = pos, True
                head.body = buf.index(b"\n", pos) + 1
            else:
                head.end = head.body = pos
                head.stray = True
            return head
        name = match.group(1).decode("ascii").lower()
        if match.end(2) > match.start(2) and head.obsolete_at is None:
            head.obsolete_at = pos
        if max_fields is not None and len(fields) >= max_fields:
            head.over = True
            if name not in keep_beyond or name in seen:
                pos = match.end()
                continue
        fields.append(Field(name, pos, match.end(), match.end(2) + 1))
        seen.add(name)
        pos = match.end()
    return head


# endregion

# region Content-Type and parameters


class ContentType(NamedTuple):
    type: str  # "type/subtype", lower case
    params: dict[str, str]
    valid: bool = True  # False: the field was there but unreadable, and is read as text/plain

    @property
    def boundary(self) -> str | None:
        """The boundary parameter less trailing white space (RFC 2046 §5.1.1: its last
        character is not a space; readers drop one there, CPython's email too), or None."""
        return self.params.get("boundary", "").rstrip() or None


def content_type(value: bytes | None, default: str = "text/plain") -> ContentType:
    """The Content-Type of a field value (None: no field), with the one fallback of the module
    documentation (RFC 2045 §5.2). Never raises."""
    if value is None:
        return ContentType(default, {})
    main, _, rest = decode_text(value).partition(";")
    ctype = main.strip().lower()
    if not _TYPE.fullmatch(ctype):
        return ContentType("text/plain", parameters(rest), False)
    return ContentType(ctype, parameters(rest))


def _tokenize_params(text: str) -> list[tuple[str, str]]:
    """``name=value`` pairs after the first ``;`` (RFC 2045 §5.1), quotes unescaped."""
    out: list[tuple[str, str]] = []
    pos, n = 0, len(text)
    while pos < n and len(out) < MAX_PARAMETERS:
        while pos < n and text[pos] in " \t;":
            pos += 1
        eq = text.find("=", pos)
        semi = text.find(";", pos)
        if eq < 0 or (0 <= semi < eq):
            pos = n if semi < 0 else semi + 1
            continue
        name = text[pos:eq].strip().lower()
        pos = eq + 1
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n and text[pos] == '"':
            value_chars: list[str] = []
            pos += 1
            while pos < n and text[pos] != '"':
                if text[pos] == "\\" and pos + 1 < n:
                    pos += 1
                value_chars.append(text[pos])
                pos += 1
            pos += 1
            value = "".join(value_chars)
        else:
            semi = text.find(";", pos)
            stop = n if semi < 0 else semi
            value = text[pos:stop].strip()
            pos = stop
        if name:
            out.append((name, value))
    return out


def _rfc2231_decode(value: str) -> str:
    """``charset'language'percent-encoded`` → text (RFC 2231 §4)."""
    parts = value.split("'", 2)
    if len(parts) != 3:
        return _percent_decode(value, "us-ascii")
    return _percent_decode(parts[2], parts[0] or "us-ascii")


def _percent_decode(value: str, charset: str) -> str:
    return decode_charset(unquote_to_bytes(value), charset)


def parameters(value: str) -> dict[str, str]:
    """The parameters after a field's first ``;``, RFC 2231 continuations (``name*0``,
    ``name*1*``) joined and decoded; the first of a repeated name wins."""
    simple: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[bool, str]]] = {}
    for name, text in _tokenize_params(value):
        match = re.fullmatch(r"([^*]+)\*(\d{1,3})(\*?)", name)
        if match:
            pieces.setdefault(match.group(1), {})[int(match.group(2))] = (
                bool(match.group(3)),
                text,
            )
        elif name.endswith("*"):
            simple.setdefault(name[:-1], _rfc2231_decode(text))
        else:
            simple.setdefault(name, text)
    for name, numbered in pieces.items():
        charset = "us-ascii"
        joined: list[str] = []
        for index in range(len(numbered)):  # stop at the first gap
            if index not in numbered:
                break
            encoded, text = numbered[index]
            if encoded and index == 0 and text.count("'") >= 2:
                charset, _, text = text.split("'", 2)
                charset = charset or "us-ascii"
            joined.append(_percent_decode(text, charset) if encoded else text)
        simple.setdefault(name, "".join(joined))
    return simple


# endregion
