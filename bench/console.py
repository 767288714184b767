#!/usr/bin/env python3
"""The web console under load, and what it costs SMTP.

Prints the SMTP transaction time (median and 99th percentile, one message per
transaction) with the console idle, then again while browser-like clients
fetch the status page and /metrics as fast as they can, and how many console
requests per second they got; plus the time of one /metrics scrape.

    python3 bench/console.py [--messages 300] [--clients 4]

Everything stays on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.console.auth import hash_password  # noqa: E402
from tests.support.net import GatewayProcess, Sink, free_port  # noqa: E402

MESSAGE = b"From: a@b.test\r\nTo: x@example.test\r\nSubject: bench\r\n\r\n" + b"line of text\r\n" * 200
PASSWORD = "bench-password"


def smtp_times(port: int, count: int) -> list[float]:
    times = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for _ in range(count):
            start = time.perf_counter()
            client.sendmail("a@b.test", ["x@example.test"], MESSAGE)
            times.append(time.perf_counter() - start)
    return times


def summary(label: str, times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{label}: median {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms over {len(times)}"


def session_cookie(base: str) -> str:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None
    form = urllib.parse.urlencode({"user": "admin", "password": PASSWORD}).encode()
    try:
        urllib.request.build_opener(NoRedirect).open(urllib.request.Request(base + "/login", form), timeout=30)
    except urllib.error.HTTPError as answer:
        return answer.headers["Set-Cookie"].split(";")[0]
    raise SystemExit("login did not redirect")


def hammer(base: str, cookie: str, stop: threading.Event, counts: list[int]) -> None:
    paths = ("/", "/metrics", "/queue", "/stats")
    index = 0
    while not stop.is_set():
        request = urllib.request.Request(base + paths[index % len(paths)], headers={"Cookie": cookie})
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
        counts.append(1)
        index += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    sink = Sink()
    console_port = free_port()
    with tempfile.TemporaryDirectory(prefix="smtpgw-bench-console-") as folder:
        gw = GatewayProcess(folder, sink.port, extra={
            "smtpgw.options": [("LogLevel", "info")],
            "smtpgw.limits": [("MaximalIncomingMessagesPerSession", "1024")],
            "smtpgw.console": [("ListenOn", f"127.0.0.1:{console_port}"),
                               ("AdminPasswordHash", hash_password(PASSWORD, 100_000))]}).start()
        base = f"http://127.0.0.1:{console_port}"
        try:
            idle = smtp_times(gw.port, args.messages)
            cookie = session_cookie(base)
            start = time.perf_counter()
            for _ in range(20):
                urllib.request.urlopen(base + "/metrics", timeout=30).read()
            scrape = (time.perf_counter() - start) / 20
            stop, counts = threading.Event(), []
            threads = [threading.Thread(target=hammer, args=(base, cookie, stop, counts)) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            began = time.perf_counter()
            loaded = smtp_times(gw.port, args.messages)
            elapsed = time.perf_counter() - began
            stop.set()
            for thread in threads:
                thread.join(60)
            sink.wait_for(2 * args.messages, timeout=120)
            print(summary("SMTP, console idle", idle))
            print(summary(f"SMTP, {args.clients} console clients busy", loaded))
            print(f"console under that load: {len(counts) / elapsed:.0f} requests/s (status, /metrics, queue, stats)")
            print(f"one /metrics scrape, console otherwise idle: {scrape * 1000:.1f} ms")
        finally:
            gw.stop()
            sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
