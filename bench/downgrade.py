#!/usr/bin/env python3
"""8-bit to 7-bit conversion speed (smtpgw.downgrade).

Prints, for the messages of shared/corpus (mime-torture and spamassassin):
how many need conversion, are converted or refused, and µs per message for
``needs_downgrade`` over all of them and ``to_7bit`` over those that need it;
then MB/s of ``to_7bit`` on large synthetic messages (8-bit text, a binary
attachment, a 5 MB line, 4000 small 8-bit parts). Each figure is the median of
R rounds after a warm-up.

    python3 bench/downgrade.py [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smtpgw.mail.downgrade import needs_downgrade, to_7bit  # noqa: E402
from tests.support.net import CORPUS  # noqa: E402

HEAD = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"


def corpus() -> list[bytes]:
    messages = []
    for folder in ("mime-torture", "spamassassin"):
        for path in sorted(Path(CORPUS, folder).rglob("*.eml")):
            raw = path.read_bytes()
            if raw.startswith(b"From "):
                raw = raw[raw.find(b"\n") + 1 :]
            messages.append(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    return messages


def synthetic() -> dict[str, bytes]:
    text = ("Grüße aus Köln, naïve café — " * 3 + "\r\n").encode() * 100_000
    blob = os.urandom(10_000_000)
    parts = b"".join(b"--XX\r\nContent-Type: text/plain\r\n\r\nh\xc3\xa9llo %d\r\n" % i for i in range(4000))
    return {
        "8-bit text, 11 MB": HEAD + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text,
        "binary attachment, 10 MB": HEAD
        + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: application/octet-stream\r\n"
        + b"Content-Transfer-Encoding: binary\r\n\r\n"
        + blob
        + b"\r\n--XX--\r\n",
        "one 5 MB line (7-bit html)": HEAD + b"Content-Type: text/html\r\n\r\n<p>" + b"x" * 5_000_000 + b"</p>\r\n",
        "4000 small 8-bit parts": HEAD + b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n" + parts + b"--XX--\r\n",
    }


def timed(rounds: int, work: Callable[[], object]) -> tuple[float, float, float]:
    work()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples), max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    messages = corpus()
    if messages:
        needing = [raw for raw in messages if needs_downgrade(raw)]
        results = [to_7bit(raw) for raw in needing]
        refused = sum(1 for out in results if out is None)
        print(f"corpus: {len(messages)} messages, {len(needing)} need conversion, "
              f"{len(needing) - refused} converted, {refused} refused")
        median, low, high = timed(args.rounds, lambda: [needs_downgrade(raw) for raw in messages])
        print(f"  needs_downgrade: {median / len(messages) * 1e6:8.1f} µs/message (range {low:.3f}-{high:.3f} s)")
        median, low, high = timed(args.rounds, lambda: [to_7bit(raw) for raw in needing])
        size = sum(map(len, needing)) / 1e6
        print(f"  to_7bit:         {median / len(needing) * 1e6:8.1f} µs/message, {size / median:6.1f} MB/s "
              f"(range {low:.3f}-{high:.3f} s)")
    else:
        print(f"corpus not found at {CORPUS}")
    for name, raw in synthetic().items():
        median, low, high = timed(args.rounds, lambda: to_7bit(raw))
        print(f"{name:28} {len(raw) / 1e6 / median:7.1f} MB/s  {median * 1000:7.1f} ms (range {low * 1000:.1f}-{high * 1000:.1f})")


if __name__ == "__main__":
    main()
