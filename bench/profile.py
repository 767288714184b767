#!/usr/bin/env python3
"""Where a message's time goes in the running gateway, Check on and off (the figures of bench/PROFILE.md).

    python3 bench/profile.py [--messages 2000] [--sessions 50] [--size 4096] [--check on|off|both]

For each setting, a gateway (the bench/stacks.py configuration) relaying to smtp-sink with the private
clamd gets the smtp-source load three times:
1. plain: e2e msgs/s, the CPU seconds per message of the gateway's processes (main and scanner workers,
   from /proc/PID/stat) and of clamd, the whole machine's busy %;
2. under py-spy (``pip install py-spy``; sampling, all processes of the gateway): the share of samples
   per stage — receive, commit, state moves, hand-off to workers, spam, MIME, clamd, rewrite, send,
   unlink, logging, the loop — in the main process and in the workers;
3. under ``strace -f -c`` (main process and workers): fsync, rename and unlink calls per message.
A missing py-spy or strace leaves its part out with a line saying so.

Must never: talk to anything but 127.0.0.1; wait without a deadline; leave a process running.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import stacks  # noqa: E402  (bench/stacks.py)
from tests.support.components import which  # noqa: E402
from tests.support.net import listening, wait_until, free_port  # noqa: E402

# stage ← the first rule (in this order) that names a frame of the sample's stack; py-spy names a
# frame "Class.function (path/file.py:line)"
F = r"^(?:\w+\.)*"  # the qualified name's class part
MAIN_STAGES = [
    ("logging", re.compile(r"smtpgw/log\.py|logging/")),
    ("commit", re.compile(F + r"(_commit|_refill|_create_tmp|take_tmp|submit) .*queue\.py")),
    ("unlink", re.compile(F + r"(_remove|discard_tmp) .*queue\.py")),
    ("state moves", re.compile(F + r"(move|replace_and_move|write_record|add_message|update|sync_folder|load|find) .*queue\.py")),
    ("hand-off", re.compile(r"workers\.py")),
    ("send", re.compile(r"smtpgw/deliver/")),
    ("receive", re.compile(r"smtpgw/receive/|smtpgw/net/smtp\.py")),
    ("scan result", re.compile(r"scanner\.py")),
    ("stats", re.compile(r"stats\.py")),
    ("loop (select)", re.compile(F + r"select .*selectors\.py")),
]
WORKER_STAGES = [
    ("logging", re.compile(r"smtpgw/log\.py|logging/")),
    ("hand-off", re.compile(F + r"(loads|dumps|asdict|_asdict_inner|from_dict|as_dict|readline) |^<genexpr> .*dataclasses")),
    ("clamd", re.compile(r"clamd\.py|ichecker\.py")),
    ("spam", re.compile(r"smtpgw/spam/")),
    ("MIME", re.compile(r"mail/mime\.py|mail/archives\.py|mail/transfer\.py")),
    ("rewrite", re.compile(r"mail/headers\.py|" + F + r"(write_durably|_finish|_x_header) ")),
]
SYSCALLS = ("fsync", "fdatasync", "rename", "renameat", "renameat2", "unlink", "unlinkat")


def pids_of(root: int) -> list[int]:
    """The process and its children (the scanner workers)."""
    try:
        with open(f"/proc/{root}/task/{root}/children") as f:
            return [root] + [int(x) for x in f.read().split()]
    except OSError:
        return [root]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def stage_of(frames: list[str], rules: list[tuple[str, re.Pattern[str]]]) -> str:
    for name, pattern in rules:
        if any(pattern.search(frame) for frame in frames):
            return name
    return "other"


def summarise_pyspy(path: str) -> tuple[dict[str, collections.Counter], dict[str, collections.Counter]]:
    """py-spy raw (collapsed) stacks → samples per stage, per kind of process; and the leaf
    functions of the samples no stage claims."""
    kinds = ("main: event loop", "main: I/O threads", "workers")
    out: dict[str, collections.Counter] = {kind: collections.Counter() for kind in kinds}
    unclaimed: dict[str, collections.Counter] = {kind: collections.Counter() for kind in kinds}
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            procs = [fr for fr in frames if fr.startswith("process ")]
            frames = [fr for fr in frames if not fr.startswith(("process ", "thread "))]
            kind = "workers" if procs and "smtpgw.scan.job" in procs[-1] else "main: event loop"
            if kind != "workers" and any(fr.startswith("_worker (") and "futures" in fr for fr in frames):
                kind = "main: I/O threads"
            rules = WORKER_STAGES if kind == "workers" else MAIN_STAGES
            stage = stage_of(frames, rules)
            if kind == "workers" and frames and frames[-1].startswith("main ("):
                stage = "idle (reading the next job)"
            out[kind][stage] += int(count)
            if stage == "other" and frames:
                unclaimed[kind][" < ".join(f.split(" (")[0] for f in frames[-1:-4:-1])] += int(count)
    return out, unclaimed


def run_load(gw, args) -> float:
    """smtp-source load; returns seconds until the gateway logged every message as sent."""
    before = sent_lines(gw)
    t0 = time.monotonic()
    stacks.smtp_source(gw.port, args.messages, args.sessions, args.size)
    wait_until(lambda: sent_lines(gw) - before >= args.messages, 600, "all delivered")
    return time.monotonic() - t0


def sent_lines(gw) -> int:
    with open(gw.log_path, "rb") as f:
        return f.read().count(b"status=sent")


def profile_one(check: bool, tmp: str, sink_port: int, clamd, args) -> None:
    name = "Check=true" if check else "Check=false"
    gw = stacks.smtpgw_stack(os.path.join(tmp, "gw-on" if check else "gw-off"), sink_port, clamd.unix_address, check)
    gw.start()
    try:
        run_load(gw, argparse.Namespace(**{**vars(args), "messages": min(200, args.messages)}))  # workers up, warm
        main = gw.proc.pid
        procs = pids_of(main)
        clamd_pid = clamd.process.pid
        cpu0, clamd0, busy0 = cpu_seconds(procs), cpu_seconds([clamd_pid]), stacks.cpu_times()
        load = stacks.loadavg()
        seconds = run_load(gw, args)
        cpu1, clamd1, busy1 = cpu_seconds(procs), cpu_seconds([clamd_pid]), stacks.cpu_times()
        n = args.messages
        cores = os.cpu_count() or 1
        print(f"\n## {name}: {n} x {args.size} B, {args.sessions} sessions (load avg {load}, {cores} cores)")
        print(f"- e2e {n / seconds:.0f} msgs/s; machine busy {100 * cores * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]):.0f}%")
        print(f"- CPU per message: gateway {1000 * (cpu1 - cpu0) / n:.2f} ms (main + {len(procs) - 1} workers), "
              f"clamd {1000 * (clamd1 - clamd0) / n:.2f} ms")
        if which("py-spy"):
            profile_pyspy(gw, args, args.raw or tmp, name)
        else:
            print("- py-spy: not installed (pip install py-spy): no stage breakdown")
        if which("strace"):
            profile_strace(gw, args, tmp)
        else:
            print("- strace: not installed: no syscall counts")
    finally:
        gw.stop()


def profile_pyspy(gw, args, tmp: str, name: str) -> None:
    out = os.path.join(tmp, f"pyspy-{name.replace('=', '-')}.txt")
    spy = subprocess.Popen([which("py-spy"), "record", "--pid", str(gw.proc.pid), "--subprocesses", "--nonblocking",
                            "-r", "200", "-f", "raw", "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches (no event to wait for: it prints nothing until it ends)
    run_load(gw, args)
    spy.send_signal(signal.SIGINT)
    spy.wait(60)
    if not os.path.exists(out):
        print("- py-spy: no output")
        return
    print_stages(out)


def print_stages(out: str) -> None:
    stages, unclaimed = summarise_pyspy(out)
    for kind, counter in stages.items():
        total = sum(counter.values()) or 1
        rows = ", ".join(f"{stage} {100 * count / total:.0f}%" for stage, count in counter.most_common())
        print(f"- py-spy {kind} ({total} samples at 200/s, threads blocked in a system call included): {rows}")
        top = ", ".join(f"{name} {100 * count / total:.0f}%" for name, count in unclaimed[kind].most_common(6))
        if top:
            print(f"  - of \"other\" (leaf < caller < caller): {top}")


def profile_strace(gw, args, tmp: str) -> None:
    out = os.path.join(tmp, "strace.txt")
    pids = pids_of(gw.proc.pid)
    command = [which("strace"), "-f", "-c", "-o", out, "-e", "trace=" + ",".join(SYSCALLS)]
    for pid in pids:
        command += ["-p", str(pid)]
    tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # strace attaches to every thread
    run_load(gw, args)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(60)
    counts: dict[str, int] = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in SYSCALLS:  # % time, seconds, usecs/call, calls, [errors,] name
                counts[parts[-1]] = int(parts[3])
    n = args.messages
    fsyncs = counts.get("fsync", 0) + counts.get("fdatasync", 0)
    renames = sum(counts.get(k, 0) for k in ("rename", "renameat", "renameat2"))
    unlinks = counts.get("unlink", 0) + counts.get("unlinkat", 0)
    print(f"- per message (strace -f, main + workers): fsync {fsyncs / n:.2f}, rename {renames / n:.2f}, unlink {unlinks / n:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--check", choices=("on", "off", "both"), default="both")
    parser.add_argument("--raw", help="keep py-spy's raw stacks in this folder (summarise again with --summarise FILE)")
    parser.add_argument("--summarise", help="only print the stage breakdown of a kept raw file")
    args = parser.parse_args()
    if args.summarise:
        print_stages(args.summarise)
        return 0
    for tool in ("smtp-source", "smtp-sink", "clamd"):
        if not which(tool):
            print(f"needs {tool}")
            return 1
    with tempfile.TemporaryDirectory(prefix="smtpgw-profile-") as tmp, sink_and_clamd(True) as (port, clamd):
        for check in {"on": [True], "off": [False], "both": [True, False]}[args.check]:
            profile_one(check, tmp, port, clamd, args)
    return 0


@contextlib.contextmanager
def sink_and_clamd(with_clamd: bool) -> Iterator[tuple[int, Any]]:
    """An smtp-sink on a free loopback port and, if asked, the private clamd; both stopped after."""
    from tests.support.clamd import RAM_DISK, start_clamd

    port = free_port()
    sink = subprocess.Popen([which("smtp-sink") or "smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clamd = start_clamd(temporary_parent=RAM_DISK) if with_clamd else None  # as bench/stacks.py
    try:
        wait_until(lambda: listening(port), 10, "smtp-sink")
        yield port, clamd
    finally:
        if clamd is not None:
            clamd.remove()
        sink.terminate()
        sink.wait(10)


if __name__ == "__main__":
    sys.exit(main())
