"""8-bit to 7-bit MIME conversion for a next hop without 8BITMIME (smtpgw.downgrade).

Decoded content is compared with what CPython's ``email`` package reads from the
original, so "equivalent" is judged by an independent MIME reader.
"""

from __future__ import annotations

import base64
import email
import os
import random
import re
from email.message import Message
from pathlib import Path

import pytest

from smtpgw.mail.downgrade import MAX_DEPTH, needs_downgrade, to_7bit
from tests.support.components import missing
from tests.support.net import CORPUS

HEAD = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
UTF8 = "Grüße aus Köln — naïve café\r\nzweite Zeile\r\n".encode()


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw)


def leaves(raw: bytes) -> list[Message]:
    return [part for part in parse(raw).walk() if not part.is_multipart()]


def payloads(raw: bytes | list[Message]) -> list[bytes]:
    parts = leaves(raw) if isinstance(raw, bytes) else raw
    return [bytes(part.get_payload(decode=True)) for part in parts]


def child(message: Message, index: int) -> Message:
    """The ``index``-th part of a multipart, or the message inside a message/rfc822."""
    part = message.get_payload(index)
    assert isinstance(part, Message)
    return part


def long_lines(raw: bytes) -> list[bytes]:
    return [line for line in raw.split(b"\n") if len(line.removesuffix(b"\r")) > 998]


def assert_7bit(raw: bytes | None) -> bytes:
    assert raw is not None
    assert raw.isascii()
    assert not long_lines(raw)
    return raw


def header_of(raw: bytes) -> bytes:
    return raw[: raw.index(b"\r\n\r\n") + 2]


def multipart(parts: list[bytes], boundary: bytes = b"b0undary", head: bytes = HEAD, subtype: bytes = b"mixed") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    content_type = b"Content-Type: multipart/" + subtype + b'; boundary="' + boundary + b'"\r\n'
    return head + content_type + b"\r\nThis is a multi-part message in MIME format.\r\n" + body + b"--" + boundary + b"--\r\n"


# --- leaves -----------------------------------------------------------------


def test_8bit_text_becomes_quoted_printable_and_decodes_to_the_same_bytes() -> None:
    raw = HEAD + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + UTF8
    assert needs_downgrade(raw)
    out = assert_7bit(to_7bit(raw))
    assert header_of(out) == header_of(raw).replace(b"8bit", b"quoted-printable")
    assert payloads(out) == [UTF8]
    body = out[len(header_of(out)) + 2 :]
    assert body.startswith(b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln")
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))  # RFC 2045 §6.7 rule 5


def test_conforming_message_is_returned_unchanged() -> None:
    raw = HEAD + b"Content-Type: text/plain\r\n\r\nplain ASCII\r\n"
    assert not needs_downgrade(raw)
    assert to_7bit(raw) == raw


def test_message_without_cte_gets_one_at_the_end_of_its_header_and_a_mime_version() -> None:
    raw = b"From: a@example.com\r\nSubject: x\r\n\r\ncaf\xc3\xa9\r\n"
    out = to_7bit(raw)
    assert out == (
        b"From: a@example.com\r\nSubject: x\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"MIME-Version: 1.0\r\n\r\ncaf=C3=A9\r\n"
    )


def test_every_cte_field_is_replaced_by_one_at_the_first_ones_place() -> None:
    raw = (
        b"From: a@example.com\r\nContent-Transfer-Encoding: 8bit\r\nSubject: x\r\n"
        b"content-transfer-encoding:\r\n 8bit\r\nMIME-Version: 1.0\r\n\r\n\xe9\r\n"
    )
    out = to_7bit(raw)
    assert out == (
        b"From: a@example.com\r\nContent-Transfer-Encoding: quoted-printable\r\nSubject: x\r\n"
        b"MIME-Version: 1.0\r\n\r\n=E9\r\n"
    )


def test_binary_attachment_declared_8bit_becomes_base64_with_every_byte() -> None:
    blob = bytes(range(256)) * 40 + b"\r\n\n\r\x00"  # lone CR, LF and NUL are data here
    part = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + blob
    out = assert_7bit(to_7bit(multipart([part])))
    attachment = leaves(out)[0]
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_payload(decode=True) == blob
    assert all(len(line) <= 76 for line in str(attachment.get_payload()).splitlines())  # RFC 2045 §6.8


