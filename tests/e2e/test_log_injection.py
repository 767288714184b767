"""Log injection (kmg-spec §7.1 line format): what a client or a next hop sends can neither add a field
to an event line, nor start a line, nor reach the log file as a raw control byte."""

from __future__ import annotations

import re

from tests.support.hostile import SPOOF_HELO
from tests.support.net import RawClient
from tests.test_log import RAW_CONTROL, fields

RECEIVED_FIELDS = ["RECEIVED", "from", "nrcpt", "size", "client", "helo", "message_id", "flags"]
DELIVERED_FIELDS = ["DELIVERED", "rcpt", "server", "size", "status", "dsn", "reply"]


def send(port: int, helo: str, message: bytes, rcpt: str = "x@example.test") -> None:
    c = RawClient(port)
    c.reply()
    assert c.cmd(f"EHLO {helo}")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(message + b"\r\n.\r\n")
    assert c.reply()[0] == 250
    c.cmd("QUIT")


def event_text(log_line: str) -> str:
    """The event of a log line: what follows ``[date time L] queue-id: ``."""
    return log_line.split(": ", 1)[1]


def test_helo_and_message_id_cannot_add_fields_or_control_bytes(gateway, sink):
    send(gateway.port, SPOOF_HELO, b"Message-ID: <m1\x1b]0;owned\x07\x1b[2J@b.test>\r\nSubject: t\r\n\r\nhi")
    sink.wait_for(1)
    [received] = gateway.wait_log(r"RECEIVED, from=<a@b\.test>")
    assert fields(event_text(received)) == RECEIVED_FIELDS, received
    assert f'helo=<"{SPOOF_HELO}">' in received
    assert "message_id=<m1\\x1b]0;owned\\x07\\x1b[2J@b.test>, flags=E" in received
    gateway.wait_log(r"DELIVERED, rcpt=<x@example\.test>.*status=sent")
    assert not RAW_CONTROL.search(gateway.log_text().replace("\n", ""))


def test_a_next_hops_greeting_is_escaped_in_free_text_too(gateway, sink):
    sink.replies["CONNECT"] = ["421-4.3.2 busy\x1b[2J\x00\r\n421 4.3.2 try \x9b later"]
    send(gateway.port, "client.test", b"Subject: t\r\n\r\nhi")
    [delivered] = gateway.wait_log(r"DELIVERED, rcpt=<x@example\.test>.*status=deferred")
    assert fields(event_text(delivered)) == DELIVERED_FIELDS, delivered
    [greeting] = gateway.wait_log(r"\]: greeting from ")  # a free-text line: its arguments escaped
    assert greeting.endswith(r"421 4.3.2 busy\x1b[2J\x00 4.3.2 try \x9b later"), greeting
    assert not RAW_CONTROL.search(gateway.log_text().replace("\n", ""))


def test_a_next_hops_reply_is_escaped(gateway, sink):
    sink.replies["RCPT"] = ['550 5.1.1 gone\x1b]0;owned\x07, status=sent, dsn=2.0.0 "x"']
    send(gateway.port, "client.test", b"Subject: t\r\n\r\nhi", rcpt="gone@example.test")
    [delivered] = gateway.wait_log(r"DELIVERED, rcpt=<gone@example\.test>")
    assert fields(event_text(delivered)) == DELIVERED_FIELDS, delivered
    assert re.search(r'status=failed, .*reply="[^"]*gone\\x1b\]0;owned\\x07, status=sent, dsn=2\.0\.0 \\"x\\""$',
                     delivered), delivered
    assert not RAW_CONTROL.search(gateway.log_text().replace("\n", ""))
