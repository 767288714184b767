"""Content-Transfer-Encoding decoders for MIME bodies, and uuencoded lines.

Owns: turning one body's bytes into its content under the body's
Content-Transfer-Encoding (RFC 2045 §6: identity, base64, quoted-printable,
and the non-standard uuencode names), and decoding the lines of a uuencoded
block; each decode reports an error (no usable content) apart from a defect
(content obtained, something was wrong).

Must never: raise on malformed input, decide what a decoded body is (that is
``smtpgw.mime``'s walk), or look at header fields other than the encoding name
it is given.

Decisions (documented behaviour):
* base64 (RFC 2045 §6.8): characters outside the alphabet are ignored (a
  defect), as the RFC says and mail readers do; a body of pure base64 whose
  data ends in a quantum of a single character was cut short and makes the
  object ``error`` (with foreign characters mixed in, the stray character is
  dropped as noise).
  Missing padding and data after padding (concatenated encodings, list
  footers) are defects only; every segment after padding is decoded too.
* quoted-printable (RFC 2045 §6.7) is decoded leniently, as mail readers do:
  a bad ``=XY`` escape stays literal and is recorded as a defect, never an error.
* An unknown Content-Transfer-Encoding is decoded as identity (RFC 2045 §6.4
  says to treat the part as application/octet-stream); a defect is recorded.
"""

from __future__ import annotations

import binascii
import re

__all__ = [
    "IDENTITY_ENCODINGS",
    "UU_BEGIN",
    "UU_END",
    "decode_base64",
    "decode_transfer",
    "decode_uu_lines",
]

IDENTITY_ENCODINGS = {"", "7bit", "8bit", "binary"}  # RFC 2045 §6.2: no decoding
UU_BEGIN = re.compile(rb"^begin +([0-7]{1,4}) +([^\r\n]+?)\r?$", re.MULTILINE)
UU_END = re.compile(rb"^end[ \t]*\r?$", re.MULTILINE)

_B64_INVALID = re.compile(rb"[^A-Za-z0-9+/=]")
_B64_SPACE = b" \t\r\n\f\v"
_QP_BAD_ESCAPE = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r?\n|[ \t]*\r?$)", re.MULTILINE)
_UUENCODE = {"x-uuencode", "uuencode", "x-uue", "uue"}


def decode_base64(body: bytes) -> tuple[bytes | None, str]:
    """(data, problem); data is None when the encoding is truncated (RFC 2045 §6.8)."""
    cleaned = body.translate(None, _B64_SPACE)
    problems: list[str] = []
    if _B64_INVALID.search(cleaned):
        # RFC 2045 §6.8: characters outside the alphabet are to be ignored
        problems.append("characters outside the base64 alphabet ignored")
        cleaned = _B64_INVALID.sub(b"", cleaned)
    segments = re.split(rb"=+", cleaned)
    if len(segments[0]) % 4 == 1 and not problems:
        # clean base64 that ends mid-quantum was cut short in transfer; with
        # foreign characters mixed in (list footers) the stray one is noise
        return None, "truncated base64 (a final quantum of one character)"
    if any(segments[1:]):
        problems.append("base64 data after padding")
    out = bytearray()
    for segment in segments:
        segment = segment[: len(segment) - 1] if len(segment) % 4 == 1 else segment
        out += binascii.a2b_base64(segment + b"=" * (-len(segment) % 4))
    return bytes(out), "; ".join(problems)


def decode_uu_lines(lines: list[bytes]) -> bytes | None:
    """Decode uuencoded lines; None when a line cannot be decoded."""
    out = bytearray()
    for line in lines:
        line = line.rstrip(b"\r\n")
        if not line:
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Some encoders pad lines oddly; decode just the declared length
            # (the same workaround CPython's uu module used).
            nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out += binascii.a2b_uu(line[:nbytes])
            except binascii.Error:
                return None
    return bytes(out)


def decode_transfer(cte: str, body: bytes) -> tuple[bytes | None, str, str]:
    """(data, error, defect) for one body under its Content-Transfer-Encoding."""
    if cte in IDENTITY_ENCODINGS:
        return body, "", ""
    if cte == "base64":
        data, problem = decode_base64(body)
        return (None, problem, "") if data is None else (data, "", problem)
    if cte == "quoted-printable":
        defect = "invalid quoted-printable escape" if _QP_BAD_ESCAPE.search(body) else ""
        return binascii.a2b_qp(body), "", defect
    if cte in _UUENCODE:
        begin = UU_BEGIN.search(body)
        lines = body[begin.end() if begin else 0 :].splitlines()
        ending = next((i for i, line in enumerate(lines) if UU_END.match(line)), len(lines))
        data = decode_uu_lines(lines[:ending])
        return (None, "undecodable uuencoded body", "") if data is None else (data, "", "")
    return body, "", f"unknown Content-Transfer-Encoding {cte!r} read as binary"
