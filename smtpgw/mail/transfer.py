"""Content-Transfer-Encoding decoders for MIME bodies, and uuencoded lines.

Owns: turning one body's bytes into its content under the body's
Content-Transfer-Encoding (RFC 2045 §6: identity, base64, quoted-printable,
and the non-standard uuencode names), and decoding the lines of a uuencoded
block; each decode reports an error (no usable content) apart from a defect
(content obtained, something was wrong).

Must never: raise on malformed input, take time more than linear in the input
or memory beyond its output and one ``CHUNK`` of work (every decoder reads the
body in pieces: no regular-expression substitution, split or line list over
the whole body), decide what a decoded body is (that is ``smtpgw.mime``'s
walk), or look at header fields other than the encoding name it is given.

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
* No other encodings (yEnc, BinHex) are decoded: their bodies are scanned as
  they are, and clamd reads them itself.
"""

from __future__ import annotations

import binascii
import io
import re
from collections.abc import Iterator

__all__ = [
    "CHUNK",
    "IDENTITY_ENCODINGS",
    "UU_BEGIN",
    "UU_END",
    "decode_base64",
    "decode_transfer",
    "decode_uu",
    "too_large",
]

CHUNK = 64 * 1024  # bytes of encoded input handled per step
IDENTITY_ENCODINGS = {"", "7bit", "8bit", "binary"}  # RFC 2045 §6.2: no decoding
UU_BEGIN = re.compile(rb"^begin +([0-7]{1,4}) +([^\r\n]+?)\r?$", re.MULTILINE)
UU_END = re.compile(rb"^end[ \t]*\r?$", re.MULTILINE)

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_DROPPED = bytes(c for c in range(256) if c not in _B64_ALPHABET + b"=")
_B64_SPACE = b" \t\r\n\f\v"
_QP_BAD_ESCAPE = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r?\n|[ \t]*\r?$)", re.MULTILINE)
MAX_UU_LINE = 128  # characters of a uuencoded line decoded
_UUENCODE = {"x-uuencode", "uuencode", "x-uue", "uue"}


class _Base64:
    """base64 decoded piece by piece; holds at most one unfinished quantum of input.

    The data splits into segments at runs of ``=`` (padding); each segment is
    decoded on its own, a final quantum of one character dropped, a short one padded.
    """

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.pending = b""  # characters of the current segment not yet a whole quantum
        self.first = True  # still in the data before the first padding
        self.first_short = False  # that data ended in a quantum of one character
        self.after_padding = False
        self.foreign = False  # characters outside the alphabet were dropped

    def feed(self, piece: bytes) -> None:
        kept = piece.translate(None, _B64_DROPPED)
        if not self.foreign and len(kept) < len(piece):
            self.foreign = len(piece.translate(None, _B64_SPACE)) > len(kept)
        # a bounded list: the segments of one piece; the last one goes on in the next piece
        head, *rest = kept.split(b"=")
        if head:
            self._data(head)
        if not rest:
            return
        self._end_segment()
        self.after_padding = self.after_padding or any(rest[:-1])
        whole = [segment for segment in rest[:-1] if len(segment) > 1]
        self.out.write(b"".join(map(_decode_segment, whole)))
        if rest[-1]:
            self._data(rest[-1])

    def _data(self, run: bytes) -> None:
        self.after_padding = self.after_padding or not self.first
        text = self.pending + run
        whole = len(text) - len(text) % 4
        if whole:
            self.out.write(binascii.a2b_base64(text[:whole]))
        self.pending = text[whole:]

    def _end_segment(self) -> None:
        if self.first:
            self.first, self.first_short = False, len(self.pending) == 1
        self.out.write(_decode_segment(self.pending))
        self.pending = b""

    def finish(self) -> tuple[bytes | None, str]:
        self._end_segment()
        if self.first_short and not self.foreign:
            # clean base64 that ends mid-quantum was cut short in transfer; with
            # foreign characters mixed in (list footers) the stray one is noise
            return None, "truncated base64 (a final quantum of one character)"
        problems = []
        if self.foreign:
            # RFC 2045 §6.8: characters outside the alphabet are to be ignored
            problems.append("characters outside the base64 alphabet ignored")
        if self.after_padding:
            problems.append("base64 data after padding")
        return self.out.getvalue(), "; ".join(problems)


def too_large(limit: int) -> str:
    """The error of a decode stopped at its ``limit``."""
    return f"decoded content larger than {limit} bytes"


def _decode_segment(segment: bytes) -> bytes:
    """One segment of base64 between paddings: a final quantum of one character holds
    no whole byte and is dropped, a shorter one is padded."""
    if len(segment) % 4 == 1:
        segment = segment[:-1]
    return binascii.a2b_base64(segment + b"=" * (-len(segment) % 4)) if segment else b""


