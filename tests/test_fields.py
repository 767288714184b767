"""The one header reader (smtpgw.mail.fields): the splitter, the Content-Type fallback, and the
parts that read headers (MIME decomposition, 7-bit conversion, disclaimer, header edits)
agreeing on what they see."""

from __future__ import annotations

import email

import pytest

from smtpgw.mail import fields, headers, mime
from smtpgw.mail.disclaimer import add_disclaimer
from smtpgw.mail.downgrade import to_7bit

HEAD = b"From: a@example.com\r\nTo: b@example.net\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"


def test_split_finds_fields_body_and_how_the_header_ends() -> None:
    raw = b"Subject: one\r\n two\r\nX-A : b\r\n\r\nbody\r\n"
    head = fields.split(raw)
    assert [f.name for f in head.fields] == ["subject", "x-a"]
    assert head.get(raw, "subject") == b"one two" and head.get(raw, "x-a") == b"b"
    assert (head.blank, head.stray, raw[head.body :]) == (True, False, b"body\r\n")
    assert head.obsolete_at == raw.index(b"X-A")  # white space before the colon (RFC 5322 §4.5)
    stray = fields.split(b"A: 1\nnot a field\nB: 2\n\nbody")
    assert [f.name for f in stray.fields] == ["a"] and stray.stray and stray.body == 5
    only = fields.split(b"A: 1\r\n")
    assert (only.blank, only.stray, only.body) == (False, False, 6)
    empty = fields.split(b"\r\nbody")
    assert (empty.fields, empty.blank, empty.body) == ([], True, 2)


def test_split_keeps_the_mime_fields_past_the_bound() -> None:
    raw = b"".join(b"X-%d: v\r\n" % i for i in range(10)) + b"Content-Type: text/html\r\nX-9: w\r\n\r\n"
    head = fields.split(raw, max_fields=5, keep_beyond=frozenset({"content-type"}))
    assert head.over and [f.name for f in head.fields][-1] == "content-type" and len(head.fields) == 6


@pytest.mark.parametrize(
    "value, default, expected",
    [
        (None, "text/plain", ("text/plain", {}, True)),  # RFC 2045 §5.2: no field → the default
        (None, "message/rfc822", ("message/rfc822", {}, True)),  # RFC 2046 §5.1.5: in a digest
        (b"garbage", "message/rfc822", ("text/plain", {}, False)),  # unreadable → text/plain
        (b"text/; name=a.exe", "text/plain", ("text/plain", {"name": "a.exe"}, False)),  # the name still read
        (b'Multipart/Mixed; boundary="b c"', "text/plain", ("multipart/mixed", {"boundary": "b c"}, True)),
        (b"text/plain; name*0*=utf-8''%C3%A9; name*1=.pdf", "text/plain", ("text/plain", {"name": "\xe9.pdf"}, True)),
    ],
)
def test_content_type_has_one_fallback(value: bytes | None, default: str, expected: tuple) -> None:
    assert tuple(fields.content_type(value, default)) == expected


