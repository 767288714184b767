"""Delivery and access rules through a real DNS server on loopback (dnsmasq serving a test zone)."""

from __future__ import annotations

import os
import re
import smtplib
import socket

import pytest

from tests.support.components import missing, require
from tests.support.dns import start_dnsmasq
from tests.support.net import RawClient, Sink, wait_until

ROUTE_ZONE = "route.test"
# The MX hosts listen on port 25 of their own loopback addresses; a /24 of 127/8 chosen by the
# test process keeps two test runs on one machine from taking each other's port 25.
NET = f"127.{os.getpid() // 256 % 254 + 1}.{os.getpid() % 256}"
MX1, MX2, DIRECT = f"{NET}.61", f"{NET}.62", f"{NET}.63"
MX_ARGS = (
    f"--local=/{ROUTE_ZONE}/",
    f"--host-record=mx1.{ROUTE_ZONE},{MX1}",
    f"--host-record=mx2.{ROUTE_ZONE},{MX2}",
    f"--mx-host={ROUTE_ZONE},mx1.{ROUTE_ZONE},10",
    f"--mx-host={ROUTE_ZONE},mx2.{ROUTE_ZONE},20",
    f"--host-record=direct.{ROUTE_ZONE},{DIRECT}",
)


@pytest.fixture
def zone(tmp_path):
    require("dnsmasq")
    (tmp_path / "dns").mkdir()
    server = start_dnsmasq(str(tmp_path / "dns"), extra_args=MX_ARGS)
    yield server
    server.stop()


