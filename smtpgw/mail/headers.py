"""Byte-exact header editing of a raw RFC 5322 message.

Owns: adding, replacing and removing header fields with values that are
validated and folded here, the Subject prefix, and the RFC 5322 §3.6 checks of
``StrictStandards``. Fields are found as `smtpgw.mail.fields` reads them (the
one header reader: a line that is neither a field nor a continuation ends the
header), so an edit touches the fields every other part sees.

Must never: re-serialise a message through ``email.generator`` (that refolds
and re-encodes untouched parts), or emit a value containing CR, LF or NUL
(header injection, cf. CPython gh-121650): every byte outside the edited field
stays as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.header import Header

from smtpgw.mail import fields

_FIELD_NAME = re.compile(rb"^[!-9;-~]+$")  # RFC 5322 §3.6.8 ftext
_MAX_LINE = 78  # RFC 5322 §2.1.1 SHOULD
_MAX_FIELD_LINE = 998  # RFC 5322 §2.1.1 MUST: at most 998 characters per line


class HeaderValueError(ValueError):
    """A value that cannot be put in a header field safely."""


def line_ending(raw: bytes) -> bytes:
    """The message's own line ending (CRLF or LF), judged by its first line."""
    nl = raw.find(b"\n")
    return b"\r\n" if nl > 0 and raw[nl - 1 : nl] == b"\r" else b"\n"


def header_end(raw: bytes) -> int:
    """Offset just past the header block (after the blank line, or end of input)."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    # the first line ending followed by an empty line; a bare LF one is looked for only before
    # the first CRLF one (in a CRLF message there is none: the search would run to its end)
    crlf = raw.find(b"\n\r\n")
    bare = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 1)
    if bare >= 0:
        return bare + 2
    return crlf + 3 if crlf >= 0 else len(raw)


def _header(raw: bytes) -> fields.Header:
    """The message's header as every part reads it (`smtpgw.mail.fields`)."""
    return fields.split(raw, fields.message_start(raw))


def _fields(raw: bytes) -> list[fields.Field]:
    return _header(raw).fields


def get_raw(raw: bytes, name: str) -> bytes | None:
    """The unfolded raw value of the first ``name`` field, or None."""
    return _header(raw).get(raw, name.lower())


def count(raw: bytes, name: str) -> int:
    key = name.lower()
    return sum(1 for f in _fields(raw) if f.name == key)


def check_value(value: str) -> str:
    """Refuse CR, LF and NUL in a header value (RFC 5322 §2.2: unstructured text)."""
    if any(c in value for c in "\r\n\0"):
        raise HeaderValueError(f"header value contains CR, LF or NUL: {value!r}")
    return value


def render(name: str, value: str, eol: bytes = b"\r\n") -> bytes:
    """One header field, folded at whitespace (RFC 5322 §2.2.3); non-ASCII → RFC 2047."""
    check_value(value)
    if not _FIELD_NAME.match(name.encode("ascii", "replace")):
        raise HeaderValueError(f"bad header field name: {name!r}")
    if value.isascii() and len(name) + 2 + len(value) <= _MAX_LINE:
        return f"{name}: {value}".encode("ascii") + eol  # fits on its line: the folding below keeps it whole
    words = value.split(" ")
    # A word that cannot fit on a line of at most 998 characters (RFC 5322 §2.1.1 MUST; e.g.
    # a long unspaced Subject quoted in a notification) cannot be folded at white space:
    # RFC 2047 encoded words can, as for non-ASCII text.
    too_long = any(len(name) + 2 + len(word) > _MAX_FIELD_LINE for word in words)
    if not value.isascii() or too_long:
        encoded = Header(value, "utf-8", header_name=name).encode(linesep=eol.decode())
        return f"{name}: {encoded}".encode("ascii") + eol
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        candidate = f"{current} {word}"
        if len(candidate) > _MAX_LINE and current.strip() and current != f"{name}:":
            lines.append(current)
            current = f" {word}"
        else:
            current = candidate
    lines.append(current)
    return eol.join(line.encode("ascii") for line in lines) + eol


def prepend(raw: bytes, new: list[tuple[str, str]]) -> bytes:
    """Add fields at the top of the header block (where trace fields go, RFC 5321 §4.4), after
    a leading mbox ``From `` line, which readers skip."""
    eol = line_ending(raw)
    at = fields.message_start(raw)
    return raw[:at] + b"".join(render(n, v, eol) for n, v in new) + raw[at:]


