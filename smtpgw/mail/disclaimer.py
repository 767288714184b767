"""The disclaimer (kmg-spec §5.4): a text/plain part added to a message, every other byte kept.

Owns: where the part goes (just before the close-delimiter of a multipart/mixed message, or,
for anything else, a new multipart/mixed whose first part is the original content), and the
part itself (`add_disclaimer`). The text comes from disclaimer.tmpl
(`smtpgw.reports.notify.render_disclaimer`); the header is read as every other part reads it
(`smtpgw.mail.fields`).

Must never: re-serialise the original message through ``email.generator``, change a byte of
the parts already there, or raise on a malformed message.
"""

from __future__ import annotations

import re

from smtpgw.mail import fields, headers
from smtpgw.mail.compose import encode_text, new_boundary, text_part_headers

__all__ = ["add_disclaimer"]

# RFC 2046 §5.1.1: boundary := 0*69<bchars> bcharsnospace
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def add_disclaimer(raw: bytes, text: str) -> bytes:
    """``raw`` with ``text`` appended as a last text/plain part (kmg-spec §5.4).

    A multipart/mixed message gets the part just before its close-delimiter; anything else
    is wrapped in a new multipart/mixed whose first part is the original content. Bytes of
    the existing parts are kept as they were; the message's own line ending is used.
    """
    eol = headers.line_ending(raw)
    part = _disclaimer_part(text, eol)
    content_type, boundary = _content_type(raw)
    if content_type == "multipart/mixed" and boundary and _has_delimiter(raw, boundary.encode("latin-1")):
        return _insert_part(raw, boundary.encode("latin-1"), part, eol)
    # a multipart/mixed without a delimiter line is read as one body: a part added after it
    # would turn that body into a preamble, which readers hide (RFC 2046 §5.1.1)
    return _wrap_mixed(raw, part, eol)


def _has_delimiter(raw: bytes, boundary: bytes) -> bool:
    """Whether the body has a delimiter line of ``boundary`` (RFC 2046 §5.1.1): a part to follow.
    A close-delimiter alone opens no part; readers see the body before it as one text."""
    line = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"[ \t]*\r?$")
    return line.search(raw, headers.header_end(raw)) is not None


def _disclaimer_part(text: str, eol: bytes) -> bytes:
    charset, cte, data = encode_text(text.rstrip("\n"))
    if eol != b"\r\n":
        data = data.replace(b"\r\n", eol)
    head = text_part_headers(charset, cte, eol)
    head += headers.render("Content-Disposition", "inline", eol)
    head += headers.render("Content-Description", "Disclaimer", eol)
    return head + eol + data


def _content_type(raw: bytes) -> tuple[str, str | None]:
    """(type, boundary) of the Content-Type in the header as the wrapper reads it
    (`smtpgw.mail.fields`: ended by the first line that is not a field), so insertion and
    wrapping never disagree on where it ends; a boundary that is not valid syntax is None."""
    declared = fields.content_type(fields.split(raw).get(raw, "content-type"))
    boundary = declared.boundary
    if boundary is not None and not _BOUNDARY.fullmatch(boundary):
        boundary = None
    return declared.type, boundary


def _insert_part(raw: bytes, boundary: bytes, part: bytes, eol: bytes) -> bytes:
    start = headers.header_end(raw)
    # RFC 2046 §5.1.1: the close-delimiter starts a line; the line ending before it is its own.
    close = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"--[ \t]*(?=\r?\n|\Z)")
    match = close.search(raw, start)
    opener = b"--" + boundary + eol
    if match is None:  # truncated multipart: add the part and the missing close-delimiter
        # RFC 2046 §5.1.1: the line break before a delimiter is the delimiter's, so a new one is
        # written: the last part keeps its own final line break
        return raw + eol + opener + part + eol + b"--" + boundary + b"--" + eol
    at = match.start()
    if at > start and raw[at - 1 : at] == b"\n":
        at -= 2 if raw[at - 2 : at] == b"\r\n" else 1
        return raw[:at] + eol + opener + part + raw[at:]
    return raw[:at] + opener + part + eol + raw[at:]


def _wrap_mixed(raw: bytes, part: bytes, eol: bytes) -> bytes:
    fields, end = _field_chunks(raw, eol)
    body = raw[end:]
    content = [f for f in fields if f[:8].lower() == b"content-"]
    top = [f for f in fields if f[:8].lower() != b"content-"]
    if not any(f[:13].lower() == b"mime-version:" for f in top):
        top.append(headers.render("MIME-Version", "1.0", eol))
    boundary = new_boundary(raw)
    top.append(headers.render("Content-Type", f'multipart/mixed; boundary="{boundary}"', eol))
    inner_cte = next((f.partition(b":")[2].strip().lower() for f in content if f[:26].lower() == b"content-transfer-encoding:"), b"")
    if inner_cte in (b"8bit", b"binary"):
        top.append(headers.render("Content-Transfer-Encoding", inner_cte.decode(), eol))
    elif not body.isascii():
        top.append(headers.render("Content-Transfer-Encoding", "8bit", eol))  # RFC 2045 §6.4
    delimiter = b"--" + boundary.encode("ascii")
    return b"".join(
        [
            *top, eol,
            b"This is a multi-part message in MIME format.", eol,
            delimiter, eol, *content, eol, body, eol,
            delimiter, eol, part, eol,
            delimiter, b"--", eol,
        ]
    )


def _field_chunks(raw: bytes, eol: bytes) -> tuple[list[bytes], int]:
    """(the header fields, continuation lines included, each ending a line; where the body
    starts), as `smtpgw.mail.fields.split` reads the header."""
    head = fields.split(raw)
    chunks = [raw[f.start : f.end] for f in head.fields]
    return [c if c.endswith(b"\n") else c + eol for c in chunks], head.body
