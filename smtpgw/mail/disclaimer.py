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
    head = fields.split(raw, fields.message_start(raw))  # read once: insertion and wrapping never disagree on where it ends
    content_type, boundary = _content_type(raw, head)
    if content_type == "multipart/mixed" and boundary and _has_delimiter(raw, boundary.encode("latin-1"), head.body):
        return _insert_part(raw, boundary.encode("latin-1"), part, eol, head.body)
    # a multipart/mixed without a delimiter line is read as one body: a part added after it
    # would turn that body into a preamble, which readers hide (RFC 2046 §5.1.1)
    return _wrap_mixed(raw, part, eol, head)


def _has_delimiter(raw: bytes, boundary: bytes, body: int) -> bool:
    """Whether the body has a delimiter line of ``boundary`` (RFC 2046 §5.1.1): a part to follow.
    A close-delimiter alone opens no part; readers see the body before it as one text."""
    line = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"[ \t]*\r?$")
    return line.search(raw, body) is not None


def _disclaimer_part(text: str, eol: bytes) -> bytes:
    charset, cte, data = encode_text(text.rstrip("\n"))
    if eol != b"\r\n":
        data = data.replace(b"\r\n", eol)
    head = text_part_headers(charset, cte, eol)
    head += headers.render("Content-Disposition", "inline", eol)
    head += headers.render("Content-Description", "Disclaimer", eol)
    return head + eol + data


def _content_type(raw: bytes, head: fields.Header) -> tuple[str, str | None]:
    """(type, boundary) of the message's Content-Type; a boundary that is not valid syntax is None."""
    declared = fields.content_type(head.get(raw, "content-type"))
    boundary = declared.boundary
    if boundary is not None and not _BOUNDARY.fullmatch(boundary):
        boundary = None
    return declared.type, boundary


def _insert_part(raw: bytes, boundary: bytes, part: bytes, eol: bytes, start: int) -> bytes:
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


def _wrap_mixed(raw: bytes, part: bytes, eol: bytes, head: fields.Header) -> bytes:
    """A new multipart/mixed: the Content-* fields (RFC 2045 §9) go with the original content
    into its first part, the other fields stay at the top, each field's bytes as they were."""
    body = raw[head.body :]
    mbox_from = raw[: fields.message_start(raw)]  # a leading mbox From line stays first
    content = [_field_bytes(raw, f, eol) for f in head.fields if f.name.startswith("content-")]
    top = [_field_bytes(raw, f, eol) for f in head.fields if not f.name.startswith("content-")]
    if head.first("mime-version") is None:
        top.append(headers.render("MIME-Version", "1.0", eol))
    boundary = new_boundary(raw)
    top.append(headers.render("Content-Type", f'multipart/mixed; boundary="{boundary}"', eol))
    inner_cte = (head.get(raw, "content-transfer-encoding") or b"").lower()
    if inner_cte in (b"8bit", b"binary"):
        top.append(headers.render("Content-Transfer-Encoding", inner_cte.decode(), eol))
    elif not body.isascii():
        top.append(headers.render("Content-Transfer-Encoding", "8bit", eol))  # RFC 2045 §6.4
    delimiter = b"--" + boundary.encode("ascii")
    return b"".join(
        [
            mbox_from, *top, eol,
            b"This is a multi-part message in MIME format.", eol,
            delimiter, eol, *content, eol, body, eol,
            delimiter, eol, part, eol,
            delimiter, b"--", eol,
        ]
    )


def _field_bytes(raw: bytes, found: fields.Field, eol: bytes) -> bytes:
    """A field's bytes, continuation lines included, ending a line."""
    chunk = raw[found.start : found.end]
    return chunk if chunk.endswith(b"\n") else chunk + eol
