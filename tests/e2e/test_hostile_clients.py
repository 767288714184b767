"""Regression tests for what hostile clients tried on the receiver: sender-specified routing through
a domain rule, NUL bytes in commands and data, HELO names that do not exist, and bare LF line ends."""

from __future__ import annotations

from tests.e2e.test_limits import send_data, session
from tests.support.hostile import DOMAIN_ONLY, ROUTED
from tests.support.net import RawClient


def test_untrusted_routing_is_refused_and_trusted_clients_may_route(make_gateway, sink):
    """Postfix's allow_untrusted_routing=no: %, ! and a quoted @ from a client only a domain rule
    allows get the relay refusal; a source route is dropped and the mailbox after it decides."""
    gw = make_gateway(sink.port, replace={"smtpgw.access": DOMAIN_ONLY})
    outside = session(gw.port)
    assert outside.cmd("MAIL FROM:<a@b.test>")[0] == 250
    for rcpt in ROUTED:
        code, text = outside.cmd(f"RCPT TO:<{rcpt}>")
        assert (code, text.split()[0]) == (550, "5.7.1"), rcpt
        gw.wait_log(r"relay denied: client=\[127\.0\.0\.1\] rcpt=<.*> rule=untrusted routing, not allowed by "
                    r"RelayRule=allow from any to \*@example\.test")
    assert outside.cmd("RCPT TO:<@other.test:user@example.test>")[0] == 250  # RFC 5321 Appendix C
    assert outside.cmd("RCPT TO:<@example.test:user@other.test>")[0] == 550
    assert send_data(outside, b"Subject: outside\r\n\r\nhi\r\n")[0] == 250
    [got] = sink.wait_for(1)
    assert got.recipients == ["user@example.test"]  # the route never reaches the next hop

    trusted = session(gw.port, source="127.0.0.2")
    assert trusted.cmd("MAIL FROM:<a@example.test>")[0] == 250
    for rcpt in ROUTED:
        assert trusted.cmd(f"RCPT TO:<{rcpt}>")[0] == 250, rcpt
    assert send_data(trusted, b"Subject: trusted\r\n\r\nhi\r\n")[0] == 250
    assert sink.wait_for(2)[1].recipients == list(ROUTED)


def test_untrusted_routing_is_refused_without_relay_rules(make_gateway, sink):
    gw = make_gateway(sink.port, replace={"smtpgw.access": []})  # ProtectedDomains decide
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test>")
    assert c.cmd("RCPT TO:<user%other.test@example.test>")[0] == 550
    assert c.cmd("RCPT TO:<user@example.test>")[0] == 250


def test_nul_bytes_are_refused_in_commands_and_data_and_the_session_goes_on(make_gateway, sink):
    """501 5.5.2 for a command holding NUL (it is not run); 550 5.6.0 at the end of a message holding
    NUL (RFC 2045 §2.8; BINARYMIME, RFC 3030, is not offered); the next transaction goes through."""
    gw = make_gateway(sink.port)
    c = session(gw.port)
    code, text = c.cmd("MAIL FROM:<a@b.test>\0 SIZE=10")
    assert (code, text.split()[0]) == (501, "5.5.2")
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 503  # the MAIL with NUL was not run
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd("RCPT TO:<x\0y@example.test>")[:1] == (501,)
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    code, text = send_data(c, b"Subject: nul\r\n\r\nbefore\0after\r\n")
    assert (code, text.split()[0]) == (550, "5.6.0")
    gw.wait_log(r"refused message from \[127\.0\.0\.1\] <a@b\.test>: NUL character in message data")
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert send_data(c, b"Subject: clean\r\n\r\nno nul\r\n")[0] == 250
    [got] = sink.wait_for(1)
    assert b"Subject: clean" in got.data and b"\0" not in got.data


def test_bare_lf_lines_are_normalized_and_only_crlf_dot_crlf_ends_the_data(make_gateway, sink):
    """BareNewline=normalize (the default, as Postfix 3.9): a script's LF-only message is stored and
    relayed with CRLF; a dot line after a bare LF, or ending in one, is text (the smuggling attempt
    stays inside the one message); a bare CR is still refused."""
    gw = make_gateway(sink.port)
    c = session(gw.port)
    smuggled = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    for fake_end in (b"\n.\r\n", b"\r\n.\n", b"\n.\n"):
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<x@example.test>")
        assert send_data(c, b"Subject: lf\n\nline one\n..dot\nhello" + fake_end + smuggled)[0] == 250
    assert c.cmd("NOOP")[0] == 250  # nothing smuggled ran: no reply is left over
    got = sink.wait_for(3)
    assert [m.recipients for m in got] == [["x@example.test"]] * 3
    for message in got:
        body = message.data.split(b"\r\n\r\n", 1)[1]
        assert b"\n" not in message.data.replace(b"\r\n", b"")  # CRLF throughout
        assert body.startswith(b"line one\r\n.dot\r\nhello\r\n")  # "..dot" unstuffed after a bare LF
        assert body.endswith(b"\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n")
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    code, text = send_data(c, b"Subject: cr\r\n\r\nbare\rcr\r\n")
    assert (code, text.split()[0]) == (550, "5.6.2")


def test_bare_lf_is_refused_under_bare_newline_reject(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.network": [("BareNewline", "reject")]})
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    code, text = send_data(c, b"Subject: lf\n\nfrom a script\r\n")
    assert (code, text.split()[0]) == (550, "5.6.2")
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert send_data(c, b"Subject: crlf\r\n\r\nfine\r\n")[0] == 250
    assert len(sink.wait_for(1)) == 1


def rcpt_after(port: int, helo: str, sender: str) -> tuple[int, str]:
    c = RawClient(port)
    c.reply()
    assert c.cmd(f"EHLO {helo}")[0] == 250
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    return c.cmd("RCPT TO:<x@example.test>")


def test_helo_rule_no_ip_refuses_helo_names_that_do_not_exist(make_gateway, sink, dns_server):
    """HeloRule has_ip/no_ip read the HELO name's lookup, which MAIL FROM (and its own has_ip
    lookup for MailfromRule) no longer erases: names the test zone does not hold are refused."""
    ip, port = dns_server.address
    gw = make_gateway(sink.port, extra={
        "smtpgw.resolve": [("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "2"), ("DNSAttempts", "1")],
        "smtpgw.access": [("HeloRule", "deny from no_ip to *"), ("MailfromRule", "deny from no_ip to *")],
    })
    for name in ("nonexistent.example.test", "ghost.example.test", "nohost.example.test", "a.b.example.test"):
        code, text = rcpt_after(gw.port, name, "a@mail2.example.test")
        assert (code, text.split()[0]) == (554, "5.7.1") and "HeloRule=deny from no_ip to *" in text, name
    code, text = rcpt_after(gw.port, "mail1.example.test", "a@nonexistent.example.test")
    assert (code, text.split()[0]) == (554, "5.7.1") and "MailfromRule=deny from no_ip to *" in text
    assert rcpt_after(gw.port, "mail1.example.test", "a@mail2.example.test")[0] == 250
    assert rcpt_after(gw.port, "[127.0.0.1]", "a@mail2.example.test")[0] == 250  # an address literal has an IP
