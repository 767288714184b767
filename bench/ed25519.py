#!/usr/bin/env python3
"""Speed of smtpgw's pure-Python Ed25519 (smtpgw/update/ed25519.py): key derivation, signing and
verifying the index of an update set, on one core; beside OpenSSL through the
``cryptography`` package when it is installed, for scale.

keepup2date verifies one signature per run (a few per key rotation), so only the
order of magnitude matters: well under a second.

Must never: assert on timings (it only prints), or touch the network.

Usage: python3 bench/ed25519.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.update import ed25519  # noqa: E402

INDEX_BYTES = 4096  # an update set's index.json with a few dozen files


def per_call(function: Callable[[], object], rounds: int) -> float:
    """Mean milliseconds per call."""
    start = time.perf_counter()
    for _ in range(rounds):
        function()
    return (time.perf_counter() - start) * 1000 / rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ed25519 speed, pure Python")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    message = os.urandom(INDEX_BYTES)
    secret = os.urandom(32)
    public = ed25519.public_key(secret)
    signature = ed25519.sign(secret, message)
    print(f"message: {len(message)} bytes, {args.rounds} rounds")
    print(f"smtpgw.ed25519 public key: {per_call(lambda: ed25519.public_key(secret), args.rounds):8.2f} ms")
    print(f"smtpgw.ed25519 sign:       {per_call(lambda: ed25519.sign(secret, message), args.rounds):8.2f} ms")
    verify = per_call(lambda: ed25519.verify(public, message, signature), args.rounds)
    print(f"smtpgw.ed25519 verify:     {verify:8.2f} ms")
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        print("OpenSSL (cryptography package) not installed: no comparison")
        return 0
    key = Ed25519PublicKey.from_public_bytes(public)
    print(f"OpenSSL verify:            {per_call(lambda: key.verify(signature, message), args.rounds):8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
