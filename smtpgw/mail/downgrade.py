"""Conversion of an 8-bit message to 7-bit MIME for a next hop without 8BITMIME.

Owns: deciding whether a message can go to a server that does not offer
8BITMIME as it is (``needs_downgrade``), and producing an equivalent message
whose every byte is 7-bit and every line at most 998 octets (``to_7bit``), as
RFC 6152 §3 requires of a relay ("either convert the message to 7-bit MIME or
fail the delivery").

Must never: re-serialise a message through ``email.generator``, refold or
re-encode a part that is already 7-bit, change any header field other than
Content-Transfer-Encoding (and MIME-Version, see below), guess a charset, or
raise on malformed input. The work is linear in the size of the message
(nesting and part count are bounded).

How a message is converted, entity by entity (RFC 2045 §2.4 "entity"):

* An entity whose bytes are all 7-bit and whose lines are at most 998 octets
  is kept byte for byte.
* A leaf whose body is in an identity encoding (7bit, 8bit, binary or none,
  RFC 2045 §6.2) and needs conversion is re-encoded: text/* as
  quoted-printable (RFC 2045 §6.7, lines of at most 76 characters), any
  other type as base64 (§6.8, 76-character lines). Its Content-Transfer-
  Encoding field is replaced (every copy, by one at the first one's place) or
  appended to its header. A soft line break is never followed by "-" (it is
  written =2D), so no encoded line can pass for a delimiter line (RFC 2046
  §5.1.1).
* A leaf already in a 7-bit encoding is repaired, not re-encoded, in ways every
  decoder reads alike: in quoted-printable each raw 8-bit octet (which lenient
  decoders pass through) becomes its =XX escape (a "=" just before it, which
  can only be literal, becomes =3D) and a line over 998 octets gets soft line
  breaks, never within two octets after "="; in base64 the characters outside
  the alphabet, which decoders ignore (§6.8), are dropped and the rest is
  re-wrapped.
* multipart/* and message/rfc822 are walked into (RFC 2045 §6.4 forbids
  quoted-printable and base64 on composite types); their Content-Transfer-
  Encoding, when present and not 7bit, becomes 7bit. A missing one stays
  missing (7bit is the default, RFC 2045 §6.1).
* In multipart/digest a part without Content-Type is message/rfc822
  (RFC 2046 §5.1.5). message/global and its companions may be encoded
  (RFC 6532 §3.5, RFC 6533 §6) and are converted as leaves (base64).
* A message (top level or encapsulated) that gains a Content-Transfer-Encoding
  field gains ``MIME-Version: 1.0`` if it had none: without it the field has
  no meaning (RFC 2045 §4).

When ``to_7bit`` returns None (the delivery must fail, RFC 6152 §3), the reason
is logged:

* any 8-bit byte in a header field, at any level. Such a message is not an
  8BITMIME message (RFC 6152 covers the body only; raw 8-bit header text needs
  SMTPUTF8, RFC 6532). Its charset is not declared anywhere, so an RFC 2047
  encoded word would carry a guessed charset: a wrong guess silently changes
  the text the recipient reads, and in address fields also the addresses,
  whereas a failed delivery is reported. Nothing is guessed.
* a header line over 998 octets in an entity that needs conversion (it could
  only be shortened by refolding);
* a multipart without a usable boundary (none, empty, or no delimiter line in
  the body), or with a delimiter line over 998 octets;
* an entity that needs conversion but whose header has no blank line after it
  (a line that is neither a field nor a continuation ends the header early;
  where the body starts is a guess) or has a bare CR, or a multipart delimiter
  line next to a bare CR: some readers take a bare CR for a line break, and
  the structure they see is not the one converted;
* a composite entity that needs conversion and declares quoted-printable,
  base64 or an unknown encoding, a leaf with an unknown encoding (RFC 2045
  §6.4: its content is opaque), and message/* types other than rfc822 and the
  message/global family (they hold header fields, RFC 3464 §2, RFC 2046 §5.2);
* a quoted-printable line over 998 octets with no place for a soft break
  (a run of "=");
* nesting deeper than ``MAX_DEPTH`` or more than ``MAX_PARTS`` entities to
  convert.

A missing close delimiter is accepted: the last part runs to the end of the
body, as every reader takes it (at the end of the message, less its last line
break, which the missing delimiter would have taken). A multipart preamble or
epilogue that is 8-bit or has an over-long line is dropped: it has no encoding
of its own, and MIME readers ignore it (RFC 2046 §5.1.1); this is logged.

Line endings: a message whose first line ends in a bare LF is in the local
text form, and every LF (with or without CR) becomes CRLF first. In a CRLF
message only CRLF ends a line; a lone CR or LF inside a re-encoded body is
data (=0D / =0A in quoted-printable, kept in base64), so decoding gives the
bytes a reader of the original would have got. Kept bytes are not touched.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from itertools import chain

from smtpgw.mail import fields, headers

__all__ = ["MAX_DEPTH", "MAX_LINE", "MAX_PARTS", "needs_downgrade", "qp_encode", "to_7bit"]

log = logging.getLogger("smtpgw.mail.downgrade")

MAX_LINE = 998  # RFC 5322 §2.1.1, RFC 5321 §4.5.3.1.6: octets before CRLF
MAX_DEPTH = 32  # nested multiparts and encapsulated messages
MAX_PARTS = 5000  # entities converted per message
CRLF = b"\r\n"

_IDENTITY = frozenset({"", "7bit", "8bit", "binary"})  # RFC 2045 §6.2, RFC 3030
# Encodable message/* types (RFC 6532 §3.5, RFC 6533 §6).
_MESSAGE_LEAVES = frozenset(
    {
        "message/global",
        "message/global-headers",
        "message/global-delivery-status",
        "message/global-disposition-notification",
    }
)
_BASE64_NOISE = bytes(set(range(256)) - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
_B64_LINE = 76  # RFC 2045 §6.8
_QP_LINE = 76  # RFC 2045 §6.7 rule 5, the "=" of a soft line break included
_EIGHT_BIT_RUN = re.compile(rb"=?[\x80-\xff]+")  # with a "=" just before


class _Refused(Exception):
    """The message cannot be made 7-bit without changing its meaning."""


def _has_long_line(data: bytes) -> bool:
    """A line of more than ``MAX_LINE`` octets, not counting its CRLF."""
    lines = data.split(b"\n")
    if max(map(len, lines)) <= MAX_LINE:
        return False
    return any(len(line) - line.endswith(b"\r") > MAX_LINE for line in lines)


def _needs_conversion(data: bytes) -> bool:
    return not data.isascii() or _has_long_line(data)


def _split(data: bytes) -> tuple[fields.Header, int, int, bool]:
    """(the header, where its fields end, where the body starts, whether a blank line or the end
    of the input ends it). A field with white space before its colon (RFC 5322 §4.5) ends it
    with no blank line: readers that do not take the obsolete syntax (CPython's email) see the
    body start there, the others do not, so an entity with one is not converted."""
    found = fields.split(data)
    if found.obsolete_at is not None:
        return found, found.obsolete_at, found.obsolete_at, False
    return found, found.end, found.body, not found.stray


def _transfer_encoding(value: bytes | None) -> str:
    if value is None:
        return ""
    token = re.match(rb"[^\s;(]*", value.strip())
    return token.group(0).decode("ascii").lower() if token else ""


def qp_encode(data: bytes) -> bytes:
    """Quoted-printable text (RFC 2045 §6.7): CRLF is a hard line break; anything else
    that is not printable (lone CR and LF too) an escape; soft breaks keep lines <= 76."""
    return CRLF.join(_qp_encode_line(line) for line in data.split(CRLF))


def _qp_encode_line(line: bytes) -> bytes:
    # With istext=False every LF in b2a_qp's output ends one of its soft breaks "=\n".
    # They never split an escape, but may leave 77 octets on a line or start one with
    # "-": then _qp_wrap places them again.
    pieces = binascii.b2a_qp(line, istext=False).split(b"\n")
    if max(map(len, pieces)) > _QP_LINE or any(piece.startswith(b"-") for piece in pieces[1:]):
        return _qp_wrap(b"".join(piece.removesuffix(b"=") for piece in pieces[:-1]) + pieces[-1])
    return CRLF.join(pieces)


def _qp_repair(body: bytes) -> bytes:
    """A quoted-printable body made 7-bit without re-encoding it: each raw 8-bit octet
    (which lenient decoders pass through) becomes its =XX escape (RFC 2045 §6.7 rule 1)
    and a line over 998 octets gets soft line breaks (rule 5)."""
    escaped = _EIGHT_BIT_RUN.sub(_qp_escape_run, body)
    if not _has_long_line(escaped):
        return escaped
    lines = []
    for line in escaped.split(b"\n"):
        text = line.removesuffix(b"\r")
        if len(text) > MAX_LINE:
            line = _qp_wrap(text) + line[len(text) :]
        lines.append(line)
    return b"\n".join(lines)


def _qp_escape_run(run: re.Match[bytes]) -> bytes:
    # A "=" before an 8-bit octet can only be literal; "==XX" would read as an
    # escaped "=" to some decoders, so it is written =3D.
    octets = run[0]
    lead = b"=3D" if octets.startswith(b"=") else b""
    return lead + b"=" + octets.lstrip(b"=").hex("=").upper().encode("ascii")


def _qp_wrap(text: bytes) -> bytes:
    """``text`` (one encoded line) with soft line breaks (RFC 2045 §6.7 rule 5) after at
    most 76 characters where it can, after at most 998 where it must. A soft break never
    falls within two octets after "=", which would change what an escape (or a literal
    "=") decodes to, and a line it starts never begins with "-", so that it cannot look
    like a multipart delimiter line (RFC 2046 §5.1.1): such a "-" becomes "=2D"."""
    if len(text) <= _QP_LINE:
        return text
    pieces = []
    start = 0
    lead = b""
    while len(lead) + len(text) - start > _QP_LINE:
        cut = _qp_cut(text, start, len(lead))
        if cut is None:
            if len(lead) + len(text) - start > MAX_LINE:
                raise _Refused("quoted-printable line of '=' over 998 octets cannot be broken")
            break
        pieces.append(lead + text[start:cut])
        start, lead = cut, b""
        if text[start : start + 1] == b"-":
            start, lead = start + 1, b"=2D"
    pieces.append(lead + text[start:])
    return b"=\r\n".join(pieces)


def _qp_cut(text: bytes, start: int, lead: int) -> int | None:
    """Where the soft break after ``start`` goes; the line holds ``lead`` octets before."""
    near = start + _QP_LINE - 1 - lead  # the line and its "=" in 76 octets
    far = min(start + MAX_LINE - 1 - lead, len(text))  # ... in 998 octets
    if b"=" not in text[near - 2 : near]:
        return near  # the common case
    for cut in chain(range(near - 1, start, -1), range(near + 1, far)):
        if b"=" not in text[max(cut - 2, 0) : cut]:
            return cut
    return None


def _base64_lines(chars: bytes, body: bytes) -> bytes:
    """Base64 characters in lines of 76 (RFC 2045 §6.8), ending as ``body`` ended."""
    lines = [chars[at : at + _B64_LINE] for at in range(0, len(chars), _B64_LINE)]
    return CRLF.join(lines) + (CRLF if body.endswith(b"\n") else b"")


class _Downgrader:
    def __init__(self) -> None:
        self.parts = 0

    def entity(self, data: bytes, default_type: str, depth: int, is_message: bool, at_end: bool) -> bytes:
        """``data`` as 7-bit, or ``data`` itself when it already is. ``at_end``: it ends
        the message, and no delimiter has taken its last line break."""
        if not _needs_conversion(data):
            return data
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _Refused(f"more than {MAX_PARTS} MIME entities")
        if depth > MAX_DEPTH:
            raise _Refused(f"MIME nesting deeper than {MAX_DEPTH}")
        found, head_end, body_start, separated = _split(data)
        head, separator, body = data[:head_end], data[head_end:body_start], data[body_start:]
        if not head.isascii():
            raise _Refused("8-bit bytes in a header field, charset unknown")
        if _has_long_line(head):
            raise _Refused(f"header line over {MAX_LINE} octets")
        if not separated:
            raise _Refused("no blank line between header and body")
        if head.count(b"\r") != head.count(CRLF):
            # RFC 5322 §2.2: CR only in CRLF. Readers that take a bare CR for a line
            # break see other fields than the rest do.
            raise _Refused("bare CR in the header")
        declared = fields.content_type(found.get(data, "content-type"), default_type)
        content_type, boundary = declared.type, declared.boundary
        encoding = _transfer_encoding(found.get(data, "content-transfer-encoding"))
        if content_type.startswith("multipart/") or content_type == "message/rfc822":
            if encoding not in _IDENTITY:  # RFC 2045 §6.4, RFC 2046 §5.2.1
                raise _Refused(f"{content_type} declares Content-Transfer-Encoding {encoding}")
            if content_type == "message/rfc822":
                body = self.entity(body, "text/plain", depth + 1, True, at_end)
            else:
                body = self.multipart(body, boundary, content_type == "multipart/digest", depth, at_end)
            if encoding not in ("", "7bit"):
                head = _set_encoding(head, "7bit", is_message)
            return head + separator + body
        if content_type.startswith("message/") and content_type not in _MESSAGE_LEAVES:
            raise _Refused(f"8-bit {content_type} holds header fields, charset unknown")
        new_encoding, body = _leaf(body, content_type, encoding)
        return _set_encoding(head, new_encoding, is_message) + separator + body

    def multipart(self, body: bytes, boundary: str | None, digest: bool, depth: int, at_end: bool) -> bytes:
        """Each body part converted, delimiter lines kept (RFC 2046 §5.1.1)."""
        if not boundary or not boundary.isascii():
            raise _Refused("multipart without a usable boundary")
        # RFC 2046 §5.1.1: "--" boundary ["--"] then white space only, on a line of its own.
        # Found also after and before a bare CR, which some readers take for a line break;
        # there the structure is ambiguous and nothing is converted.
        delimiter = re.compile(rb"--" + re.escape(boundary.encode("ascii")) + rb"(--)?[ \t]*(?=[\r\n]|\Z)")
        spans: list[tuple[int, int]] = []  # body parts
        preamble_end = -1
        part_start = -1
        for match in delimiter.finditer(body):
            if match.start() and body[match.start() - 1] not in b"\r\n":
                continue  # not at the start of a line
            if _bare_cr_around(body, match.start(), match.end()):
                raise _Refused("multipart delimiter line next to a bare CR")
            line_break = _line_break_before(body, match.start())  # it belongs to the delimiter
            if preamble_end < 0:
                preamble_end = line_break
            elif part_start >= 0:
                spans.append((part_start, max(part_start, line_break)))
            nl = body.find(b"\n", match.end())
            part_start = len(body) if nl < 0 else nl + 1
            if match.group(1):  # close delimiter: the epilogue follows
                epilogue_start, part_start = part_start, -1
                break
        else:  # no close delimiter: the last part runs to the end...
            epilogue_start = len(body)
            if part_start >= 0:
                # ... less, at the end of the message, the line break the missing
                # delimiter would have taken (as CPython's email reads it).
                end = _line_break_before(body, len(body)) if at_end and body.endswith(b"\n") else len(body)
                spans.append((part_start, max(part_start, end)))
        if not spans:
            raise _Refused("multipart boundary not found in its body")
        default = "message/rfc822" if digest else "text/plain"  # RFC 2046 §5.1.5
        out = [_ignorable(body[:preamble_end], "preamble")]
        kept_from = preamble_end
        for start, end in spans:
            out.append(_delimiters(body[kept_from:start]))
            out.append(self.entity(body[start:end], default, depth + 1, False, False))
            kept_from = end
        out.append(_delimiters(body[kept_from:epilogue_start]))
        out.append(_ignorable(body[epilogue_start:], "epilogue"))
        return b"".join(out)


def _bare_cr_around(body: bytes, start: int, end: int) -> bool:
    before = body[start - 1 : start] if start else b"\n"
    after = body[end : end + 2]
    return before == b"\r" or (after[:1] == b"\r" and after != CRLF)


def _line_break_before(body: bytes, at: int) -> int:
    """Where the CRLF (or LF) ending the line before offset ``at`` starts."""
    if at == 0:
        return 0
    at -= 1
    return at - (body[at - 1 : at] == b"\r")


def _ignorable(text: bytes, where: str) -> bytes:
    """A preamble or epilogue: MIME readers ignore it (RFC 2046 §5.1.1) and it has no
    encoding of its own, so when it is not 7-bit it is dropped."""
    if not _needs_conversion(text):
        return text
    log.info("dropped the 8-bit or over-long multipart %s (%d octets)", where, len(text))
    return b""


def _delimiters(lines: bytes) -> bytes:
    if _has_long_line(lines):
        raise _Refused(f"multipart delimiter line over {MAX_LINE} octets")
    return lines


def _leaf(body: bytes, content_type: str, encoding: str) -> tuple[str | None, bytes]:
    """(the new Content-Transfer-Encoding or None to keep it, the re-encoded body)."""
    if encoding == "base64":
        # RFC 2045 §6.8: characters outside the alphabet are ignored by decoders.
        return None, _base64_lines(body.translate(None, _BASE64_NOISE), body)
    if encoding == "quoted-printable":
        return None, _qp_repair(body)
    if encoding not in _IDENTITY:
        raise _Refused(f"unknown Content-Transfer-Encoding {encoding!r} (RFC 2045 §6.4)")
    if content_type.startswith("text/"):
        return "quoted-printable", qp_encode(body)
    return "base64", _base64_lines(base64.b64encode(body), body)


def _set_encoding(head: bytes, encoding: str | None, is_message: bool) -> bytes:
    """Every Content-Transfer-Encoding field replaced by one at the first one's place, or
    one appended; a message also gets the MIME-Version that gives it meaning (RFC 2045 §4)."""
    if encoding is None:
        return head
    if headers.get_raw(head, "Content-Transfer-Encoding") is not None:
        head = headers.replace(head, "Content-Transfer-Encoding", encoding)
    else:
        head += b"Content-Transfer-Encoding: " + encoding.encode("ascii") + CRLF
    if is_message and headers.get_raw(head, "MIME-Version") is None:
        head += b"MIME-Version: 1.0" + CRLF
    return head


def needs_downgrade(raw: bytes) -> bool:
    """Whether ``raw`` cannot go as it is to a server without 8BITMIME: a byte >= 0x80
    anywhere, or a body line over 998 octets (RFC 6152 §3, RFC 5322 §2.1.1)."""
    if not raw.isascii():
        return True
    if not _has_long_line(raw):
        return False
    return _has_long_line(raw[_split(raw)[2] :])


def to_7bit(raw: bytes) -> bytes | None:
    """An equivalent 7-bit message with lines of at most 998 octets, in CRLF, or None
    when that cannot be done without changing the message's meaning (see the module
    documentation). A conforming message comes back unchanged (in CRLF)."""
    if headers.line_ending(raw) == b"\n":
        raw = re.sub(rb"\r?\n", CRLF, raw)  # the local text form of the message
    try:
        return _Downgrader().entity(raw, "text/plain", 0, True, True)
    except _Refused as refusal:
        log.info("cannot convert the message to 7-bit: %s", refusal)
        return None