def _pieces(body: bytes) -> Iterator[bytes]:
    """``body`` in ``CHUNK``-sized pieces."""
    for start in range(0, len(body), CHUNK):
        yield body[start : start + CHUNK]


def _line_pieces(body: bytes, start: int = 0, stop: int | None = None, breaks: bytes = b"\n") -> Iterator[memoryview]:
    """``body[start:stop]`` in pieces of about ``CHUNK`` bytes, each ending after one of ``breaks``;
    a longer line is one piece, a view of ``body`` rather than a copy of it."""
    view = memoryview(body)
    size = len(body) if stop is None else stop
    while start < size:
        end = min(start + CHUNK, size)
        if end < size:
            cut = max(body.rfind(bytes((b,)), start, end) for b in breaks)
            if cut < 0:
                ahead = [found for b in breaks if (found := body.find(bytes((b,)), end, size)) >= 0]
                cut = min(ahead, default=size - 1)
            end = cut + 1
        yield view[start:end]
        start = end


def decode_base64(body: bytes) -> tuple[bytes | None, str]:
    """(data, problem); data is None when the encoding is truncated (RFC 2045 §6.8)."""
    decoder = _Base64()
    for piece in _pieces(body):
        decoder.feed(piece)
    return decoder.finish()


def decode_quoted_printable(body: bytes) -> tuple[bytes, str]:
    """(data, defect): RFC 2045 §6.7, whole lines at a time (a soft line break never spans pieces)."""
    out = io.BytesIO()
    defect = ""
    for piece in _line_pieces(body):
        if not defect and _QP_BAD_ESCAPE.search(piece):
            defect = "invalid quoted-printable escape"
        out.write(binascii.a2b_qp(piece))
    return out.getvalue(), defect


def _uu_line(line: bytes) -> bytes | None:
    try:
        return binascii.a2b_uu(line)
    except binascii.Error:
        # Some encoders pad lines oddly; decode just the declared length
        # (the same workaround CPython's uu module used).
        nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
        try:
            return binascii.a2b_uu(line[:nbytes])
        except binascii.Error:
            return None


def decode_uu(data: bytes, start: int = 0, stop: int | None = None, limit: int | None = None) -> tuple[bytes | None, str]:
    """(content, problem) of the uuencoded lines of ``data[start:stop]``.

    Content is None when a line cannot be decoded or the content would pass
    ``limit`` bytes: a line's length character may claim up to 63 bytes
    however short the line is (missing characters decode as zeros), so the
    output is not bounded by the input alone.
    """
    out = io.BytesIO()
    # a piece may end between CR and LF: that adds an empty line, which is skipped
    for piece in _line_pieces(data, start, stop, b"\n\r"):
        # a bounded list: the lines of one piece, or the start of one long line (a line
        # holds at most 63 bytes in 85 characters: what follows can only be ignored)
        lines = bytes(piece).splitlines() if len(piece) <= CHUNK else [bytes(piece[:MAX_UU_LINE])]
        for line in lines:
            if not line:
                continue
            decoded = _uu_line(line)
            if decoded is None:
                return None, "undecodable uuencoded line"
            out.write(decoded)
        if limit is not None and out.tell() > limit:
            return None, too_large(limit)
    return out.getvalue(), ""


def _decode_uu_body(body: bytes, limit: int | None) -> tuple[bytes | None, str]:
    """A body in one of the uuencode encodings: from its ``begin`` line, if any, to its ``end`` line."""
    begin = UU_BEGIN.search(body)
    start = begin.end() if begin else 0
    finish = UU_END.search(body, start)
    return decode_uu(body, start, finish.start() if finish else len(body), limit)


def decode_transfer(cte: str, body: bytes, limit: int | None = None) -> tuple[bytes | None, str, str]:
    """(data, error, defect) for one body under its Content-Transfer-Encoding.

    ``limit`` bounds the decoded size: beyond it there is no data, and the error says so.
    """
    data: bytes | None
    error = defect = ""
    if cte in IDENTITY_ENCODINGS:
        data = body
    elif cte == "base64":
        data, problem = decode_base64(body)
        error, defect = (problem, "") if data is None else ("", problem)
    elif cte == "quoted-printable":
        data, defect = decode_quoted_printable(body)
    elif cte in _UUENCODE:
        data, error = _decode_uu_body(body, limit)
    else:
        data, defect = body, f"unknown Content-Transfer-Encoding {cte!r} read as binary"
    if data is not None and limit is not None and len(data) > limit:
        return None, too_large(limit), defect
    return data, error, defect
