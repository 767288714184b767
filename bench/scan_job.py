#!/usr/bin/env python3
"""CPU of a scanner worker's whole job (Check=true: spam check, MIME, clamd), for one tree or two.

    python3 bench/scan_job.py [--messages 1500] [--corpus 400] [--rounds 3] [--tree DIR ...]
    python3 bench/scan_job.py --cprofile /tmp/job.prof            # the bench message under cProfile
    python3 bench/scan_job.py --cprofile /tmp/job.prof --kind corpus
    python3 bench/scan_job.py --pipe --corpus 0 --tree /tmp/old --tree .   # a worker process on its pipe

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
without the noise of the loop, the pipe and the other processes. ``--pipe``: the jobs go instead
to a real worker process (``python3 -S -s -m smtpgw.scan.job CONFIG``, as the gateway starts it)
through its stdin, each worker holding ``PREFETCH`` of them as the gateway's pool keeps it; the
figure is then that process's CPU a job (/proc/PID/stat: its loop, the pipe, the result's line and
the log's flush too, its start-up left out), with its context switches (voluntary, involuntary).

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
import sys
sys.modules.setdefault("_hashlib", None)  # as in a worker (smtpgw.scan.job): the interpreter's own SHA code
import glob, json, os, time
tree, clamd, clamd_pid, kind, count, corpus, profile_to, pipe = sys.argv[1:9]
count, corpus, pipe = int(count), int(corpus), pipe == "pipe"
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

def switches_of(pid):  # (voluntary, involuntary) context switches
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"])

folder = os.getcwd()
config = GatewayProcess(folder, 2525, extra=smtpgw_settings(clamd, True)).config
job = jobs.Job(load_config(config))
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
measured = lines[warm:]
if pipe:  # a worker process as the gateway starts and feeds it (scan.workers: PREFETCH jobs ahead)
    import subprocess
    from smtpgw import child_command, child_environment
    from smtpgw.scan.workers import PREFETCH
    worker = subprocess.Popen(child_command("smtpgw.scan.job", config), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=child_environment(), cwd="/")
    assert worker.stdout.readline() == b'{"ready":true}\n'
    startup = cpu_of(worker.pid)  # its imports, configuration, databases, clamd's version

    def feed(batch):
        sent = min(PREFETCH, len(batch))
        worker.stdin.write(b"".join(batch[:sent]))
        worker.stdin.flush()
        for _ in batch:
            if "qid" not in json.loads(worker.stdout.readline()):
                raise SystemExit("the worker sent a line that is no result")
            if sent < len(batch):
                worker.stdin.write(batch[sent])
                worker.stdin.flush()
                sent += 1

    feed(lines[:warm])
    start, clamd_start, switches = cpu_of(worker.pid), cpu_of(clamd_pid), switches_of(worker.pid)
    feed(measured)
    cpu, clamd_cpu = cpu_of(worker.pid) - start, cpu_of(clamd_pid) - clamd_start
    voluntary, involuntary = (b - a for a, b in zip(switches, switches_of(worker.pid)))
    worker.stdin.close()
    worker.wait(60)
    print(json.dumps({"worker": cpu / len(measured), "clamd": clamd_cpu / len(measured), "startup": startup,
                      "voluntary": voluntary / len(measured), "involuntary": involuntary / len(measured)}))
    sys.exit(0)
for line in lines[:warm]:
    one(line)
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
                              str(count), str(args.corpus), profile_to, "pipe" if args.pipe else "thread"],
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
    parser.add_argument("--pipe", action="store_true", help="run the jobs in a worker process fed through its pipe")
    args = parser.parse_args()
    if args.pipe and args.cprofile:
        parser.error("--cprofile profiles the job in this process: not with --pipe")
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
                    switches = (f", context switches {figures['voluntary']:.2f} + {figures['involuntary']:.2f} a job"
                                f" (start-up {figures['startup'] * 1e3:.0f} ms, not counted)" if "voluntary" in figures else "")
                    print(f"round {round_} {kind:6s} {tree}: worker {figures['worker'] * 1e6:.0f} us, "
                          f"clamd {figures['clamd'] * 1e6:.0f} us a job{switches}; load {os.getloadavg()[0]:.1f}", flush=True)
                    kept = best.setdefault((kind, tree), figures)
                    for name, value in figures.items():
                        kept[name] = min(kept[name], value)
        print(f"best of {args.rounds}{' (worker processes on their pipe)' if args.pipe else ''}:")
        for (kind, tree), figures in best.items():
            print(f"  {kind:6s} {tree}: worker {figures['worker'] * 1e6:.0f} us, clamd {figures['clamd'] * 1e6:.0f} us a job")
    finally:
        clamd.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
