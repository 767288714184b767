#!/usr/bin/env python3
"""CPU of a scanner worker's whole job (Check=true: spam check, MIME, clamd), for one tree or two.

    python3 bench/scan_job.py [--messages 1500] [--corpus 400] [--rounds 3] [--tree DIR ...]
    python3 bench/scan_job.py --cprofile /tmp/job.prof            # the bench message under cProfile
    python3 bench/scan_job.py --cprofile /tmp/job.prof --kind corpus

What a worker does for each job line, in one process and without the pipe: the job's JSON read,
``Job.run`` (the message read from the spool, the spam check, the anti-virus scan through a
private clamd on a tmpfs, the header rewrite) and the result's JSON line, with the bench/stacks.py
configuration. Two kinds of message: ``bench``, the message bench/relay.py and bench/cpu.py send
(smtp-source ``-l 4096``: From, To, Date, Message-Id and 51 lines of a digit and 77 X, with the
gateway's Received field), ``--messages`` of them; ``corpus``, the first ``--corpus`` messages of
shared/corpus (SpamAssassin, modern-mixed), each queued as often as ``--messages`` asks. For each
round and tree in turn (trees alternating, so both see the same conditions) it prints the
worker's thread CPU and clamd's CPU (/proc/PID/stat) a job, after a warm-up; a figure is the best
of the rounds. bench/cpu.py measures the gateway's processes under load; this measures a job
without the noise of the loop, the pipe and the other processes.

Must never: talk to anything but the private clamd; wait without a deadline; leave a process running.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.clamd import RAM_DISK, start_clamd  # noqa: E402
from tests.support.components import which  # noqa: E402
from tests.support.net import CORPUS  # noqa: E402

JOB = r'''
import glob, json, os, sys, time
tree, clamd, clamd_pid, kind, count, corpus, profile_to = sys.argv[1:8]
count, corpus = int(count), int(corpus)
sys.path.insert(0, tree)
sys.path.append(os.path.join(tree, "bench"))
from stacks import smtpgw_settings
from tests.support.net import GatewayProcess
from smtpgw.config import load_config
from smtpgw.scan import job as jobs
from smtpgw.spool.queue import CHK, Envelope, Recipient, new_id

def cpu_of(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

folder = os.getcwd()
job = jobs.Job(load_config(GatewayProcess(folder, 2525, extra=smtpgw_settings(clamd, True)).config))
if kind == "bench":  # as the gateway keeps what smtp-source -l 4096 sends
    body = b"".join(b"%d" % (i % 10) + b"X" * 77 + b"\r\n" for i in range(1, 52)) + b"X" * 16 + b"\r\n\r\n"
    messages = [b"Received: from vm (localhost [127.0.0.1])\r\n\tby gw.example.test (smtpgw) with ESMTP id 4XkqZ0\r\n"
                b"\tfor <rcpt@example.test>; Mon, 7 Dec 2026 22:31:25 +0000\r\nFrom: <load@src.test>\r\n"
                b"To: <rcpt@example.test>\r\nDate: Mon,  7 Dec 2026 22:31:25 +0000 (UTC)\r\n"
                b"Message-Id: <79ed.0003.0000@vm>\r\n\r\n" + body]
else:
    files = sorted(path for name in ("spamassassin", "modern-mixed")
                   for path in glob.glob(os.path.join(os.environ["CORPUS"], name, "**", "*.eml"), recursive=True))
    messages = [open(path, "rb").read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for path in files[:corpus]]
lines = []
for n in range(count):
    env = Envelope(id=new_id(), sender="load@src.test", recipients=[Recipient("rcpt@example.test")], client_ip="127.0.0.1")
    job.queue.add_message(env, CHK, data=messages[n % len(messages)])
    lines.append(json.dumps({"qid": env.id, "env": env.as_dict(), "dkim": {}}, separators=(",", ":")).encode() + b"\n")

def one(line):  # what smtpgw.scan.job.main does with a job line
    request = json.loads(line)
    result = job.run(Envelope.from_dict(request["env"]), request.get("dkim"))
    return json.dumps({"qid": request["qid"], **result.as_dict()}, separators=(",", ":")).encode() + b"\n"

warm = min(len(messages), count // 4) if kind == "corpus" else min(100, count // 4)
for line in lines[:warm]:
    one(line)
measured = lines[warm:]
if profile_to:
    import cProfile
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
start, clamd_start = time.thread_time(), cpu_of(clamd_pid)
for line in measured:
    one(line)
worker, clamd_cpu = time.thread_time() - start, cpu_of(clamd_pid) - clamd_start
if profile_to:
    profiler.disable()
    profiler.dump_stats(profile_to)
print(json.dumps({"worker": worker / len(measured), "clamd": clamd_cpu / len(measured)}))
'''


def measure(tree: str, clamd, kind: str, args: argparse.Namespace, profile_to: str = "") -> dict[str, float]:
    count = args.messages if kind == "bench" else max(args.messages, args.corpus * 2)
    with tempfile.TemporaryDirectory(prefix="scan-job-") as folder:
        env = dict(os.environ, PYTHONPATH=tree, CORPUS=CORPUS)
        out = subprocess.run([sys.executable, "-c", JOB, tree, clamd.unix_address, str(clamd.process.pid), kind,
                              str(count), str(args.corpus), profile_to],
                             env=env, cwd=folder, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{tree}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--corpus", type=int, default=400, help="corpus messages (0: the bench message only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", help="a source tree (default: this one)")
    parser.add_argument("--kind", choices=("bench", "corpus"), default="bench", help="what --cprofile profiles")
    parser.add_argument("--cprofile", help="profile the first tree's job (thread CPU clock) into this file")
    args = parser.parse_args()
    if not which("clamd"):
        raise SystemExit("clamd is not installed (clamav-daemon)")
    trees = [os.path.abspath(t) for t in args.tree or [REPO]]
    kinds = ["bench"] + (["corpus"] if args.corpus else [])
    clamd = start_clamd(temporary_parent=RAM_DISK)
    try:
        if args.cprofile:
            figures = measure(trees[0], clamd, args.kind, args, os.path.abspath(args.cprofile))
            print(f"{args.kind}: worker {figures['worker'] * 1e6:.0f} us a job under cProfile")
            pstats.Stats(args.cprofile).sort_stats("tottime").print_stats(30)
            return 0
        best: dict[tuple[str, str], dict[str, float]] = {}
        for round_ in range(1, args.rounds + 1):
            for kind in kinds:
                for tree in trees:  # the trees alternate: both see the same conditions
                    figures = measure(tree, clamd, kind, args)
                    print(f"round {round_} {kind:6s} {tree}: worker {figures['worker'] * 1e6:.0f} us, "
                          f"clamd {figures['clamd'] * 1e6:.0f} us a job; load {os.getloadavg()[0]:.1f}", flush=True)
                    kept = best.setdefault((kind, tree), figures)
                    for name, value in figures.items():
                        kept[name] = min(kept[name], value)
        print(f"best of {args.rounds}:")
        for (kind, tree), figures in best.items():
            print(f"  {kind:6s} {tree}: worker {figures['worker'] * 1e6:.0f} us, clamd {figures['clamd'] * 1e6:.0f} us a job")
    finally:
        clamd.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
