"""The SMTP grammar: the reply table, addresses, ESMTP parameters, xtext, reply parsing, dot-stuffing."""

from __future__ import annotations

import pytest

from smtpgw.net import smtp
from smtpgw.net.smtp import Reply, SyntaxProblem


def test_every_reply_in_the_table_is_consistent():
    """RFC 3463 §2: the enhanced code's class is the reply's first digit (cf. aiosmtpd's self-test)."""
    replies = {name: value for name, value in vars(smtp).items() if isinstance(value, Reply)}
    assert len(replies) > 30
    for name, reply in replies.items():
        assert 200 <= reply.code < 600, name
        if reply.code not in (220, 354) or reply.status:
            assert reply.status and reply.status[0] == str(reply.code)[0], name
    with pytest.raises(ValueError):
        Reply(250, "5.0.0", "inconsistent")


def test_reply_lines_strip_line_breaks_from_text():
    reply = smtp.RELAY_DENIED.format("evil\r\n250 ok")
    wire = reply.lines()
    assert wire.count(b"\r\n") == 1 and wire.startswith(b"550 5.7.1 ")
    assert smtp.OK.lines(["one", "two"]) == b"250-2.0.0 one\r\n250-2.0.0 two\r\n250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("arg, expected", [
    ("FROM:<a@b.test>", ("a@b.test", "")),
    ("FROM: <a@b.test> SIZE=5", ("a@b.test", "SIZE=5")),
    ("from:<>", ("", "")),
    ("FROM:<@relay.test,@r2.test:a@b.test>", ("a@b.test", "")),  # RFC 5321 §4.1.2 source route ignored
    ('FROM:<"quoted local"@b.test>', ('"quoted local"@b.test', "")),
    ("FROM:<a@[192.0.2.1]>", ("a@[192.0.2.1]", "")),
    ("FROM:<a@[IPv6:2001:db8::1]>", ("a@[IPv6:2001:db8::1]", "")),
    ('FROM:<"a>b"@c.test> SIZE=5', ('"a>b"@c.test', "SIZE=5")),  # qtextSMTP includes ">"
    ('FROM:<"a\\"> x"@c.test>', ('"a\\"> x"@c.test', "")),  # so does a quoted-pair
])
def test_paths(arg, expected):
    assert smtp.parse_path(arg, "FROM", allow_null=True) == expected


@pytest.mark.parametrize("arg, code", [
    ("FROM:a@b.test>", 501), ("FROM:<a@b.test", 501), ("FROM:<a@b.test>x", 501), ("FROM:<a b@c.test>", 501),
    ("FROM:<a@-bad-.test>", 501), ("FROM:<" + "l" * 65 + "@b.test>", 501), ("FROM:<é@b.test>", 553),
    ("TO:<a@b.test>", 501),
    ("FROM:", 501), ("FROM: SIZE=5", 501),  # the null path is "<>", not nothing
    ('FROM:<"a>b@c.test>', 501),
])
def test_bad_paths(arg, code):
    with pytest.raises(SyntaxProblem) as info:
        smtp.parse_path(arg, "FROM", allow_null=True)
    assert info.value.reply.code == code


@pytest.mark.parametrize("address, expected", [
    ("user@example.test", False), ("postmaster", False), ("first.last+tag@example.test", False),
    ('"quoted local"@example.test', False), ("user@[192.0.2.1]", False),
    ("user%other.test@example.test", True), ("other.test!user@example.test", True),
    ('"user@other.test"@example.test', True), ('"user\\@other.test"@example.test', True),
    ('"user\\%x"@example.test', True),
])
def test_routed_local_parts(address, expected):
    assert smtp.routed(address) is expected


def test_source_route_is_dropped_and_routing_in_the_mailbox_kept():
    assert smtp.parse_path("TO:<@a.test,@b.test:u%o.test@example.test>", "TO", allow_null=False) == (
        "u%o.test@example.test", "")


def test_mail_and_rcpt_parameters():
    mail = smtp.mail_params(smtp.parse_params("size=100 body=8bitmime RET=full ENVID=a+2Bb"))
    assert (mail.size, mail.body, mail.ret, mail.envid) == (100, "8BITMIME", "FULL", "a+b")
    rcpt = smtp.rcpt_params(smtp.parse_params("NOTIFY=FAILURE,DELAY ORCPT=rfc822;a+40b.test"))
    assert rcpt.notify == ["FAILURE", "DELAY"] and rcpt.orcpt == "rfc822;a@b.test"
    for bad in ("SIZE=x", "SIZE", "BODY=9BIT", "RET=X", "ENVID=" + "e" * 101, "ENVID=a+zz", "ENVID=a+0D+0Ab",
                "ENVID=a+00", "ENVID=+7F"):
        with pytest.raises(SyntaxProblem):
            smtp.mail_params(smtp.parse_params(bad))
    for bad in ("NOTIFY=NEVER,FAILURE", "NOTIFY=SOMETIMES", "NOTIFY=FAILURE,FAILURE", "ORCPT=nosemicolon",
                "ORCPT=rfc822;a+0Db"):
        with pytest.raises(SyntaxProblem):
            smtp.rcpt_params(smtp.parse_params(bad))
    with pytest.raises(SyntaxProblem) as info:
        smtp.mail_params(smtp.parse_params("AUTH=<>"))
    assert info.value.reply.code == 555


def test_xtext_round_trip():
    for text in ("plain", "a+b=c", "spaces here", "\x01ctl"):
        assert smtp.xtext_decode(smtp.xtext_encode(text)) == text


def test_reply_parser_multiline_and_limits():
    parser = smtp.ReplyParser()
    assert parser.feed(b"250-a\r\n250-b\r") == []
    [reply] = parser.feed(b"\n250 c\r\n")
    assert reply.code == 250 and reply.lines == ["a", "b", "c"]
    with pytest.raises(ValueError):
        smtp.ReplyParser().feed(b"xyz bad\r\n")
    with pytest.raises(ValueError):
        smtp.ReplyParser().feed(b"2" * 5000)


def test_dot_stuffing():
    assert smtp.dot_stuff(b".a\r\n..b\r\nc.\r\n", True) == (b"..a\r\n...b\r\nc.\r\n", True)
    assert smtp.dot_stuff(b".a\r\n", False) == (b".a\r\n", True)  # not at a line start
