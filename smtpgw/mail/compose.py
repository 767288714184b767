"""The text parts and boundaries of the messages the gateway writes itself.

Owns: how a text the gateway writes is carried (`encode_text`: 7bit when it can, else UTF-8
quoted-printable, so no part of ours ever needs 8BITMIME), the header fields of such a part
(`text_part_headers`), and multipart boundaries that do not occur in what they enclose
(`new_boundary`). Used by notifications, DSNs and digests (`smtpgw.reports`), the disclaimer
(`smtpgw.mail.disclaimer`) and the placeholder parts of `smtpgw.mail.mime`.

Must never: write an 8-bit byte or a line over 998 octets (RFC 5322 §2.1.1), or a boundary that
the content could end early (RFC 2046 §5.1.1).
"""

from __future__ import annotations

import binascii
import secrets

from smtpgw.mail import headers

__all__ = ["encode_text", "new_boundary", "text_part_headers"]

MAX_LINE = 998  # RFC 5322 §2.1.1


def encode_text(text: str) -> tuple[str, str, bytes]:
    """(charset, Content-Transfer-Encoding, CRLF body) of a text part that stays 7-bit.

    ASCII with lines of at most 998 octets goes as 7bit; anything else as UTF-8 in
    quoted-printable (RFC 2045 §6.7), so the part never needs 8BITMIME.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if text.isascii() and all(len(line) <= MAX_LINE for line in lines):
        return "us-ascii", "7bit", "\r\n".join(lines).encode("ascii")
    encoded = binascii.b2a_qp("\n".join(lines).encode("utf-8"), istext=True)
    return "utf-8", "quoted-printable", encoded.replace(b"\n", b"\r\n")


def text_part_headers(charset: str, cte: str, eol: bytes = b"\r\n") -> bytes:
    return headers.render("Content-Type", f'text/plain; charset="{charset}"', eol) + headers.render(
        "Content-Transfer-Encoding", cte, eol
    )


def new_boundary(content: bytes, prefix: str = "=_smtpgw_") -> str:
    """A multipart boundary that does not occur in ``content`` (RFC 2046 §5.1.1)."""
    while True:
        boundary = f"{prefix}{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in content:
            return boundary