def test_lone_cr_and_lf_in_8bit_text_survive_as_escapes() -> None:
    text = b"caf\xc3\xa9\rnext\nend  \r\n.\r\nFrom me\r\n"
    raw = HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text
    out = assert_7bit(to_7bit(raw))
    assert payloads(out) == [text]
    assert b"=0D" in out and b"=0A" in out and b"end =20\r\n" in out  # RFC 2045 §6.7 rule 3


def test_quoted_printable_lines_stay_within_76_and_decode_exactly() -> None:
    rng = random.Random(2045)
    alphabet = b"ab -=.\t\xe9\x00\r\n"
    for _ in range(1500):
        text = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        raw = HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text
        out = assert_7bit(to_7bit(raw))
        body = out[out.index(b"\r\n\r\n") + 4 :]
        assert max(len(line) for line in body.split(b"\r\n")) <= 76, text  # RFC 2045 §6.7 rule 5
        assert payloads(out) == [text]


def test_long_lines_in_7bit_text_get_soft_line_breaks() -> None:
    text = b"<p>" + b"word " * 600 + b"</p>\r\nshort\r\n"
    raw = HEAD + b"Content-Type: text/html\r\n\r\n" + text
    assert raw.isascii() and needs_downgrade(raw)
    out = assert_7bit(to_7bit(raw))
    assert leaves(out)[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert b"=\r\n" in out
    assert payloads(out) == [text]


def test_long_line_in_a_header_is_not_a_body_matter() -> None:
    raw = b"From: a@example.com\r\nX-Long: " + b"x" * 1200 + b"\r\n\r\nbody\r\n"
    assert not needs_downgrade(raw)
    assert to_7bit(raw) is None  # it could only be shortened by refolding


def test_quoted_printable_with_raw_8bit_octets_is_repaired_not_reencoded() -> None:
    body = b"caf\xc3\xa9 =3D sign, a literal =\xe9 and a soft =\r\nbreak\r\n"
    raw = HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + body
    out = assert_7bit(to_7bit(raw))
    assert header_of(out) == header_of(raw)
    assert out.endswith(b"\r\n\r\ncaf=C3=A9 =3D sign, a literal =3D=E9 and a soft =\r\nbreak\r\n")
    assert payloads(out) == payloads(raw)


def test_quoted_printable_line_over_998_octets_is_broken_without_splitting_escapes() -> None:
    line = b"=41=42x" * 400
    raw = HEAD + b"Content-Type: application/x-data\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + line + b"\r\n"
    out = assert_7bit(to_7bit(raw))
    assert payloads(out) == payloads(raw) == [b"ABx" * 400 + b"\r\n"]


def test_quoted_printable_line_of_equal_signs_cannot_be_broken() -> None:
    raw = HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + b"=" * 1500 + b"\r\n"
    assert to_7bit(raw) is None


def test_base64_with_8bit_noise_loses_only_the_noise() -> None:
    data = os.urandom(300)
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    noisy = encoded[:40] + b"\xe9\xff" + encoded[40:]
    raw = HEAD + b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" + noisy
    out = assert_7bit(to_7bit(raw))
    assert header_of(out) == header_of(raw)
    assert payloads(out) == [data]


def test_unknown_transfer_encoding_with_8bit_content_is_refused() -> None:
    raw = HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-custom\r\n\r\n\xe9\r\n"
    assert to_7bit(raw) is None


# --- headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        b"Subject: caf\xc3\xa9\r\n",  # unstructured, charset unknown
        b"From: J\xf6rg <joerg@example.com>\r\n",  # address field
        b"To: m\xc3\xbcller@example.de\r\n",
    ],
)
def test_8bit_header_field_is_refused(field: bytes) -> None:
    raw = field + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nascii body\r\n"
    assert needs_downgrade(raw)
    assert to_7bit(raw) is None


def test_8bit_filename_in_a_part_header_is_refused() -> None:
    part = b'Content-Type: application/pdf; name="r\xc3\xa9sum\xc3\xa9.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA'
    assert to_7bit(multipart([part])) is None


def test_bare_cr_in_a_header_is_refused() -> None:
    raw = b"From: a@example.com\r\nX-Note: x\rContent-Type: message/rfc822\r\n\r\n\xe9\r\n"
    assert to_7bit(raw) is None


# --- composite types ------------------------------------------------------------


