"""Subject tagging: header injection through the prefix, encoded words kept byte for byte."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from smtpgw.mail import headers
from smtpgw.spam import SpamVerdict, mark

SPAM_VERDICT = SpamVerdict("Spam", 0.99, "content")
PROBABLE_VERDICT = SpamVerdict("Probable Spam", 0.6, "content")


def _message(subject: bytes, eol: bytes = b"\r\n") -> bytes:
    return eol.join([b"From: a@example.com", b"Subject: " + subject, b"To: b@example.org", b"", b"body", b""])


@pytest.mark.parametrize("prefix", ["[SPAM]\r\nBcc: victim@example.org ", "[SPAM]\nX-Evil: 1 ", "[SPAM]\0 "])
def test_prefix_with_line_breaks_is_refused_by_headers(prefix: str) -> None:
    with pytest.raises(headers.HeaderValueError):
        headers.prefix_subject(_message(b"hello"), prefix)


@pytest.mark.parametrize("prefix", ["[SPAM]\r\nBcc: victim@example.org ", "[SPAM]\nX-Evil: 1 ", "[SPAM]\0 "])
def test_mark_sanitises_a_bad_configured_prefix(prefix: str) -> None:
    out = mark(_message(b"hello"), SPAM_VERDICT, SimpleNamespace(SpamSubjectPrefix=prefix), "tag")
    assert headers.count(out, "Bcc") == 0 and headers.count(out, "X-Evil") == 0
    assert headers.count(out, "Subject") == 1
    subject = headers.get_raw(out, "Subject")
    assert subject is not None and subject.startswith(b"[SPAM]") and subject.endswith(b"hello")
    assert b"\0" not in out


def test_encoded_words_keep_their_bytes() -> None:
    original = b"=?koi8-r?B?8NLJ18XU?= =?utf-8?q?caf=C3=A9?="
    out = headers.prefix_subject(_message(original), "[SPAM] ")
    assert headers.get_raw(out, "Subject") == b"[SPAM] " + original


def test_non_ascii_prefix_is_one_encoded_word() -> None:
    out = headers.prefix_subject(_message(b"=?koi8-r?B?8NLJ18XU?="), "[СПАМ] ")
    subject = headers.get_raw(out, "Subject")
    assert subject is not None and subject.isascii()
    assert subject.endswith(b" =?koi8-r?B?8NLJ18XU?=")
    from email.header import decode_header, make_header
    assert str(make_header(decode_header(subject.decode()))) == "[СПАМ] Привет"


def test_prefix_added_once_and_rest_untouched() -> None:
    raw = _message(b"hello\r\n folded part", b"\r\n")
    once = headers.prefix_subject(raw, "[SPAM] ")
    twice = headers.prefix_subject(once, "[SPAM] ")
    assert once == twice
    assert once == raw.replace(b"Subject: hello", b"Subject: [SPAM] hello")


def test_probable_prefix_and_missing_subject() -> None:
    raw = b"From: a@example.com\nTo: b@example.org\n\nbody\n"
    out = mark(raw, PROBABLE_VERDICT, SimpleNamespace(), "tag")
    assert headers.get_raw(out, "Subject") == b"[Probable Spam]"
    assert out.endswith(raw)
    assert b"\r\n" not in out  # the message's own line ending is kept


def test_long_subject_is_folded_not_overlong() -> None:
    raw = _message(b"x" * 990)
    out = headers.prefix_subject(raw, "[SPAM] ")
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    assert headers.get_raw(out, "Subject") == b"[SPAM] " + b"x" * 990


def test_raw_8bit_subject_kept() -> None:
    original = "Привет".encode("utf-8")
    out = headers.prefix_subject(_message(original), "[SPAM] ")
    assert headers.get_raw(out, "Subject") == b"[SPAM] " + original
