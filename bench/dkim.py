#!/usr/bin/env python3
"""Speed of DKIM verification in a scanner worker (smtpgw/mail/dkim.py), on one core.

Figures: verifications per second of one signed message of each size (canonicalisation, body hash,
RSA or Ed25519 check; the keys already looked up, as the worker gets them) for RSA 1024, 2048 and
4096 bits and Ed25519, and the anti-spam classification of the same message (bench/spam_speed.py
measures it over a corpus) with and without its verification: what DKIM adds to the
per-message CPU of a worker.

Must never: assert on timings (it only prints), or touch the network (keys made by openssl here).

Usage: python3 bench/dkim.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.mail import dkim  # noqa: E402
from smtpgw.spam.spamfilter import SpamFilter  # noqa: E402
from tests.support.dkimsign import make_key, sign  # noqa: E402

HEAD = (b"From: Example Shop <news@shop.example>\r\nTo: bob@example.test\r\nSubject: Your weekly picks\r\n"
        b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <w1@shop.example>\r\n"
        b"List-Unsubscribe: <https://shop.example/u/1>\r\n\r\n")
LINE = b"Fresh picks for the season: coats, boots and scarves at https://shop.example/picks  \r\n"


def per_second(function: Callable[[], object], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        function()
    return rounds / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DKIM verification speed on one core")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    spam = SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), None)
    with tempfile.TemporaryDirectory() as folder:
        keys = {f"rsa-{bits}": make_key(folder, f"rsa{bits}", bits=bits) for bits in (1024, 2048, 4096)}
        keys["ed25519"] = make_key(folder, "ed", kind="ed25519")
        print(f"{'key':<10} {'size':>7} {'verify/s':>9} {'classify/s':>11} {'both/s':>8}  result")
        for size in (2_000, 20_000, 200_000):
            message = HEAD + LINE * (size // len(LINE))
            classify = per_second(lambda: spam.classify(message, None, "", [], []), max(20, args.rounds // 4))
            for name, key in keys.items():
                raw = sign(message, key, "shop.example", "s1")
                answers = {"s1._domainkey.shop.example": {"txt": [key.record()]}}
                result = dkim.verify(raw, answers)[0]

                def both() -> None:
                    with dkim.verified(dkim.verify(raw, answers)):
                        spam.classify(raw, None, "", [], [])

                verify = per_second(lambda: dkim.verify(raw, answers), args.rounds)
                combined = per_second(both, max(20, args.rounds // 4))
                print(f"{name:<10} {len(raw):>7} {verify:>9.0f} {classify:>11.0f} {combined:>8.0f}  {result.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
