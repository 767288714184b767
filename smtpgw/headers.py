"""Byte-exact header editing of a raw RFC 5322 message.

Owns: finding the header block, reading a header's raw value, and adding or
replacing header fields with values that are validated and folded here.

Must never: re-serialise a message through ``email.generator`` (that refolds
and re-encodes untouched parts), or emit a value containing CR, LF or NUL
(header injection, cf. CPython gh-121650): every byte outside the edited field
stays as it was.
"""

from __future__ import annotations

import re
from email.header import Header

_FIELD_NAME = re.compile(rb"^[!-9;-~]+$")  # RFC 5322 §3.6.8 ftext
_MAX_LINE = 78  # RFC 5322 §2.1.1 SHOULD


class HeaderValueError(ValueError):
    """A value that cannot be put in a header field safely."""


def line_ending(raw: bytes) -> bytes:
    """The message's own line ending (CRLF or LF), judged by its first line."""
    nl = raw.find(b"\n")
    return b"\r\n" if nl > 0 and raw[nl - 1 : nl] == b"\r" else b"\n"


def header_end(raw: bytes) -> int:
    """Offset just past the header block (after the blank line, or end of input)."""
    match = re.search(rb"\r?\n\r?\n", raw)
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    return match.end() if match else len(raw)


def _fields(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, name) of each header field; ``end`` includes its line ending."""
    head = raw[: header_end(raw)]
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < len(head):
        nl = head.find(b"\n", pos)
        end = len(head) if nl < 0 else nl + 1
        line = head[pos:end]
        if line.strip(b"\r\n") == b"":
            break
        if line[:1] in (b" ", b"\t") and out:
            start, _, name = out[-1]
            out[-1] = (start, end, name)
        else:
            colon = line.find(b":")
            name = line[:colon].strip().lower() if colon > 0 else b""
            out.append((pos, end, name))
        pos = end
    return out


def get_raw(raw: bytes, name: str) -> bytes | None:
    """The unfolded raw value of the first ``name`` field, or None."""
    key = name.lower().encode("ascii")
    for start, end, fname in _fields(raw):
        if fname == key:
            field = raw[start:end]
            value = field[field.find(b":") + 1 :]
            return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip(b"\r\n").strip()
    return None


def count(raw: bytes, name: str) -> int:
    key = name.lower().encode("ascii")
    return sum(1 for _, _, fname in _fields(raw) if fname == key)


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
    if not value.isascii():
        encoded = Header(value, "utf-8", header_name=name).encode(linesep=eol.decode())
        return f"{name}: {encoded}".encode("ascii") + eol
    words = value.split(" ")
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


def prepend(raw: bytes, fields: list[tuple[str, str]]) -> bytes:
    """Add fields at the top of the header block (where trace fields go, RFC 5321 §4.4)."""
    eol = line_ending(raw)
    return b"".join(render(n, v, eol) for n, v in fields) + raw


def replace(raw: bytes, name: str, value: str) -> bytes:
    """Replace every ``name`` field with one new field at the first one's place, or prepend it."""
    key = name.lower().encode("ascii")
    spans = [(s, e) for s, e, fname in _fields(raw) if fname == key]
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
