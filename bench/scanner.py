#!/usr/bin/env python3
"""Anti-virus scanner throughput over the test corpus, with a private clamd.

Prints, for the messages of shared/corpus (mime-torture and spamassassin):
* MIME decomposition alone (smtpgw.mime.decompose): µs per message, msgs/s, MB/s;
* the whole AV stage (smtpgw.antivirus.scan_message: decompose, clamd per
  object, policy, rebuild, X-header) in 1 and in W worker processes;
* as the peer in the same run, raw clamd INSTREAM of the same whole messages
  from 1 and from W clients (what handing clamd the message alone costs);
* the clamd scans the AV stage makes per message (mean and most), and the
  bytes it sends to clamd per byte of message.

clamd runs with ``DisableCache yes`` so that a second pass over the same bytes
costs what the first did; every figure follows a warm-up pass and is the
median of R interleaved rounds (the range is printed too).

    python3 bench/scanner.py [--messages N] [--workers W] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smtpgw.config import load_config  # noqa: E402
from smtpgw.mail.mime import Limits, decompose  # noqa: E402
from smtpgw.scan.antivirus import scan_message  # noqa: E402
from smtpgw.scan.clamd import ClamdPool  # noqa: E402
from tests.support.clamd import start_clamd  # noqa: E402
from tests.support.net import CORPUS  # noqa: E402

MINIMAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "config" / "minimal.conf"

_worker: tuple[Any, ClamdPool] | None = None


def corpus(limit: int) -> list[bytes]:
    folders = (Path(CORPUS, "mime-torture"), Path(CORPUS, "spamassassin"))
    files = sorted(path for folder in folders for path in folder.rglob("*.eml"))
    if not files:
        sys.exit(f"no corpus under {CORPUS}")
    return [path.read_bytes() for path in files[:limit]]


def write_config(folder: str, clamd_address: str) -> str:
    path = os.path.join(folder, "smtpgw.conf")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(MINIMAL.read_text() + f"\n[smtpgw.ave]\nClamdAddress={clamd_address}\n")
    return path


def worker_init(config_path: str) -> None:
    global _worker
    cfg = load_config(config_path)
    _worker = (cfg, ClamdPool.from_config(cfg.ave))


def worker_scan(raws: Sequence[bytes]) -> int:
    assert _worker is not None
    cfg, pool = _worker
    for raw in raws:
        scan_message(raw, cfg.policy, cfg.ave, pool, cfg.base.TemplatesPath)
    return len(raws)


class CountingPool(ClamdPool):
    """The real pool, counting the scans asked of clamd and the bytes sent."""

    calls = 0
    sent = 0

    def scan(self, data: bytes) -> Any:
        self.calls += 1
        self.sent += len(data)
        return super().scan(data)


def scan_counts(cfg: Any, address: str, raws: list[bytes]) -> None:
    """Print the clamd scans per message of the AV stage, and the bytes sent per message byte."""
    most = 0
    pool = CountingPool([address])
    for raw in raws:
        before = pool.calls
        scan_message(raw, cfg.policy, cfg.ave, pool, cfg.base.TemplatesPath)
        most = max(most, pool.calls - before)
    size = sum(map(len, raws))
    print(f"clamd scans per message: {pool.calls / len(raws):.2f} mean, {most} most;"
          f" {pool.sent / size:.2f} bytes sent to clamd per message byte")


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def report(label: str, runs: list[float], count: int, size: int) -> None:
    """Median of the rounds (the machine is shared: figures vary run to run), and the range."""
    seconds = statistics.median(runs)
    print(
        f"{label:<44} {count / seconds:>7.0f} msgs/s {size / seconds / 1e6:>6.2f} MB/s"
        f" {seconds / count * 1e6:>7.0f} µs/msg"
        f"  (rounds {count / max(runs):.0f}-{count / min(runs):.0f} msgs/s)"
    )


def raw_scan(job: tuple[ClamdPool, list[bytes]]) -> None:
    client, raws = job
    for raw in raws:
        client.scan(raw)


def batches(raws: list[bytes], parts: int) -> list[list[bytes]]:
    return [raws[i::parts] for i in range(parts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="at most this many corpus messages")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="parallel scanners")
    parser.add_argument("--rounds", type=int, default=3, help="measure each figure this many times")
    args = parser.parse_args()
    raws = corpus(args.messages)
    size = sum(map(len, raws))
    workers = max(1, args.workers)
    print(f"{len(raws)} messages, {size / 1e6:.1f} MB, {workers} workers, {os.cpu_count()} CPUs")
    clamd = start_clamd(extra=["DisableCache yes"])
    try:
        with tempfile.TemporaryDirectory(prefix="smtpgw-bench-") as folder:
            config_path = write_config(folder, clamd.unix_address)
            worker_init(config_path)
            assert _worker is not None
            pool = _worker[1]
            print(f"clamd {pool.engine()}, private, custom test signatures only")
            scan_counts(_worker[0], clamd.unix_address, raws)
            worker_scan(raws[:300])  # warm-up: clamd's first pass is slower
            limits = Limits()
            clients = [ClamdPool([clamd.unix_address]) for _ in range(workers)]
            runs: dict[str, list[float]] = {}
            with ThreadPoolExecutor(workers) as threads, ProcessPoolExecutor(
                workers, initializer=worker_init, initargs=(config_path,)
            ) as processes:
                list(processes.map(worker_scan, batches(raws[:200], workers)))  # start the workers
                measures: dict[str, Callable[[], object]] = {
                    "decomposition only, 1 process": lambda: [decompose(r, limits) for r in raws],
                    "raw clamd INSTREAM, whole message, 1 client": lambda: [pool.scan(r) for r in raws],
                    "scan_message (AV stage), 1 process": lambda: worker_scan(raws),
                    f"raw clamd INSTREAM, {workers} clients": lambda: list(
                        threads.map(raw_scan, zip(clients, batches(raws, workers)))
                    ),
                    f"scan_message (AV stage), {workers} processes": lambda: list(
                        processes.map(worker_scan, batches(raws, workers))
                    ),
                }
                for _ in range(args.rounds):
                    for label, action in measures.items():
                        runs.setdefault(label, []).append(timed(action))
            for label, times in runs.items():
                report(label, times, len(raws), size)
    finally:
        clamd.remove()


if __name__ == "__main__":
    main()
