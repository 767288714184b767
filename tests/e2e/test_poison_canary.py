"""Poison in the queue does not stop the mail: with two of each hostile message an attacker can
get queued (a pax-digit tar, a uuencode flood, megabytes of base64 garbage, a spam carrying a
virus, routed recipients from a trusted client, an injection HELO, bare LF lines) and the refused
kinds tried in between (NUL in commands and data, routed recipients from an untrusted client,
oversized control requests), a clean message sent next is delivered within 10 seconds, and no
gateway process (main or scanner worker) grows past the resident size README states."""

from __future__ import annotations

import threading
import time

from tests.e2e.test_limits import send_data, session
from tests.support.clamd import EICAR_NAME, uu_flood
from tests.support.hostile import (CANARY, DOMAIN_ONLY, NO_NOTICES, ROUTED, SPOOF_HELO, av_gateway, base64_garbage,
                                   gateway_pids, oversized_request, pax_digits_tar, peak_rss, send, spam_with_a_virus)
from tests.support.net import GatewayProcess, RawClient, wait_until

RSS_BOUND = 256 << 20  # bytes, per gateway process: README, "Resource bounds"
CANARY_DEADLINE = 10.0  # seconds from the canary's 250 to its delivery
COPIES = 2
QUEUED_KINDS = 7  # pax tar, uuencode flood, base64 garbage, injection HELO, spam with a virus, routed, bare LF


class PeakSampler:
    """The peak resident size of every gateway process, read from /proc every 50 ms while the
    poison is processed (a worker replaced meanwhile keeps its figure)."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.peaks: dict[int, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.05):
            self.sample()

    def sample(self) -> None:
        for pid in gateway_pids(self.gw):
            try:
                self.peaks[pid] = max(self.peaks.get(pid, 0), peak_rss(pid))
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                continue  # a worker that ended between the listing and the read

    def stop(self) -> dict[int, int]:
        self.done.set()
        self.thread.join(10)
        self.sample()
        return self.peaks


def refused_nul(gw: GatewayProcess) -> None:
    """NUL in a command (501 5.5.2, not run) and in message data (550 5.6.0)."""
    c = session(gw.port)
    assert c.cmd("MAIL FROM:<a@b.test>\0 SIZE=10")[0] == 501
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert send_data(c, b"Subject: nul\r\n\r\nbefore\0after\r\n")[0] == 550
    c.close()


def refused_routing(gw: GatewayProcess) -> None:
    """Routed recipients from a client only the domain rule allows: 550 5.7.1 each."""
    c = session(gw.port)
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert [c.cmd(f"RCPT TO:<{rcpt}>")[0] for rcpt in ROUTED] == [550] * len(ROUTED)
    c.close()


def trusted_routing(gw: GatewayProcess) -> None:
    """The same routed recipients from the trusted network: queued, relayed as written."""
    c = session(gw.port, source="127.0.0.2")
    assert c.cmd("MAIL FROM:<a@example.test>")[0] == 250
    assert [c.cmd(f"RCPT TO:<{rcpt}>")[0] for rcpt in ROUTED] == [250] * len(ROUTED)
    # a well-formed message: the spam filter must have no say in whether it is relayed
    message = (b"From: <a@example.test>\r\nTo: <x@example.test>\r\nDate: Mon, 7 Dec 2026 08:00:00 +0000\r\n"
               b"Message-ID: <routed@example.test>\r\nSubject: routed\r\n\r\nThe minutes of the meeting.\r\n")
    assert send_data(c, message)[0] == 250
    c.close()


def raw_message(gw: GatewayProcess, data: bytes, helo: str = "client.test") -> None:
    """``data`` as sent (no line-end fixing), after ``EHLO helo``."""
    c = RawClient(gw.port)
    assert c.reply()[0] == 220 and c.cmd(f"EHLO {helo}")[0] == 250
    assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert send_data(c, data)[0] == 250
    c.close()


def test_a_canary_flows_past_two_of_each_poison_in_bounded_memory(make_gateway, sink, clamd) -> None:
    pax, flood, garbage, spam = pax_digits_tar(), uu_flood(1000, 100), base64_garbage(7_600_000), spam_with_a_virus()
    gw = av_gateway(make_gateway, sink, clamd, policy=[*NO_NOTICES, ("ActionSpam", "quarantine")],
                    replace={"smtpgw.access": DOMAIN_ONLY}, smtpgw__antispam=[("Check", "true")])
    gw.control(".c_avir_off")  # the poison waits in the queue, all of it ahead of the canary
    gw.wait_log(r"scanning off")
    sampler = PeakSampler(gw)
    started = time.monotonic()
    for n in range(COPIES):
        send(gw, pax)
        refused_nul(gw)
        send(gw, flood)
        refused_routing(gw)
        send(gw, garbage)
        raw_message(gw, b"Message-ID: <m\x1b]0;owned\x07@b.test>\r\nSubject: inject\r\n\r\nhi\r\n", SPOOF_HELO)
        send(gw, spam)
        oversized_request(gw, f"big{n}")  # refused unread
        trusted_routing(gw)
        raw_message(gw, b"Subject: lf\n\nfrom a script\nline two\r\n")
    assert len(gw.queued("WFC")) == QUEUED_KINDS * COPIES
    gw.control(".c_avir_on")
    gw.wait_log(r"scanning on")
    send(gw, CANARY)
    sent = time.monotonic()
    wait_until(lambda: any(b"still flowing" in m.data for m in sink.messages), CANARY_DEADLINE, "the canary")
    latency = time.monotonic() - sent
    assert latency < CANARY_DEADLINE, latency

    gw.wait_log(r'AV-SCANNED, group=policy, status="error"', timeout=60, count=2 * COPIES)  # pax and flood
    gw.wait_log(rf'AV-SCANNED, group=policy, status="infected".*{EICAR_NAME}', count=COPIES)
    gw.wait_log(r"control request \.q_big\d refused and removed", count=COPIES)
    wait_until(lambda: not gw.queued(), 60, "every poison message scanned and sent or stopped")
    peaks = sampler.stop()
    total = time.monotonic() - started

    delivered = sink.messages
    assert not any(stopped in m.data for m in delivered for stopped in (b"logs.tar", b"f0-0.bin", b"invoice.com"))
    assert sum(1 for m in delivered if m.recipients == list(ROUTED)) == COPIES
    main = peaks.pop(gw.proc.pid)
    figures = (f"canary {latency:.1f}s, all done in {total:.1f}s, peak RSS MiB: main {main / 2**20:.0f}, "
               f"workers {[round(p / 2**20) for p in peaks.values()]}")
    print(figures)
    assert peaks, figures  # at least one worker was sampled
    assert max(main, *peaks.values()) < RSS_BOUND, figures
