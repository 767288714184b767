#!/usr/bin/env python3
"""Speed of smtpgw's anti-spam engine on one core, beside spamd and bogofilter, in one run.

Figures: load time and memory of the shipped database; messages classified per
second by one process over the SpamAssassin public corpus (the full pipeline:
view, tokens, lists, rules, Bayes, term weights); a sample through
``spamassassin -L --mbox`` (local rules, no Bayes; one process) and the
corpus through bogofilter -B (one process for all files). Absolute times vary between runs on
these machines: compare the columns of one run.

Must never: assert on timings (it only prints), or talk to anything but its
own spamd on 127.0.0.1.

Usage: python3 bench/spam_speed.py [--corpus DIR] [--sa-messages 300] [--no-peers]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from smtpgw.spam.dbindex import index_file  # noqa: E402
from smtpgw.spam.spamfilter import SpamFilter  # noqa: E402

from spam_accuracy import CORPUS, load_sets, peers_available, run_spamassassin  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/status") as src:
        for line in src:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="anti-spam speed on one core")
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--sa-messages", type=int, default=300, help="messages sent through SpamAssassin")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args(argv)
    messages = [m for m in load_sets({"corpus": args.corpus, "packs": "/nonexistent"}, (), 1, tokenise=False)
                if m.set.startswith("sa-")]
    for message in messages:
        with open(message.file, "rb") as src:
            message.raw = src.read()
    size = sum(len(m.raw) for m in messages)
    print(f"corpus: {len(messages)} messages, {size / len(messages) / 1024:.1f} KiB average")

    before = rss_kib()
    started = time.perf_counter()
    spam_filter = SpamFilter(SimpleNamespace(SpamDetection="standard"), None)
    load = time.perf_counter() - started
    print(f"smtpgw database: {spam_filter.path}, {os.path.getsize(spam_filter.path) / 1e6:.2f} MB, "
          f"{len(spam_filter.database.bayes.counts)} tokens; opened in {load:.2f} s (its index "
          f"{os.path.getsize(index_file(spam_filter.path)) / 1e6:.2f} MB, mapped), +{(rss_kib() - before) / 1024:.0f} MiB resident")

    started = time.perf_counter()
    cpu = time.process_time()
    for message in messages:
        spam_filter.classify(message.raw, "192.0.2.1", "sender@example.com", ["rcpt@example.org"], [])
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    print(f"after them: +{(rss_kib() - before) / 1024:.0f} MiB resident (mapped index pages read included)")
    print(f"smtpgw classify: {len(messages) / wall:7.1f} msgs/s wall, {len(messages) / cpu:7.1f} msgs/s per CPU second"
          f" ({1000 * wall / len(messages):.2f} ms/msg)")

    peers = peers_available()
    if args.no_peers:
        return 0
    if peers["bogofilter"]:
        with tempfile.TemporaryDirectory() as folder:
            for flag, is_spam in (("-n", False), ("-s", True)):
                subprocess.run(["bogofilter", "-d", folder, flag, "-B", *[m.file for m in messages if m.is_spam == is_spam]],
                               check=True)
            started = time.perf_counter()
            subprocess.run(["bogofilter", "-d", folder, "-T", "-B", *[m.file for m in messages]], check=True,
                           capture_output=True)
            wall = time.perf_counter() - started
        print(f"bogofilter -T -B: {len(messages) / wall:7.1f} msgs/s (one process, C)")
    if peers["spamassassin"]:
        started = time.perf_counter()
        result = run_spamassassin(messages, args.sa_messages // 2)
        wall = time.perf_counter() - started
        print(f"spamassassin -L --mbox (rules, no Bayes): {len(result.rows) / wall:7.1f} msgs/s"
              f" over {len(result.rows)} messages, start-up included")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