def replace(raw: bytes, name: str, value: str) -> bytes:
    """Replace every ``name`` field with one new field at the first one's place, or prepend it."""
    key = name.lower()
    spans = [(f.start, f.end) for f in _fields(raw) if f.name == key]
    if not spans:
        return prepend(raw, [(name, value)])
    eol = line_ending(raw)
    out = bytearray()
    pos = 0
    for index, (start, end) in enumerate(spans):
        out += raw[pos:start]
        if index == 0:
            out += render(name, value, eol)
        pos = end
    out += raw[pos:]
    return bytes(out)


def field_names(raw: bytes) -> list[str]:
    """The names of the header fields in order (decoded as Latin-1, so any byte survives)."""
    return [raw[f.start : f.value_at - 1].rstrip(b" \t").decode("ascii") for f in _fields(raw)]


def remove(raw: bytes, name: str, when: Callable[[bytes], bool] | None = None) -> bytes:
    """Remove every ``name`` field (with its folded lines) — only those whose unfolded value
    satisfies ``when``, when given; other bytes stay as they were."""
    key = name.lower()
    if key.encode("ascii", "replace") not in raw[:header_end(raw)].lower():
        return raw  # a field name is one run of bytes, in the header: no such field, no header split
    spans = [(f.start, f.end) for f in _fields(raw) if f.name == key and (when is None or when(f.value(raw)))]
    if not spans:
        return raw
    out = bytearray()
    pos = 0
    for start, end in spans:
        out += raw[pos:start]
        pos = end
    out += raw[pos:]
    return bytes(out)


def prefix_subject(raw: bytes, prefix: str) -> bytes:
    """Put ``prefix`` in front of the first Subject once, keeping the Subject's own bytes.

    The original value (encoded words, raw 8-bit text, folding) is not decoded or
    re-encoded. A non-ASCII prefix becomes one RFC 2047 encoded word; when the
    Subject itself starts with an encoded word the prefix's trailing space goes
    inside our encoded word, since white space between two encoded words is not
    displayed (RFC 2047 §6.2). A message without Subject gets one.
    """
    check_value(prefix)
    if not prefix.strip():
        return raw
    eol = line_ending(raw)
    for found in _fields(raw):
        if found.name != "subject":
            continue
        start, end = found.start, found.end
        field = raw[start:end]
        colon = field.find(b":") + 1
        value_at = colon
        while field[value_at : value_at + 1] in (b" ", b"\t"):
            value_at += 1
        rest = field[value_at:]
        if _already_prefixed(rest, prefix):
            return raw
        lead = field[:value_at] if value_at > colon else field[:colon] + b" "
        tag = _prefix_bytes(prefix, rest)
        if rest.strip(b"\r\n") == b"":
            tag = tag.rstrip(b" ")
        line_end = rest.find(b"\n")
        first_line = len(lead) + len(tag) + (line_end if line_end >= 0 else len(rest))
        if first_line > _MAX_FIELD_LINE:
            # RFC 5322 §2.2.3: fold after the prefix; unfolding restores one space.
            tag = tag.rstrip(b" ") + eol + b" "
        return raw[:start] + lead + tag + rest + raw[end:]
    return prepend(raw, [("Subject", prefix.strip())])


def _prefix_bytes(prefix: str, rest: bytes) -> bytes:
    if prefix.isascii():
        return prefix.encode("ascii")
    if rest.startswith(b"=?"):
        return Header(prefix, "utf-8").encode().encode("ascii") + b" "
    stripped = prefix.rstrip(" ")
    return Header(stripped, "utf-8").encode().encode("ascii") + b" " * (len(prefix) - len(stripped))


def _already_prefixed(rest: bytes, prefix: str) -> bool:
    mark = prefix.strip()
    if mark.isascii():
        return rest.startswith(mark.encode("ascii"))
    forms = (Header(mark, "utf-8").encode(), Header(prefix, "utf-8").encode())
    return any(rest.startswith(form.encode("ascii")) for form in forms)


# RFC 5322 §3.6: fields that must appear exactly once / at most once.
_REQUIRED = ("from", "date")
_AT_MOST_ONCE = ("from", "date", "sender", "reply-to", "to", "cc", "bcc", "subject", "message-id",
                 "in-reply-to", "references")


def violations(raw: bytes) -> list[str]:
    """RFC 5322 format violations of the header block (what ``StrictStandards`` refuses)."""
    problems = []
    head = _header(raw)
    names = [f.name for f in head.fields]
    for name in _REQUIRED:
        if name not in names:
            problems.append(f"no {name.title()} field (RFC 5322 §3.6)")
    for name in _AT_MOST_ONCE:
        if names.count(name) > 1:
            problems.append(f"{names.count(name)} {name.title()} fields (RFC 5322 §3.6)")
    if head.stray:
        problems.append("a header line that is not a field (RFC 5322 §2.2)")
    if b"\0" in raw:
        problems.append("a NUL character (RFC 5322 §2.1)")
    return problems
