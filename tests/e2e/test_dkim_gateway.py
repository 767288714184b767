"""DKIM in the running gateway: keys looked up through its resolver (dnsmasq on loopback), the
signatures verified in a scanner worker, and the marks of a signed sender given only to mail
whose signature holds."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.e2e.test_antispam_gateway import spam_gateway
from tests.support.components import require
from tests.support.dkimsign import make_key, sign, txt_record_args
from tests.support.dns import start_dnsmasq
from tests.support.net import wait_until

PHISH = (b"From: PayPal <service@paypal.com>\r\nTo: bob@example.test\r\nSubject: Your account is limited\r\n"
         b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <n1@paypal.com>\r\n\r\n"
         b"Dear customer,\r\n\r\nwe noticed unusual activity. Please confirm your details within 24 hours:\r\n"
         b"https://www.paypal.com/signin\r\n\r\nPayPal\r\n")
SLOW = PHISH.replace(b"PayPal <service@paypal.com>", b"Slowbrand <news@slowbrand.example>")


def test_forged_and_genuine_signatures_through_smtp(make_gateway, sink, clamd, tmp_path, silent_nameserver):
    require("openssl")
    require("dnsmasq", "dnsmasq")
    brand, attacker = make_key(str(tmp_path), "brand"), make_key(str(tmp_path), "attacker")
    slow_ip, slow_port = silent_nameserver
    (tmp_path / "dns").mkdir()
    dns = start_dnsmasq(str(tmp_path / "dns"), (
        "--local=/paypal.com/", f"--server=/slowbrand.example/{slow_ip}#{slow_port}",
        *txt_record_args({"s1._domainkey.paypal.com": brand.record()})))
    try:
        ip, port = dns.address
        gw = spam_gateway(make_gateway, sink, clamd, smtpgw__resolve=[
            ("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "1"), ("DNSAttempts", "1")])
        genuine = sign(PHISH, brand, "paypal.com", "s1")
        forged = sign(PHISH.replace(b"<n1@", b"<n2@"), attacker, "paypal.com", "s1")  # d=paypal.com, not its key
        forged = b"Authentication-Results: GW.example.test; dkim=pass header.d=paypal.com\r\n" + forged  # ours, forged
        made_up = sign(PHISH.replace(b"<n1@", b"<n3@"), attacker, "paypal.com", "x2026")  # no such selector
        slow = sign(SLOW.replace(b"<n1@", b"<n4@"), attacker, "slowbrand.example", "s1")  # its DNS is down
        with smtplib.SMTP("127.0.0.1", gw.port) as client:
            for data in (genuine, forged, made_up, slow):
                client.sendmail("service@paypal.com", ["bob@example.test"], data)
        delivered = {re.search(rb"Message-ID: <(n\d)@", m.data).group(1): m.data for m in sink.wait_for(4)}
        assert sorted(delivered) == [b"n1", b"n2", b"n3", b"n4"]  # a lookup failure defers nothing
        assert all(b"X-SpamTest-Status: " in data for data in delivered.values())  # and passes nothing unscanned
        scanned = {}
        for key in ("n1", "n2", "n3", "n4"):
            [received] = gw.wait_log(rf"RECEIVED, .*message_id=<{key}@")
            qid = re.search(r"\] (\S+): RECEIVED", received).group(1)
            scanned[key] = gw.wait_log(rf"{qid}: AS-SCANNED")[0]
        assert "rule BRANDED_SENDER (dkim=pass d=paypal.com) -2.00" in scanned["n1"]
        assert "rule CONSISTENT_SENDER (dkim=pass d=paypal.com)" in scanned["n1"]
        for key in ("n2", "n3"):  # a signature by another key, a selector with no key: no mark
            assert "BRANDED_SENDER" not in scanned[key] and "CONSISTENT_SENDER" not in scanned[key]
        # the brand's own DNS cannot answer now: the signature counts as read (temperror)
        assert "rule BRANDED_SENDER (dkim=temperror d=slowbrand.example) -2.00" in scanned["n4"]
        score = {key: float(re.search(r"score=([0-9.]+)", line).group(1)) for key, line in scanned.items()}
        assert score["n2"] > score["n1"] and score["n3"] > score["n1"]
        # RFC 8601: the gateway states its results, and a field claiming its name that came with the mail is gone
        assert (b'Authentication-Results: gw.example.test; dkim=pass reason="good signature" header.d=paypal.com'
                b' header.s=s1\r\n') in delivered[b"n1"].replace(b"\r\n ", b" ")
        assert delivered[b"n2"].count(b"Authentication-Results:") == 1
        assert b'Authentication-Results: gw.example.test; dkim=fail' in delivered[b"n2"]
        assert b"dkim=temperror" in delivered[b"n4"]
        gw.wait_log(r"DKIM dkim=fail d=paypal.com s=s1 \(signature does not verify\)")
        gw.wait_log(r"DKIM dkim=permerror d=paypal.com s=x2026 \(no key for selector x2026 \(nxdomain\)\)")
    finally:
        dns.stop()


def test_messages_waiting_for_their_keys_hold_no_worker_and_can_be_removed(make_gateway, sink, clamd, tmp_path,
                                                                           silent_nameserver):
    """While their key lookups are pending (a nameserver that never answers, DKIMLookupTimeout=60)
    the messages are in CHK but take none of the AntiviralSessions places: mail without a signature
    is scanned and delivered meanwhile. ``queue remove`` takes one, and a stop puts the others back
    in WFC."""
    require("openssl")
    key = make_key(str(tmp_path), "brand")
    ip, port = silent_nameserver
    gw = spam_gateway(make_gateway, sink, clamd, antispam=[("DKIMLookupTimeout", "60")],
                      smtpgw__limits=[("AntiviralSessions", "10")],
                      smtpgw__resolve=[("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "60"), ("DNSAttempts", "1")])
    keys = [f"n{i}" for i in range(12)]  # more than AntiviralSessions
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        for key_id in keys:
            client.sendmail("service@paypal.com", ["bob@example.test"],
                            sign(PHISH.replace(b"<n1@", f"<{key_id}@".encode()), key, "paypal.com", "s1"))
    qids = []
    for key_id in keys:
        [received] = gw.wait_log(rf"RECEIVED, .*message_id=<{key_id}@")
        qids.append(re.search(r"\] (\S+): RECEIVED", received).group(1))
    wait_until(lambda: set(qids) <= set(gw.queued("CHK")), 20, "every signed message in CHK, waiting for its keys")
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("service@paypal.com", ["bob@example.test"], PHISH.replace(b"<n1@", b"<plain@"))
    [plain] = sink.wait_for(1)
    assert b"Message-ID: <plain@" in plain.data and b"X-SpamTest-Status: " in plain.data
    result = gw.cli("queue", "remove", qids[0])
    assert result.returncode == 0, result.stderr
    gw.wait_log(rf"{qids[0]}: REMOVED, state=CHK")
    assert gw.stop() == 0
    assert sorted(gw.queued()) == sorted(qids[1:]) and sorted(gw.queued("WFC")) == sorted(qids[1:])
    assert gw.log_text().count(": AS-SCANNED") == 1 and len(sink.messages) == 1  # the plain one only


@pytest.mark.parametrize("antispam", [[("Check", "false")], [("Check", "true"), ("DKIMVerify", "no")]])
def test_no_key_is_looked_up_for_mail_that_is_not_spam_checked(make_gateway, sink, clamd, tmp_path, scripted_dns,
                                                                antispam):
    """Only mail that will be spam-checked, with DKIMVerify on, costs a lookup."""
    require("openssl")
    key = make_key(str(tmp_path), "brand")
    ip, port = scripted_dns.address
    gw = spam_gateway(make_gateway, sink, clamd, antispam=antispam,
                      smtpgw__resolve=[("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "1")])
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("service@paypal.com", ["bob@example.test"], sign(PHISH, key, "paypal.com", "s1"))
    [got] = sink.wait_for(1)
    assert b"Authentication-Results:" not in got.data
    assert scripted_dns.count(qtype="TXT") == 0