def resolve_section(server) -> list[tuple[str, str]]:
    ip, port = server.address
    return [("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "2"), ("DNSAttempts", "1")]


def sink_on(address: str, port: int = 25) -> Sink:
    if os.geteuid() != 0:
        missing("delivery to MX hosts uses port 25, which needs root")
    sink = Sink()
    sink.sock.close()
    sink.sock = socket.socket()
    sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sink.sock.bind((address, port))
    sink.sock.listen(16)
    import threading

    sink.port = port
    sink.thread = threading.Thread(target=sink._serve, daemon=True)
    sink.thread.start()
    return sink


def test_mx_routing_prefers_the_lowest_preference_and_falls_back(make_gateway, zone):
    backup = sink_on(MX2)  # mx1 (preference 10) is down
    try:
        gw = make_gateway(None, extra={"smtpgw.resolve": resolve_section(zone)},
                          replace={"smtpgw.forward": []})
        with smtplib.SMTP("127.0.0.1", gw.port) as client:
            client.sendmail("a@b.test", [f"user@{ROUTE_ZONE}"], b"Subject: via MX\r\n\r\nhi\r\n")
        [got] = backup.wait_for(1)
        assert got.recipients == [f"user@{ROUTE_ZONE}"]
        gw.wait_log(rf"connect to {re.escape(MX1)}:25")  # mx1 was tried first
        gw.wait_log(rf"DELIVERED, rcpt=<user@{ROUTE_ZONE}>, server=mx2.{ROUTE_ZONE}\[{re.escape(MX2)}\].*status=sent")
    finally:
        backup.close()


def test_bracketed_host_route_uses_its_address_not_mx(make_gateway, zone):
    direct = sink_on(DIRECT, 2600)
    try:
        gw = make_gateway(None, extra={"smtpgw.resolve": resolve_section(zone)},
                          replace={"smtpgw.forward": [("ForwardRoute", f"* [direct.{ROUTE_ZONE}:2600]")]})
        with smtplib.SMTP("127.0.0.1", gw.port) as client:
            client.sendmail("a@b.test", ["x@anywhere.test"], b"Subject: direct\r\n\r\nhi\r\n")
        assert direct.wait_for(1)[0].recipients == ["x@anywhere.test"]
    finally:
        direct.close()


def test_null_mx_fails_permanently(make_gateway, zone):
    gw = make_gateway(None, extra={"smtpgw.resolve": resolve_section(zone)}, replace={"smtpgw.forward": []})
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", ["x@nullmx.example.test"], b"Subject: null mx\r\n\r\nhi\r\n")
    gw.wait_log(r"DELIVERED, rcpt=<x@nullmx.example.test>.*status=failed.*null MX")


def test_dns_timeout_defers_delivery(make_gateway, silent_nameserver):
    ip, port = silent_nameserver
    gw = make_gateway(None, extra={"smtpgw.resolve": [("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "1"),
                                                      ("DNSAttempts", "1")]},
                      replace={"smtpgw.forward": []})
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", [f"x@{ROUTE_ZONE}"], b"Subject: dns down\r\n\r\nhi\r\n")
    gw.wait_log(rf"DELIVERED, rcpt=<x@{ROUTE_ZONE}>.*status=deferred.*4\.4\.3")
    # the line is logged at the attempt; its record goes back to QUE once an I/O thread wrote it
    wait_until(lambda: gw.queued("QUE"), 10, "the deferred record back in QUE")



def test_connect_rule_refuses_a_dnsbl_listed_client(make_gateway, sink, zone):
    gw = make_gateway(sink.port, extra={
        "smtpgw.resolve": resolve_section(zone),
        "smtpgw.access": [("DNSBlackList", "dnsbl.test"), ("ConnectRule", "deny from in_dnsbl to *")],
    })
    listed = RawClient(gw.port, source="127.0.0.2")  # RFC 5782 §5: every DNSBL lists 127.0.0.2
    listed.reply()
    listed.cmd("EHLO listed.test")
    listed.cmd("MAIL FROM:<a@b.test>")
    code, text = listed.cmd("RCPT TO:<x@example.test>")
    assert (code, text.split()[0]) == (554, "5.7.1") and "in_dnsbl" in text
    clean = RawClient(gw.port)
    clean.reply()
    clean.cmd("EHLO clean.test")
    clean.cmd("MAIL FROM:<a@b.test>")
    assert clean.cmd("RCPT TO:<x@example.test>")[0] == 250


def test_dnsbl_timeout_never_blocks_mail(make_gateway, sink, silent_nameserver):
    ip, port = silent_nameserver
    gw = make_gateway(sink.port, extra={
        "smtpgw.resolve": [("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "1"), ("DNSAttempts", "1")],
        "smtpgw.access": [("DNSBlackList", "dnsbl.test"), ("ConnectRule", "deny from in_dnsbl to *")],
    })
    client = RawClient(gw.port, source="127.0.0.2")
    client.reply()
    client.cmd("EHLO c.test")
    client.cmd("MAIL FROM:<a@b.test>")
    assert client.cmd("RCPT TO:<x@example.test>")[0] == 250  # waited for the lookup, then let through


def test_helo_rule_with_unverifiable_name_answers_450(make_gateway, sink, silent_nameserver):
    ip, port = silent_nameserver
    gw = make_gateway(sink.port, extra={
        "smtpgw.resolve": [("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "1"), ("DNSAttempts", "1")],
        "smtpgw.access": [("HeloRule", "deny from no_ip to *")],
    })
    client = RawClient(gw.port)
    client.reply()
    client.cmd("EHLO unresolvable.test")
    client.cmd("MAIL FROM:<a@b.test>")
    code, text = client.cmd("RCPT TO:<x@example.test>")
    assert (code, text.split()[0]) == (450, "4.7.25")


def test_parallel_connections_stay_on_the_preferred_mx(make_gateway, zone):
    """RFC 5321 §5.1: MX hosts are tried in preference order. A second connection opened while the
    first is busy goes to the preferred mx1 too, never to the backup mx2 while mx1 answers."""
    import threading

    from tests.support.net import wait_until

    primary, backup = sink_on(MX1), sink_on(MX2)
    release = threading.Event()
    primary.rcpt_reply = lambda addr: None if addr != "one@route.test" or release.wait(30) else "451 4.0.0 held"
    try:
        gw = make_gateway(None, extra={"smtpgw.resolve": resolve_section(zone)}, replace={"smtpgw.forward": []})
        with smtplib.SMTP("127.0.0.1", gw.port) as client:
            client.sendmail("a@b.test", [f"one@{ROUTE_ZONE}"], b"Subject: one\r\n\r\nhi\r\n")
            client.sendmail("a@b.test", [f"two@{ROUTE_ZONE}"], b"Subject: two\r\n\r\nhi\r\n")
        # the second message is in flight while the first holds mx1's only connection so far
        wait_until(lambda: len(gw.queued("SND")) == 2, 20, "both messages in SND")
        release.set()
        delivered = gw.wait_log(rf"DELIVERED, rcpt=<(one|two)@{ROUTE_ZONE}>", count=2)
        assert all(f"server=mx1.{ROUTE_ZONE}[{MX1}]" in line and "status=sent" in line for line in delivered), delivered
        assert backup.connections == 0
    finally:
        release.set()
        primary.close()
        backup.close()
