#!/usr/bin/env python3
"""Receiving while the next hop is down: does deferring the queue slow the SMTP side?

A gateway (Check=false) whose only next hop refuses connections gets N messages over S sessions
(Postfix's smtp-source when installed, else threads of smtplib); every message is deferred as it
arrives: a connection refused, the record written back to QUE with its back-off (as when a site's
mail server is down and mail keeps coming). Meanwhile one client times a whole SMTP transaction (connect to 250 after end of data) ten times a second.

Prints: accepted msgs/s, the probe transactions' p50 / p90 / p99 / max in ms, the deferrals
logged, and the load average (the machine may be shared: compare runs made side by side).

    python3 bench/deferral.py [--messages 2000] [--sessions 50] [--size 4096]

Must never: talk to anything but 127.0.0.1; wait without a deadline; leave a process running.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.components import which  # noqa: E402
from tests.support.net import GatewayProcess, free_port  # noqa: E402

SENDER, RCPT = "bench@src.test", "rcpt@example.test"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def probe(port: int, stop: threading.Event, timings: list[float]) -> None:
    """One whole transaction ten times a second until ``stop``; each one's seconds in ``timings``."""
    message = f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: probe\r\n\r\nprobe\r\n"
    while not stop.wait(0.1):
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.sendmail(SENDER, [RCPT], message)
        timings.append(time.perf_counter() - started)


def load(port: int, messages: int, sessions: int, size: int) -> None:
    source = which("smtp-source")
    if source:
        subprocess.run([source, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-f", SENDER, "-t", RCPT,
                        f"127.0.0.1:{port}"], check=True, timeout=900, stdout=subprocess.DEVNULL)
        return
    body = f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: load\r\n\r\n" + "x" * 76 + "\r\n" * (size // 78)
    per_session = -(-messages // sessions)

    def one_session(count: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            for _ in range(count):
                client.sendmail(SENDER, [RCPT], body)
    threads = [threading.Thread(target=one_session, args=(min(per_session, messages - i * per_session),))
               for i in range(sessions) if messages - i * per_session > 0]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(900)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smtpgw-deferral-") as tmp:
        down = free_port()  # nothing listens there: every connection is refused
        gw = GatewayProcess(tmp, down, extra={
            "smtpgw.limits": [("IncomingSessions", "1024"), ("MaximalIncomingSessionsPerIP", "1024"),
                              ("MaximalIncomingMessagesPerSession", "1024")],
            "smtpgw.resolve": [("UnreachableTTL", "0")],
            "smtpgw.options": [("LogLevel", "info")],
            "smtpgw.policy": [("Check", "false"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none")],
            "smtpgw.antispam": [("Check", "false")],
        })
        gw.start(timeout=60)
        try:
            stop, timings = threading.Event(), []
            prober = threading.Thread(target=probe, args=(gw.port, stop, timings), daemon=True)
            prober.start()
            started = time.perf_counter()
            load(gw.port, args.messages, args.sessions, args.size)
            elapsed = time.perf_counter() - started
            stop.set()
            prober.join(60)
            deferrals = gw.log_text().count("status=deferred")
        finally:
            gw.stop(60)
    ms = [t * 1000 for t in timings]
    print(f"{args.messages} x {args.size} B over {args.sessions} sessions, next hop down; {os.cpu_count()} cores; "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"accepted {args.messages / elapsed:.0f} msgs/s; {deferrals} deferrals logged")
    print(f"probe transactions ({len(ms)}): p50 {percentile(ms, 0.5):.0f} ms, p90 {percentile(ms, 0.9):.0f} ms, "
          f"p99 {percentile(ms, 0.99):.0f} ms, max {max(ms):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
