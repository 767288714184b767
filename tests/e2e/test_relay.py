"""The relay core end to end: SMTP in on loopback, the queue, SMTP out to a recording sink."""

from __future__ import annotations

import smtplib

import pytest

from tests.support.components import require
from tests.support.net import RawClient

MSG = b"From: a@b.test\r\nTo: x@example.test\r\nSubject: hello\r\nMessage-ID: <m1@b.test>\r\n\r\nbody line\r\n.leading dot\r\n"


def strip_trace(data: bytes) -> bytes:
    """The message as the client sent it: without the Received field the gateway prepended."""
    assert data.startswith(b"Received: from "), data[:200]
    end = data.index(b"\r\n", data.index(b"\r\n\t") + 3)
    while data[end + 2 : end + 3] == b"\t":
        end = data.index(b"\r\n", end + 2)
    return data[end + 2 :]


def test_smtplib_message_is_relayed_byte_exact(gateway, sink):
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        refused = client.sendmail("a@b.test", ["x@example.test"], MSG)
    assert refused == {}
    [got] = sink.wait_for(1)
    assert got.sender == "a@b.test" and got.recipients == ["x@example.test"]
    assert strip_trace(got.data) == MSG
    assert b"by gw.example.test (smtpgw) with ESMTP id " in got.data
    gateway.wait_log(r"DELIVERED, rcpt=<x@example.test>.*status=sent")
    [line] = gateway.wait_log(r"RECEIVED, from=<a@b.test>, nrcpt=1")
    assert "message_id=<m1@b.test>" in line and "flags=E" in line


def test_messages_around_the_sender_s_read_size_go_out_byte_exact_with_their_dots(gateway, sink):
    """The sender reads a queue file in 64 KiB chunks and sends the last one with the final dot:
    queue files just under, at and over one and two chunks, with transparency dots (RFC 5321
    §4.5.2) on the lines around the chunk borders, arrive as they were sent."""
    line = b".dot line, stuffed on the wire and unstuffed by the sink, 64 bytes long.....\r\n"[:62] + b"\r\n"
    bodies = []
    for lines in (1000, 1020, 1024, 1030, 2040, 2048, 2060):
        body = MSG + line * lines + b"..two dots\r\n"
        bodies.append(body)
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        for body in bodies:
            assert client.sendmail("a@b.test", ["x@example.test"], body) == {}
    got = sink.wait_for(len(bodies))
    assert sorted(strip_trace(m.data) for m in got) == sorted(bodies)
    sizes = [len(m.data) for m in got]
    assert min(sizes) < 65536 < max(sizes) and any(65536 * 2 - 500 < size < 65536 * 2 + 500 for size in sizes)


def test_message_id_cannot_fake_fields_of_the_received_line(gateway, sink):
    """kmg-spec §7.1 ``message_id=<message id>``: only the msg-id (RFC 5322 §3.6.4) is logged,
    not the rest of the header line, which would otherwise add fields (a second ``flags=``)."""
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.sendmail("a@b.test", ["x@example.test"],
                        MSG.replace(b"<m1@b.test>", b'<m1@b.test> , flags=ED, "q"'))
    sink.wait_for(1)
    [line] = gateway.wait_log(r"RECEIVED, from=<a@b.test>, nrcpt=1")
    assert line.endswith("message_id=<m1@b.test>, flags=E"), line


