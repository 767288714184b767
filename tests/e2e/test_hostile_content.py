"""Hostile message content sent through SMTP: no message stops scanning, costs unbounded work or
memory, or is stopped by one check without being judged by the other."""

from __future__ import annotations

import os
import re

from tests.support.clamd import EICAR_NAME, ClamdInstance, uu_flood
from tests.support.hostile import (CANARY, NO_NOTICES, av_gateway, base64_garbage, gateway_pids, pax_digits_tar,
                                   peak_rss, send, spam_with_a_virus)
from tests.support.net import GatewayProcess, Sink, wait_until


def canary_delivered(gw: GatewayProcess, sink: Sink) -> None:
    """A clean message sent after the poison ones is delivered: scanning goes on."""
    send(gw, CANARY)
    wait_until(lambda: any(b"still flowing" in m.data for m in sink.messages), 30, "the canary delivered")


def test_a_tar_with_a_pax_header_of_digits_is_an_error_not_a_busy_worker(make_gateway, sink, clamd) -> None:
    """CVE-2024-6232: 600,000 digits in a pax header kept a worker in the standard library's
    tarfile past the job timeout, again at every retry."""
    poison = pax_digits_tar()
    gw = av_gateway(make_gateway, sink, clamd)
    send(gw, poison)
    send(gw, poison)
    [line, _] = gw.wait_log(r'AV-SCANNED, group=policy, status="error"', timeout=30, count=2)
    canary_delivered(gw, sink)
    gw.wait_log(r'BLOCKED, rcpt=x@example.test, size=\d+, reason="error 2:logs.tar"', count=2)
    assert not any(b"logs" in m.data for m in sink.messages), line


def clamd_scans(instance: ClamdInstance) -> int:
    """Scans the private clamd made so far (it logs each one, ``LogClean yes``)."""
    with open(os.path.join(instance.workdir, "clamd.log"), encoding="utf-8", errors="replace") as log:
        return sum(1 for line in log if re.search(r"stream\(.*\): (OK|.* FOUND|.* ERROR)", line))


def test_one_message_cannot_become_a_hundred_thousand_clamd_scans(make_gateway, sink, clamd_factory) -> None:
    """1,000 text parts x 100 tiny uuencoded files: one clamd connection each (100,000) before;
    now the message's scan budget ends it, and the message is an error, never clean."""
    counted = clamd_factory(extra=["LogClean yes"])
    gw = av_gateway(make_gateway, sink, counted, ave=[("MaximalClamdScans", "300")])
    send(gw, uu_flood(1000, 100))
    gw.wait_log(r'AV-SCANNED, group=policy, status="error"', timeout=60)
    gw.wait_log(r'BLOCKED, rcpt=x@example.test, size=\d+, reason="error ')
    gw.wait_log(r"scan budget exceeded, status error: more than MaximalMessageObjects \(5000\) objects")
    scans = clamd_scans(counted)
    assert scans <= 301, scans  # the budget, and the whole message once more
    canary_delivered(gw, sink)


def worker_peak_rss(gw: GatewayProcess) -> int:
    """The largest peak resident size (bytes) of the gateway's scanner workers."""
    return max(peak_rss(pid) for pid in gateway_pids(gw)[1:])


def test_base64_garbage_is_decoded_in_bounded_memory(make_gateway, sink, clamd) -> None:
    """8 MB of bytes mostly outside the base64 alphabet: about 1 GB of worker memory before."""
    poison = base64_garbage(6 << 20)
    gw = av_gateway(make_gateway, sink, clamd, smtpgw__limits=[("MaximalIncomingMessageSize", "20480")])
    send(gw, CANARY)  # a worker started, its baseline known
    sink.wait_for(1)
    baseline = worker_peak_rss(gw)
    send(gw, poison)
    gw.wait_log(r"AV-SCANNED, group=policy", count=2)
    grown = worker_peak_rss(gw) - baseline
    # the message and what it decodes to (2.2 times the message here; about 100 times before)
    assert grown < 4 * len(poison), (grown, len(poison))


def test_a_quarantined_spam_is_virus_scanned_and_stored_with_both_verdicts(make_gateway, sink, clamd) -> None:
    """A spam that ActionSpam=quarantine stops was stored as clean, unscanned; ``store release
    --without-check`` then delivered its virus. Both verdicts are now made before any action."""
    gw = av_gateway(make_gateway, sink, clamd, policy=[*NO_NOTICES, ("ActionSpam", "quarantine")],
                    smtpgw__antispam=[("Check", "true")])
    send(gw, spam_with_a_virus())
    [scanned] = gw.wait_log(r'AV-SCANNED, group=policy, status="infected"')
    assert EICAR_NAME in scanned
    [blocked] = gw.wait_log(r"BLOCKED, rcpt=x@example.test")
    assert 'reason="Spam, ActionSpam=quarantine; infected 2:invoice.com' in blocked, blocked
    quarantine = os.path.join(gw.folder, "var", "quarantine")
    wait_until(lambda: [n for n in os.listdir(quarantine) if n.endswith(".json")] if os.path.isdir(quarantine)
               else [], 10, "the quarantined copy")
    listing = gw.cli("store", "--path", "quarantine", "list").stdout
    [item] = [line.split()[0] for line in listing.splitlines() if " INF " in line]
    shown = gw.cli("store", "--path", "quarantine", "show", item).stdout
    assert f"Verdicts: anti-virus infected ({EICAR_NAME}); spam Spam" in shown, shown


def test_a_blocked_spam_records_its_virus_too(make_gateway, sink, clamd) -> None:
    gw = av_gateway(make_gateway, sink, clamd, policy=[*NO_NOTICES, ("ActionSpam", "block")],
                    smtpgw__antispam=[("Check", "true")])
    send(gw, spam_with_a_virus())
    gw.wait_log(r'AS-SCANNED, group=policy, .*as-status="Spam".*action=block')
    gw.wait_log(r'AV-SCANNED, group=policy, status="infected"')
    gw.wait_log(r'BLOCKED, rcpt=x@example.test, size=\d+, reason="Spam, ActionSpam=block; infected 2:invoice.com')
    canary_delivered(gw, sink)
    assert [m for m in sink.messages if b"invoice.com" in m.data] == []