def test_multipart_converts_the_8bit_part_and_keeps_the_base64_attachment_byte_for_byte() -> None:
    text = b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\nd\xe9j\xe0 vu\r\n"
    attachment = (
        b'Content-Type: application/pdf; name="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
        b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n'
        + base64.encodebytes(os.urandom(2000)).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    )
    raw = multipart([text, attachment])
    out = assert_7bit(to_7bit(raw))
    assert attachment in out
    assert out.startswith(header_of(raw) + b"\r\nThis is a multi-part message in MIME format.\r\n--b0undary\r\n")
    assert payloads(out) == payloads(raw)
    assert leaves(out)[0]["Content-Transfer-Encoding"] == "quoted-printable"


def test_nested_message_rfc822_with_8bit_body() -> None:
    inner = b"From: c@example.org\r\nSubject: fwd\r\n\r\nna\xc3\xafve\r\n"
    rfc822 = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + inner
    raw = multipart([b"Content-Type: text/plain\r\n\r\nsee attached", rfc822])
    out = assert_7bit(to_7bit(raw))
    part = child(parse(out), 1)
    assert part["Content-Transfer-Encoding"] == "7bit"  # RFC 2045 §6.4: composite stays identity
    encapsulated = child(part, 0)
    assert encapsulated["Content-Transfer-Encoding"] == "quoted-printable"
    assert encapsulated["MIME-Version"] == "1.0"  # RFC 2045 §4
    assert payloads(out) == payloads(raw)
    assert b"see attached\r\n--b0undary" in out


def test_multipart_with_8bit_cte_becomes_7bit() -> None:
    head = HEAD + b"Content-Transfer-Encoding: 8bit\r\n"
    raw = multipart([b"Content-Type: text/plain\r\n\r\n\xe9t\xe9"], head=head)
    out = assert_7bit(to_7bit(raw))
    assert parse(out)["Content-Transfer-Encoding"] == "7bit"
    assert payloads(out) == payloads(raw)


def test_digest_parts_default_to_message_rfc822() -> None:
    raw = multipart([b"\r\nFrom: x@example.com\r\nSubject: one\r\n\r\n\xe9t\xe9"], subtype=b"digest")
    out = assert_7bit(to_7bit(raw))
    message = child(child(parse(out), 0), 0)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert payloads(out) == payloads(raw)


def test_multipart_without_boundary_parameter_is_refused() -> None:
    raw = HEAD + b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\n\xe9\r\n--x--\r\n"
    assert to_7bit(raw) is None


def test_multipart_whose_boundary_never_appears_is_refused() -> None:
    raw = HEAD + b'Content-Type: multipart/mixed; boundary="other"\r\n\r\n--x\r\n\r\n\xe9\r\n--x--\r\n'
    assert to_7bit(raw) is None


def test_missing_close_delimiter_leaves_the_last_part_to_the_end() -> None:
    raw = HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\xe9t\xe9\r\n'
    out = assert_7bit(to_7bit(raw))
    assert payloads(out) == payloads(raw) == [b"\xe9t\xe9"]


def test_8bit_preamble_is_dropped_and_parts_kept() -> None:
    raw = multipart([b"Content-Type: text/plain\r\n\r\nhello"]).replace(b"This is a multi-part", b"Ceci est un message \xe0 parties")
    out = assert_7bit(to_7bit(raw))
    assert b"Ceci est" not in out
    assert payloads(out) == [b"hello"]


def test_soft_line_breaks_never_start_a_delimiter_line() -> None:
    # Wherever the soft break falls, "--b" can never begin an encoded line (RFC 2046 §5.1.1).
    escaped = 0
    for pad in range(80):
        text = b"x" * pad + b"\xe9" * 30 + b"--b"
        raw = multipart([b"Content-Type: text/plain\r\n\r\n" + text, b"Content-Type: text/plain\r\n\r\nsecond"], boundary=b"b")
        out = assert_7bit(to_7bit(raw))
        assert payloads(out) == [text, b"second"], pad
        escaped += b"=\r\n=2D-b" in out
    assert escaped  # some break did fall just before "--b"


def test_composite_declared_base64_is_refused() -> None:
    raw = multipart([b"Content-Type: text/plain\r\n\r\n\xe9"], head=HEAD + b"Content-Transfer-Encoding: base64\r\n")
    assert to_7bit(raw) is None