def test_ehlo_advertises_extensions_and_every_reply_has_an_enhanced_code(gateway):
    c = RawClient(gateway.port)
    assert c.reply()[0] == 220
    c.send("EHLO client.test\r\n")
    lines = []
    while True:
        line = c.sock.recv(4096).decode()
        lines.append(line)
        if "\r\n250 " in "".join(lines) or "".join(lines).startswith("250 "):
            break
    text = "".join(lines)
    for keyword in ("PIPELINING", "SIZE 10485760", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"):
        assert f"250-{keyword}\r\n" in text or f"250 {keyword}\r\n" in text
    assert "STARTTLS" not in text  # no certificate configured
    for command, code, status in [
        ("NOOP", 250, "2.0.0"), ("VRFY someone", 252, "2.5.0"), ("HELP", 214, "2.0.0"),
        ("RCPT TO:<x@example.test>", 503, "5.5.1"), ("DATA", 503, "5.5.1"), ("FOO", 500, "5.5.1"),
        ("MAIL FROM:<a@b.test>", 250, "2.1.0"), ("MAIL FROM:<a@b.test>", 503, "5.5.1"),
        ("RSET now", 501, "5.5.4"), ("RSET", 250, "2.0.0"), ("EXPN staff", 502, "5.5.1"),
        ("STARTTLS", 502, "5.5.1"), ("QUIT", 221, "2.0.0"),
    ]:
        got_code, got_text = c.cmd(command)
        assert (got_code, got_text.split(" ")[0]) == (code, status), command


def test_commands_before_helo_and_bad_arguments(gateway):
    c = RawClient(gateway.port)
    c.reply()
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 503
    assert c.cmd("HELO")[:1] == (501,)
    assert c.cmd("HELO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.test> SIZE=10")[0] == 555  # ESMTP parameters need EHLO
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<not an address>")[:2][0] == 501
    assert c.cmd("MAIL FROM:<a@b.test> FOO=1")[0] == 555  # RFC 5321 §4.1.1.11
    assert c.cmd("MAIL FROM:<a@b.test> RET=FULL RET=HDRS")[0] == 501
    assert c.cmd("MAIL FROM:<a@b.test> RET=PARTIAL")[0] == 501
    assert c.cmd("MAIL FROM:<a@b.test> ENVID=a+0D+0AX-Injected:+20x")[0] == 501  # RFC 3461 §4.4: printable
    assert c.cmd("MAIL FROM:")[0] == 501  # RFC 5321 §4.1.2: the null reverse-path is "<>", not nothing
    assert c.cmd("MAIL FROM:<>")[0] == 250  # the null reverse-path
    assert c.cmd("RCPT TO:<>")[0] == 501
    assert c.cmd("RCPT TO:<x@example.test> NOTIFY=NEVER,SUCCESS")[0] == 501
    assert c.cmd("RCPT TO:<x@example.test> ORCPT=rfc822;bad+ZZ")[0] == 501
    assert c.cmd("RCPT TO:<räksmörgås@example.test>")[0] == 553
    assert c.cmd("RCPT TO:<x@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40example.test")[0] == 250
    c.cmd("QUIT")


def test_quoted_local_part_with_an_angle_bracket_is_relayed(gateway, sink):
    """RFC 5321 §4.1.2: qtextSMTP includes ">", which does not end the path inside quotes."""
    c = RawClient(gateway.port)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd('MAIL FROM:<"a>b"@b.test> SIZE=100')[0] == 250
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    c.cmd("QUIT")
    [got] = sink.wait_for(1)
    assert got.mail_line.startswith('MAIL FROM:<"a>b"@b.test>')


def test_dsn_parameters_are_kept_and_passed_on(gateway, sink):
    c = RawClient(gateway.port)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<a@b.test> RET=HDRS ENVID=env+2B1")[0] == 250
    assert c.cmd("RCPT TO:<x@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x+40example.test")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(MSG + b".\r\n")
    assert c.reply()[0] == 250
    c.cmd("QUIT")
    [got] = sink.wait_for(1)
    assert got.mail_line.endswith("RET=HDRS ENVID=env+2B1")
    # "@" is a plain xchar (RFC 3461 §4), so it is passed on unencoded
    assert got.rcpt_lines == ["RCPT TO:<x@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x@example.test"]
    gateway.wait_log(r"RECEIVED, from=<a@b.test>.*flags=ED")


def test_pipelined_session_in_two_writes(gateway, sink):
    c = RawClient(gateway.port)
    c.reply()
    c.cmd("EHLO client.test")
    c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<bad address>\r\nRCPT TO:<y@example.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(5)] == [250, 250, 501, 250, 354]
    c.send(MSG + b".\r\nMAIL FROM:<c@b.test>\r\nRCPT TO:<z@example.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    c.send(b"Subject: second\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert [c.reply()[0] for _ in range(2)] == [250, 221]
    got = sink.wait_for(2)
    by_sender = {m.sender: m for m in got}
    assert by_sender["a@b.test"].recipients == ["x@example.test", "y@example.test"]  # one transaction
    assert strip_trace(by_sender["c@b.test"].data) == b"Subject: second\r\n\r\nx\r\n"


def test_eight_bit_body_is_delivered_byte_exact(gateway, sink):
    body = "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=latin-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".encode()
    body += bytes(range(128, 256)) + b"\r\n" + "Grüße, ½ €\r\n".encode("utf-8")
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.sendmail("a@b.test", ["x@example.test"], body, mail_options=["BODY=8BITMIME"])
    [got] = sink.wait_for(1)
    assert strip_trace(got.data) == body
    assert "BODY=8BITMIME" in got.mail_line


def test_message_without_final_crlf_and_empty_message(gateway, sink):
    c = RawClient(gateway.port)
    c.reply()
    c.cmd("EHLO client.test")
    for data in (b".\r\n", b"Subject: s\r\n\r\nno newline at end\r\n.\r\n"):
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<x@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(data)
        assert c.reply()[0] == 250
    got = sink.wait_for(2)
    bodies = sorted(strip_trace(m.data) for m in got)
    assert bodies == [b"", b"Subject: s\r\n\r\nno newline at end\r\n"]


def test_swaks_sends_through_the_gateway(gateway, sink):
    import subprocess

    swaks = require("swaks")
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{gateway.port}", "--from", "a@b.test", "--to", "x@example.test",
         "--header", "Subject: via swaks", "--body", "hello from swaks", "--pipeline"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [got] = sink.wait_for(1)
    assert b"Subject: via swaks" in got.data and b"hello from swaks" in got.data


@pytest.mark.parametrize("rcpt, expected", [("x@example.test", 250), ("y@other.test", 550)])
def test_relay_rules_deny_other_domains_for_outside_clients(make_gateway, sink, rcpt, expected):
    gw = make_gateway(sink.port, replace={"smtpgw.access": [
        ("RelayRule", "allow from 10.0.0.0/8 to *"),
        ("RelayRule", "allow from any to *@example.test"),
        ("RelayRule", "deny from any to *"),
    ]})
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@b.test>")
    code, text = c.cmd(f"RCPT TO:<{rcpt}>")
    assert code == expected
    if expected == 550:
        assert text.startswith("5.7.1")
        assert c.cmd("DATA")[0] == 554  # RFC 5321 §3.3: no valid recipients
        gw.wait_log(r"relay denied: client=\[127.0.0.1\] rcpt=<y@other.test> rule=")


def test_no_relay_rules_means_protected_domains_only(make_gateway, sink):
    gw = make_gateway(sink.port, replace={"smtpgw.access": []})
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@b.test>")
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert c.cmd("RCPT TO:<x@elsewhere.test>")[0] == 550


def test_postmaster_without_domain_is_accepted(make_gateway, sink):
    gw = make_gateway(sink.port, replace={"smtpgw.access": [("RelayRule", "deny from any to *")]})
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@b.test>")
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 550
    assert c.cmd("RCPT TO:<Postmaster>")[0] == 250  # RFC 5321 §4.5.1
    c.cmd("DATA")
    c.send(b"Subject: to the postmaster\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0] == 250
    [got] = sink.wait_for(1)
    assert got.recipients == ["postmaster@example.test"]