HOSTILE = [
    b"multipart/mixed; boundary*0*=\"\x00''x\"",  # made CPython's email raise (NUL in a charset name)
    b"multipart/mixed; boundary*0*=\"no-such-charset''%E9\"; boundary*1=x",
    b"multipart/mixed; " + b"a=b; " * 10_000,
    b"multipart/mixed; boundary=\"" + b"\\" * 5000,
    b"\xff\xfe/\x00; =; ;=;\"",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_content_types_never_raise(value: bytes) -> None:
    declared = fields.content_type(value)
    assert declared.type in ("multipart/mixed", "text/plain")
    assert len(declared.params) <= fields.MAX_PARAMETERS


def _hostile_multipart() -> bytes:
    return (HEAD + b"Content-Type: multipart/mixed; boundary*0*=\"\x00''x\"\r\n\r\n"
            b"--x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"caf\xc3\xa9\r\n--x--\r\n")


def test_scanner_conversion_and_disclaimer_see_the_same_parts_of_a_hostile_content_type() -> None:
    """A Content-Type that made the email package raise: the 7-bit conversion refused the
    message (a bounce) and the disclaimer wrapped it as opaque, while the scanner read the
    parts. Now all three read it alike: a multipart/mixed with boundary "x"."""
    raw = _hostile_multipart()
    tree = mime.decompose(raw)
    assert [o.content_type for o in tree.root.walk()] == ["multipart/mixed", "text/plain"]
    converted = to_7bit(raw)
    assert converted is not None and converted.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--x--" in converted
    marked = add_disclaimer(raw, "Scanned.")
    assert marked.count(b"\r\n--x\r\n") == 2 and marked.endswith(b"--x--\r\n")  # a part inside, not a wrapper


def test_trailing_space_in_a_boundary_is_dropped_by_every_reader() -> None:
    """RFC 2046 §5.1.1: a boundary does not end in a space; readers (CPython's email too)
    drop one there, and so do the scanner and the conversion."""
    raw = (HEAD + b'Content-Type: multipart/mixed; boundary="b "\r\n\r\n'
           b"--b\r\nContent-Type: application/octet-stream\r\n\r\n\xff\xfe\r\n--b--\r\n")
    assert [p.get_content_type() for p in email.message_from_bytes(raw).walk()][1] == "application/octet-stream"
    assert [o.content_type for o in mime.decompose(raw).root.walk()] == ["multipart/mixed", "application/octet-stream"]
    converted = to_7bit(raw)
    assert converted is not None and b"Content-Transfer-Encoding: base64\r\n\r\n//4=" in converted


def test_a_field_after_a_line_that_is_not_one_is_body_for_every_part() -> None:
    """RFC 5322 §2.2: a stray line ends the header (as CPython's email and mail readers read
    it). Header edits, the StrictStandards check, the scanner and the disclaimer agree."""
    raw = HEAD + b"this line is not a field\r\nSubject: hidden\r\nContent-Type: text/html\r\n\r\nbody\r\n"
    assert headers.get_raw(raw, "Subject") is None
    assert email.message_from_bytes(raw)["Subject"] is None
    tagged = headers.prefix_subject(raw, "[SPAM] ")
    assert tagged.startswith(b"Subject: [SPAM]\r\n")  # the prefix is where readers see it
    assert "a header line that is not a field (RFC 5322 §2.2)" in headers.violations(raw)
    tree = mime.decompose(raw)
    assert tree.root.content_type == "text/plain" and "message: missing header/body separator" in tree.defects
    wrapped = add_disclaimer(raw, "Scanned.")
    assert email.message_from_bytes(wrapped).get_content_type() == "multipart/mixed"
    assert b"\r\n\r\nthis line is not a field\r\nSubject: hidden\r\n" in wrapped  # moved into the first part


def test_a_leading_mbox_from_line_is_skipped_by_every_part() -> None:
    """RFC 4155: an mbox ``From `` line is no header field; readers (CPython's email) and the
    scanner skip it. Header edits and the disclaimer do too, and keep it first (found by
    bench/fuzz.py: the disclaimer read the header as empty and buried the parts in a text)."""
    raw = (b"From alice@example.org Mon Dec  7 10:00:00 2026\r\n" + HEAD + b"Subject: hi\r\n"
           b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\none\r\n'
           b"--b\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n--b--\r\n")
    assert headers.get_raw(raw, "Subject") == b"hi" and "a header line that is not a field (RFC 5322 §2.2)" not in headers.violations(raw)
    tagged = headers.prepend(headers.prefix_subject(raw, "[SPAM] "), [("X-Test", "1")])
    assert tagged.startswith(b"From alice@example.org Mon Dec  7 10:00:00 2026\r\nX-Test: 1\r\n")
    assert email.message_from_bytes(tagged)["Subject"] == "[SPAM] hi" and email.message_from_bytes(tagged)["X-Test"] == "1"
    marked = add_disclaimer(raw, "Scanned.")
    assert marked.startswith(b"From alice@example.org") and marked.count(b"\r\n--b\r\n") == 3
    assert [o.content_type for o in mime.decompose(marked).root.walk()] == [
        "multipart/mixed", "text/plain", "application/pdf", "text/plain"]
    wrapped = add_disclaimer(b"From x@y Mon Dec  7 10:00:00 2026\r\nSubject: s\r\n\r\nbody\r\n", "Scanned.")
    assert wrapped.startswith(b"From x@y Mon Dec  7 10:00:00 2026\r\nSubject: s\r\nMIME-Version: 1.0\r\n")


@pytest.mark.parametrize("raw, end", [
    (b"A: 1\r\nB: 2\r\n\r\nbody\n\nmore", 14),  # CRLF: the first empty line, not a later bare-LF one
    (b"A: 1\nB: 2\n\nbody\r\n\r\n", 11),
    (b"A: 1\n\r\nbody\n\n", 7),  # an LF line ending, then an empty CRLF line
    (b"A: 1\r\n\nbody", 7),
    (b"A: 1\r\nB: 2\r\n", 12),  # no empty line: all of it
    (b"\r\nbody", 0),
    (b"\nbody", 0),
])
def test_header_end_is_past_the_first_empty_line(raw: bytes, end: int) -> None:
    assert headers.header_end(raw) == end


def test_removing_a_field_the_header_lacks_keeps_the_bytes_even_when_the_body_names_it() -> None:
    raw = b"Subject: s\r\nX-Anti-Virus: forged\r\n\r\nX-Anti-Virus: in the body\r\n"
    assert headers.remove(raw, "Authentication-Results") is raw
    assert headers.remove(raw, "x-anti-virus") == b"Subject: s\r\n\r\nX-Anti-Virus: in the body\r\n"
    body_only = b"Subject: s\r\n\r\nAuthentication-Results: in the body\r\n"
    assert headers.remove(body_only, "Authentication-Results") == body_only


def test_a_field_that_fits_on_its_line_is_rendered_as_the_folding_would() -> None:
    assert headers.render("X-SpamTest-Status", "Not detected") == b"X-SpamTest-Status: Not detected\r\n"
    value = "word " * 14 + "end"  # 78 characters with the name: still one line
    assert headers.render("X-A", value[: 78 - 5]) == b"X-A: " + value[: 78 - 5].encode() + b"\r\n"
    folded = headers.render("X-A", "word " * 20 + "end", b"\n")
    assert folded.count(b"\n ") >= 1 and all(len(line) <= 78 for line in folded.split(b"\n"))
