"""Received-field hops and the sending-host hints the tokenizer draws from them."""

from __future__ import annotations

import re

import pytest

from smtpgw.spam import mailview, received, tokenizer

POSTFIX = ("from mail.example.org (mail.example.org [198.51.100.7]) by mx.example.net (Postfix) "
           "with ESMTPSA id 4F2A1 for <a@example.net>; Tue, 24 Sep 2002 23:12:39 +0200")
ZOMBIE = ("from 203.0.113.9 (ppp-45.dsl.isp.example [192.0.2.45]) by mx.example.net (Postfix) "
          "with SMTP id 8E2A13C765; Tue, 24 Sep 2002 23:12:39 +0200 (CEST)")
EXIM = "from relay.example.com ([198.51.100.8] helo=workstation) by mx.example.net with esmtp (Exim 4.5)"
QMAIL = "from unknown (HELO [198.51.100.9]) (198.51.100.9) by mail.example.net with SMTP; 31 Jul 2002"
LOCAL = "from localhost (localhost [127.0.0.1]) by mx.example.net (Postfix) with ESMTP id 1D37A"


def test_hops_in_three_spellings() -> None:
    assert received.parse(POSTFIX) == received.Hop("mail.example.org", "mail.example.org", "198.51.100.7", "esmtpsa",
                                                   "mx.example.net")
    assert received.parse(ZOMBIE) == received.Hop("203.0.113.9", "ppp-45.dsl.isp.example", "192.0.2.45", "smtp",
                                                  "mx.example.net")
    assert received.parse(EXIM) == received.Hop("workstation", "relay.example.com", "198.51.100.8", "esmtp",
                                                "mx.example.net")
    assert received.parse(QMAIL) == received.Hop("198.51.100.9", "unknown", "198.51.100.9", "smtp", "mail.example.net")
    assert received.parse("(qmail 49936 invoked from network); 31 Jul 2002") is None


def test_hop_hints() -> None:
    assert received.hop_hints(received.parse(POSTFIX)) == ["proto:esmtpsa", "authenticated", "helo-same-domain"]
    assert received.hop_hints(received.parse(ZOMBIE)) == ["proto:smtp", "helo-ip-other", "rdns-dynamic"]
    assert received.hop_hints(received.parse(EXIM)) == ["proto:esmtp", "helo-no-dot"]
    assert received.hop_hints(received.parse(QMAIL)) == ["proto:smtp", "helo-ip", "rdns-unknown"]
    assert not received.is_public("127.0.0.1") and not received.is_public("172.20.1.1")
    assert received.is_public("198.51.100.7") and not received.is_public("")


def test_a_receiver_that_writes_no_reverse_dns_name_gives_no_hint_of_it() -> None:
    """Whether a Received field carries the client's reverse-DNS name is the receiving software's format
    (TREC 2007's collector wrote one for every ham, 24-44% of SpamAssassin's ham had none): no token.
    A name looked up and not found ("unknown") still is one."""
    unwritten = received.parse("from mail.sender.example ([198.51.100.10]) by mx.example.net (8.12.8/8.12.8) "
                               "with ESMTP id h1AB")
    assert unwritten is not None and unwritten.rdns == ""
    assert received.hop_hints(unwritten) == ["proto:esmtp"]
    assert not any("rdns" in token for token in received.hints([unwritten]))
    assert "rdns-unknown" in received.hop_hints(received.parse(QMAIL))


def test_entry_and_origin_hops_give_combined_hints() -> None:
    hops = received.hops([LOCAL, POSTFIX, ZOMBIE])
    external = [hop for hop in hops if received.is_public(hop.ip)]
    found = received.hints(external)
    assert {"rcvd:entry:proto:esmtpsa+authenticated", "rcvd:origin:proto:smtp+helo-ip-other+rdns-dynamic",
            "rcvd:any:proto:smtp", "rcvd:any:proto:esmtpsa"} <= found
    assert not any(token.startswith("rcvd:origin:") for token in received.hints(external[:1]))
    assert "rcvd:any:proto:esmtp" not in found  # the local delivery hop is not the sender's


# The receiving site's own relay: its border MX (mx.example.net, which took POSTFIX in) hands the
# message to a store host of the same domain; the relay has a public address named like a dynamic one.
SITE_RELAY = ("from mx.example.net (203-0-113-20-host.colo.example [203.0.113.20]) by store.example.net "
              "(8.18.1) with ESMTPS id 59SD1hTB078016")
# A sender's forged HELO of the recipient's domain: no hop below was received by that host.
FORGED_SITE = ("from mx.example.net (ppp-45.dsl.isp.example [192.0.2.45]) by store.example.net (Postfix) "
               "with SMTP id 8E2A13C765")


def test_the_site_s_own_relay_is_not_the_entry_hop() -> None:
    chain = received.hops([SITE_RELAY, POSTFIX])
    assert received.past_site_relays(chain) == chain[1:]
    found = received.hints([hop for hop in received.past_site_relays(chain) if received.is_public(hop.ip)])
    assert "rcvd:entry:proto:esmtpsa+authenticated" in found
    assert not any("rdns-dynamic" in token or "esmtps" in token.split(":")[-1].split("+") for token in found)
    raw = b"Received: " + SITE_RELAY.encode() + b"\r\nReceived: " + POSTFIX.encode() + b"\r\n\r\nbody text"
    assert "rcvd:entry:proto:esmtpsa" in tokenizer.tokens(mailview.build(raw))


def test_a_forged_site_helo_still_is_the_entry_hop() -> None:
    for chain in (received.hops([FORGED_SITE]), received.hops([FORGED_SITE, QMAIL])):
        assert received.past_site_relays(chain) == chain
    relay_elsewhere = SITE_RELAY.replace("by store.example.net", "by store.example.org")
    chain = received.hops([relay_elsewhere, POSTFIX])  # received by another domain than the HELO's
    assert received.past_site_relays(chain) == chain


def test_tokens_never_carry_hosts_addresses_or_dates() -> None:
    raw = "\r\n".join(f"Received: {value}" for value in (LOCAL, POSTFIX, EXIM, QMAIL, ZOMBIE)).encode()
    found = {token for token in tokenizer.tokens(mailview.build(raw + b"\r\n\r\nbody text")) if "rcvd" in token}
    assert not any("rcvd" in token for token in tokenizer.tokens(mailview.build(b"Subject: x\r\n\r\nbody text")))
    assert {"rcvd:entry:proto:esmtpsa", "rcvd:origin:proto:smtp", "rcvd:any:proto:esmtp"} <= found
    for token in found:
        assert not re.search(r"\d{2,}|example|isp|sep|2002", token.split(":", 1)[1]), token


@pytest.mark.parametrize("value", [
    "", "from", "from ", "from (", "from [", "from " + "(" * 5000, "from a (b [1.2.3.4" + "]" * 3000,
    "from x ([999.999.999.999] helo=) by", "from \x00\x01 by with", "from " + "a." * 10000 + " by y with " + "z" * 9000,
])
def test_malformed_fields_never_raise(value: str) -> None:
    hop = received.parse(value)
    hints = received.hop_hints(hop) if hop else []
    assert all(" " not in hint and len(hint) < 40 for hint in hints)
    assert received.hints(received.hops([value] * 50)) is not None