def test_8bit_delivery_status_is_refused_and_message_global_encoded() -> None:
    status = b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; h\xc3\xb4te.example\r\n"
    assert to_7bit(multipart([status], subtype=b"report")) is None
    utf8_message = b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n"
    out = assert_7bit(to_7bit(multipart([b"Content-Type: message/global\r\n\r\n" + utf8_message])))
    assert base64.b64decode(out.split(b"\r\n\r\n")[2].split(b"\r\n--")[0]) == utf8_message  # RFC 6532 §3.5


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    raw = b"Content-Type: text/plain\r\n\r\n\xe9"
    for _ in range(MAX_DEPTH + 2):
        raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
    assert to_7bit(raw) is None


# --- line endings -----------------------------------------------------------------


def test_lf_only_input_comes_out_in_crlf() -> None:
    text = "Grüße\nzweite Zeile\n".encode()
    raw = (
        b"From: a@example.com\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + text + b"\n"
        b"--b\nContent-Type: text/plain\n\nascii\n--b--\n"
    )
    out = assert_7bit(to_7bit(raw))
    assert b"\n" not in out.replace(b"\r\n", b"")
    assert payloads(out) == [text.replace(b"\n", b"\r\n"), b"ascii"]


# --- robustness ---------------------------------------------------------------------


def test_pathological_inputs_finish_with_a_result() -> None:
    spaces = HEAD + b"Content-Type: text/plain\r\n\r\n" + b"\xe9" + b" " * 300_000 + b"x\r\n"
    assert payloads(assert_7bit(to_7bit(spaces))) == payloads(spaces)
    many = multipart([b"Content-Type: text/plain\r\n\r\n\xe9"] * 6000)
    assert to_7bit(many) is None  # over MAX_PARTS entities to convert
    delimiters = HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n" * 50_000 + b"\r\n\xe9"
    out = assert_7bit(to_7bit(delimiters))
    assert out.endswith(b"--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9")


def seeds() -> list[bytes]:
    return [
        multipart([b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + UTF8]),
        multipart([b"Content-Type: message/rfc822\r\n\r\n" + multipart([b"\r\n\xe9=\xe9"], boundary=b"in")]),
        HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9\xe9==\r\n",
    ]


def test_mutated_messages_never_raise_and_keep_the_contract() -> None:
    rng = random.Random(6152)
    results = 0
    tokens = [b"\r\n", b"\n", b"\r", b"--", b"=", b"\xe9", b":", b";", b'"', b"\r\n\r\n", b"x" * 1000, b"boundary=in"]
    for _ in range(3000):
        raw = bytearray(rng.choice(seeds()))
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(raw) + 1)
            if rng.random() < 0.5:
                raw[at:at] = rng.choice(tokens)
            else:
                del raw[at : at + rng.randint(1, 20)]
        out = to_7bit(bytes(raw))
        if out is not None:
            assert_7bit(out)
            results += 1
    assert results > 500  # the contract was checked, not only refusals

# --- corpus -------------------------------------------------------------------------


def corpus_messages() -> list[tuple[Path, bytes]]:
    if not os.path.isdir(CORPUS):
        missing(f"corpus not found at {CORPUS}")
    files = sorted(p for folder in ("mime-torture", "spamassassin") for p in Path(CORPUS, folder).rglob("*.eml"))
    if not files:
        missing(f"no .eml files under {CORPUS}")
    messages = []
    for path in files:
        raw = path.read_bytes()
        if raw.startswith(b"From "):  # mbox separator line (RFC 4155), not part of the message
            raw = raw[raw.find(b"\n") + 1 :]
        messages.append((path, raw))
    return messages


def test_corpus_converts_or_refuses_and_keeps_the_structure() -> None:
    converted = 0
    for path, raw in corpus_messages():
        out = to_7bit(raw)
        if out is None:
            continue
        assert_7bit(out)
        # The message's own line ending is judged by its first line (module documentation).
        own = raw if raw.split(b"\n", 1)[0].endswith(b"\r") else re.sub(rb"\r?\n", b"\r\n", raw)
        if out == own:
            continue
        converted += 1
        got, expected = leaves(out), leaves(own)
        assert len(got) == len(expected), path
        assert payloads(got) == payloads(expected), path
    assert converted > 300  # the corpus holds hundreds of 8-bit bodies
