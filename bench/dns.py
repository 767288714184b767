"""DNS resolver figures against a local dnsmasq: uncached and cached lookups per second.

Prints: the loop resolver's throughput with many queries in flight (each name new to the
cache), the same names answered from the cache, and, as the peer in the same run, a blocking
one-query-at-a-time client on a plain socket (what a thread per lookup would see at best).
Run: python3 bench/dns.py [N]
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smtpgw.net.dns import Answer, Resolver  # noqa: E402
from smtpgw.net.dnswire import A  # noqa: E402
from smtpgw.net.loop import EventLoop  # noqa: E402
from tests.support.dns import start_dnsmasq  # noqa: E402

WILDCARD = "bench.test"  # dnsmasq answers every name below it


def run_resolver(loop: EventLoop, resolver: Resolver, names: list[str]) -> tuple[float, int]:
    answers: list[Answer] = []
    started = time.perf_counter()
    for name in names:
        resolver.query(name, A, answers.append)
    loop.run_until(lambda: len(answers) == len(names), 120)
    elapsed = time.perf_counter() - started
    return elapsed, sum(1 for answer in answers if answer.error is None and answer.records)


def run_blocking(address: tuple[str, int], names: list[str]) -> float:
    started = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for n, name in enumerate(names):
            wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
            sock.sendto(struct.pack("!HHHHHH", n & 0xFFFF, 0x0100, 1, 0, 0, 0) + wire + b"\0\1\0\1", address)
            sock.recv(4096)
    return time.perf_counter() - started


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    server = start_dnsmasq(extra_args=(f"--address=/{WILDCARD}/192.0.2.1", "--cache-size=0"))
    loop = EventLoop()
    try:
        resolver = Resolver(loop, [server.address], timeout=2, attempts=2, cache_size=count, max_pending=count)
        names = [f"h{n}.{WILDCARD}" for n in range(count)]
        elapsed, ok = run_resolver(loop, resolver, names)
        print(f"resolver, uncached, {resolver.max_in_flight} in flight: {count / elapsed:9.0f} lookups/s "
              f"({ok}/{count} answered, {resolver.stats['timeouts']} timeouts)")
        elapsed, ok = run_resolver(loop, resolver, names)
        print(f"resolver, cached:                       {count / elapsed:9.0f} lookups/s ({ok}/{count})")
        blocking = run_blocking(server.address, [f"p{n}.{WILDCARD}" for n in range(count)])
        print(f"peer: blocking socket, one at a time:   {count / blocking:9.0f} lookups/s")
        resolver.close()
    finally:
        loop.close()
        server.stop()


if __name__ == "__main__":
    main()
