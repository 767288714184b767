#!/usr/bin/env python3
"""CPU per message of the scanning stage's own steps around the spam check, for one tree or two.

    python3 bench/scan_steps.py [--calls 20000] [--rounds 5] [--tree DIR ...]

The steps a message with no DKIM signature goes through besides the spam check and clamd (the
bench/cpu.py message: 4 KiB, the fields smtp-source writes and two Received fields): the key
names read on the loop (``dkim.key_names``), and in the worker the verification
(``dkim.verify``), our Authentication-Results (``dkim.stamp``), the X-SpamTest fields
(``headers.prepend``) and X-Anti-Virus (``headers.remove`` + ``prepend``), then the job's result
as its JSON line. Each tree is imported in a process of its own; a figure is the best of
``--rounds`` runs of ``--calls`` calls, timed by the thread's CPU clock, with the trees' runs
alternating. bench/cpu.py measures whole messages; this measures the steps without the noise of
a shared machine.

Must never: write anything, or talk to the network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = r'''
import dataclasses, json, sys, time
from smtpgw.mail import dkim, headers
from smtpgw.scan.job import CopyResult, ScanResult

head = (b"Received: from client.example (localhost [127.0.0.1]) by mx.example with ESMTP id 4Xk\r\n"
        b"\tfor <rcpt@example.org>; Mon, 7 Dec 2026 16:00:00 +0000\r\n"
        b"Received: from [10.0.0.5] by client.example; Mon, 7 Dec 2026 15:59:59 +0000\r\n"
        b"From: <sender@example.com>\r\nTo: <rcpt@example.org>\r\nDate: Mon, 7 Dec 2026 16:00:00 +0000\r\n"
        b"Message-Id: <20261207160000.1.1@client.example>\r\nSubject: La de da\r\n\r\n")
raw = head + b"La de da de da 1.\r\n" * ((4096 - len(head)) // 19)
result = ScanResult([CopyResult("policy", ["rcpt@example.org"], events=[
    ('AS-SCANNED, group=%s, nrcpt=%d, status=%s, method=%s, rate=%s, action=%s, reasons="%s"',
     ["policy", 1, "Not detected", "Content", "0", "pass", "words 0.12; signs 0.00"]),
    ('AV-SCANNED, group=%s, status="%s", names="%s", nrcpt=%d', ["policy", "clean", "", 1])],
    notes={"status": "clean", "virus_names": [], "spam_status": "Not detected", "notifications": []})])

def worker():
    dkim.verify(raw, {})
    out = headers.prepend(raw, [("X-SpamTest-Status", "Not detected"), ("X-SpamTest-Method", "Content"),
                                ("X-SpamTest-Rate", "0")])
    out = dkim.stamp(out, "gw.example", [dkim.Result("none", "no signature")])
    out = headers.prepend(headers.remove(out, "X-Anti-Virus"),
                          [("X-Anti-Virus", "Kaspersky Anti-Virus for Linux Mail Server 5.6.39/RELEASE, bases: "
                                            "20261207 #1, check: 20261207 clean")])
    data = result.as_dict() if hasattr(result, "as_dict") else dataclasses.asdict(result)
    json.dumps({"qid": "4Xk", **data}, separators=(",", ":"))

steps = {"loop: key_names": lambda: dkim.key_names(raw), "worker: header and DKIM steps, result line": worker}
calls, rounds = int(sys.argv[1]), int(sys.argv[2])
best = {}
for name, step in steps.items():
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            step()
        times.append((time.thread_time() - start) / calls)
    best[name] = min(times)
print(json.dumps(best))
'''


def measure(tree: str, calls: int, rounds: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", STEPS, str(calls), str(rounds)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", action="append", help="a source tree (default: this one)")
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in args.tree or [REPO]]
    results: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    for _ in range(2):  # the trees alternate: both see the same conditions
        for tree in trees:
            results[tree].append(measure(tree, args.calls, args.rounds))
    for tree in trees:
        best = {name: min(run[name] for run in results[tree]) for name in results[tree][0]}
        print(tree + ": " + "; ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in best.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
