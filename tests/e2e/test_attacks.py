"""Regression tests, one per attack class: SMTP smuggling, STARTTLS command injection, TLS itself."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from tests.support.net import RawClient

SMUGGLED = "MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nowned\r\n"


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\r\n.\r\r\n"])
def test_smtp_smuggling_is_refused(make_gateway, sink, fake_end):
    """SEC Consult 2023 (CVE-2023-51764 class): only CRLF.CRLF ends DATA; bare CR/LF → 550 5.6.2
    under BareNewline=reject (normalize: test_hostile_clients.py)."""
    gateway = make_gateway(sink.port, extra={"smtpgw.network": [("BareNewline", "reject")]})
    c = RawClient(gateway.port)
    c.reply()
    c.cmd("EHLO attacker.test")
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: innocent\r\n\r\nhello" + fake_end + SMUGGLED.encode() + b".\r\n")
    code, text = c.reply()
    assert (code, text.split()[0]) == (550, "5.6.2")
    assert c.cmd("NOOP")[0] == 250  # the smuggled text was data, not commands: nothing else queued replies
    c.cmd("QUIT")
    assert gateway.queued() == []
    assert sink.messages == []


def test_dot_stuffed_lines_are_not_the_end(gateway, sink):
    c = RawClient(gateway.port)
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    c.cmd("DATA")
    c.send(b"Subject: dots\r\n\r\n..\r\n...\r\n..x\r\n.\r\n")
    assert c.reply()[0] == 250
    [got] = sink.wait_for(1)
    assert got.data.endswith(b"\r\n\r\n.\r\n..\r\n.x\r\n")


@pytest.fixture
def tls_gateway(make_gateway, sink, tls_files):
    cert, key = tls_files
    return make_gateway(sink.port, extra={"smtpgw.network": [("TLSCertificateFile", cert), ("TLSKeyFile", key)]})


def test_starttls_works_and_resets_the_session(tls_gateway, sink):
    with smtplib.SMTP("127.0.0.1", tls_gateway.port) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        assert client.starttls(context=context)[0] == 220
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        client.sendmail("a@b.test", ["x@example.test"], b"Subject: tls\r\n\r\nsecret\r\n")
    [got] = sink.wait_for(1)
    assert b"with ESMTPS id" in got.data


def test_starttls_command_injection_is_discarded(tls_gateway):
    """CVE-2011-0411: commands pipelined after STARTTLS in the clear must not run inside TLS."""
    raw = socket.create_connection(("127.0.0.1", tls_gateway.port), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220")
    raw.sendall(b"EHLO attacker.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\n")
    assert f.readline().startswith(b"220 2.0.0")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(raw, server_hostname="gw.example.test")
    tf = tls.makefile("rb")
    tls.sendall(b"EHLO attacker.test\r\n")
    line = tf.readline()
    assert line.startswith(b"250-"), line  # the first reply inside TLS answers EHLO, not MAIL
    while not line.startswith(b"250 "):
        line = tf.readline()
    tls.sendall(b"RCPT TO:<x@example.test>\r\n")
    assert tf.readline().startswith(b"503 5.5.1")  # no MAIL transaction exists
    tls_gateway.wait_log(r"discarded \d+ bytes sent after STARTTLS")
    tls.close()


def test_require_tls_refuses_mail_in_the_clear(make_gateway, sink, tls_files):
    cert, key = tls_files
    gw = make_gateway(sink.port, extra={"smtpgw.network": [("TLSCertificateFile", cert), ("TLSKeyFile", key),
                                                           ("RequireTLS", "true")]})
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test")
    code, text = c.cmd("MAIL FROM:<a@b.test>")
    assert (code, text.split()[0]) == (530, "5.7.0")
    assert c.cmd("NOOP")[0] == 250  # allowed before STARTTLS
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.starttls(context=context)
        client.sendmail("a@b.test", ["x@example.test"], b"Subject: over tls\r\n\r\nok\r\n")
    assert b"with ESMTPS" in sink.wait_for(1)[0].data


def test_failed_tls_handshake_is_logged_and_closed(tls_gateway):
    """A client that answers the 220 to STARTTLS with something that is no ClientHello gets no
    cleartext reply: the handshake fails, it is logged and the session ends (RFC 3207 §4)."""
    c = RawClient(tls_gateway.port)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS")[0] == 220
    c.sock.sendall(b"this is not a TLS client hello\r\n")
    c.sock.settimeout(10.0)
    received = b""
    try:
        for _ in range(100):  # until the gateway closes (bounded)
            chunk = c.sock.recv(4096)
            if not chunk:
                break
            received += chunk
    except ConnectionResetError:  # closed with our unread bytes still in its buffer
        pass
    assert received == b"" or received.startswith(b"\x15")  # at most a TLS alert record, never a reply
    tls_gateway.wait_log(r"TLS handshake with \[127\.0\.0\.1\] failed: ")
    c.close()


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"], ids=["nothing", "half-hello"])
def test_stalled_tls_handshake_is_closed_at_the_timeout(make_gateway, sink, tls_files, sent):
    """A client that sends STARTTLS then nothing (or half a ClientHello) loses its session at the
    timeout: no reply can be written mid-handshake, so the session ends there and then instead of
    keeping the event loop polling an unwritable reply for CLOSE_GRACE seconds."""
    cert, key = tls_files
    gw = make_gateway(sink.port, extra={"smtpgw.network": [("TLSCertificateFile", cert), ("TLSKeyFile", key)],
                                        "smtpgw.timeouts": [("ReadTimeout", "1")]})
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS")[0] == 220
    c.sock.sendall(sent)
    c.sock.settimeout(6.0)  # well under ReadTimeout + CLOSE_GRACE (10 s)
    assert c.sock.recv(100) == b""  # closed, with no cleartext reply inside the handshake
    gw.wait_log(r"timeout during the TLS handshake with \[127\.0\.0\.1\]")
    c.close()
