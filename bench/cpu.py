#!/usr/bin/env python3
"""CPU seconds per message of each of the gateway's processes, for one tree or two side by side.

    python3 bench/cpu.py [--check on|off] [--messages 2000] [--rounds 3] [--tree DIR ...]
    python3 bench/cpu.py --check off --tree /tmp/old --tree .      # A/B, alternating rounds
    python3 bench/cpu.py --check off --cprofile /tmp/main.prof      # the main thread under cProfile
    python3 bench/cpu.py --set limits.MaximalOutgoingSessionsPerHost=20   # a setting changed

Throughput on a shared machine moves with everyone else's load; the CPU a message costs moves far
less, so this is what compares two versions of the code: for each round and each tree (in turn, so
both see the same conditions), a gateway started from that tree (the bench/stacks.py configuration:
Check=true with the private clamd, or Check=false) gets a warm-up of 200 messages, then
``--messages`` from smtp-source (50 sessions of 4 KiB) to smtp-sink; the user and system CPU
seconds of its main process, its scanner workers and clamd are read from /proc/PID/stat before and
after, and printed per message with the e2e rate, the load average and the main process's context
switches (all its threads, and its loop thread alone) (``--strace``: with the main
process's system calls per message, all threads, which slows it). The scanner workers are started
by the warm-up, so their start-up is not in the figures: a worker started (or gone) during the
measured load, one replaced, is said with what it adds (``bench/scan_job.py --pipe`` prints what a
start costs); their context switches a message (voluntary + involuntary) are printed too.
``--cprofile FILE`` runs the
main process under cProfile timed by its main thread's CPU clock (the event loop alone: the I/O
threads are not in it) and prints the top of it.

Must never: talk to anything but 127.0.0.1; wait without a deadline; leave a process running.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import stacks  # noqa: E402  (bench/stacks.py)
from profile import pids_of, run_load, sink_and_clamd  # noqa: E402  (bench/profile.py)
from tests.support.components import which  # noqa: E402
from tests.support.net import GatewayProcess  # noqa: E402

# the main process's ``main()`` under a profiler timed by the main thread's CPU clock
PROFILED = ("import cProfile, os, runpy, sys, time\n"
            "out, sys.argv = sys.argv[1], sys.argv[2:]\n"
            "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
            "p = cProfile.Profile(time.thread_time)\n"
            "p.enable()\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "finally:\n"
            "    p.disable()\n"
            "    p.dump_stats(out)\n")


class TreeGateway(GatewayProcess):
    """The bench configuration's gateway, run from the ``smtpgw.py`` of a given tree."""

    def __init__(self, tree: str, profile_to: str | None, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tree = tree
        self.profile_to = profile_to

    def start(self, timeout: float = 60.0) -> "TreeGateway":
        self.killed = False
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        command = [os.path.join(self.tree, "smtpgw.py"), "-c", self.config, "-n"]
        if self.profile_to:
            command = ["-c", PROFILED, self.profile_to] + command
        self.proc = subprocess.Popen([sys.executable] + command, cwd=self.folder,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.wait_log(r"smtpgw started", timeout, since_start=True)
        return self


def add_settings(extra: dict[str, list[tuple[str, str]]], settings: list[str] | None) -> None:
    """``--set SECTION.Key=value`` (e.g. limits.MaximalOutgoingSessionsPerHost=20) added to a configuration."""
    for setting in settings or []:
        name, _, value = setting.partition("=")
        section, _, key = name.rpartition(".")
        extra.setdefault(f"smtpgw.{section}", []).append((key, value))


def proc_times(pid: int, path: str = "") -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads)."""
    try:
        with open(path or f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def switches(pid: int) -> tuple[int, int]:
    """Context switches (voluntary and not) of every thread of a process, and of its main thread."""
    total = main = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                count = sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:
            continue
        total += count
        main += count if tid == str(pid) else 0
    return total, main


def thread_times(pid: int, tid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one thread."""
    return proc_times(pid, f"/proc/{pid}/task/{tid}/stat")


def kind_of(pid: int, main: int) -> str:
    if pid == main:
        return "main"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except OSError:
        return "other"
    if b"app.delivery" in command:
        return "delivery"
    return "workers" if b"scan.job" in command or b"scan.workers" in command else "incoming"


def process_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process (of its main thread: a worker has one)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0, 0
    return int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"])


def snapshot(main: int, clamd_pid: int | None) -> dict[str, tuple[float, float]]:
    totals: dict[str, list[float]] = {}
    pids = [(pid, kind_of(pid, main)) for pid in pids_of(main)]
    if clamd_pid:
        pids.append((clamd_pid, "clamd"))
    workers = totals.setdefault("switches of workers", [0, 0])
    for pid, kind in pids:
        user, system = proc_times(pid)
        total = totals.setdefault(kind, [0.0, 0.0])
        total[0] += user
        total[1] += system
        if kind == "workers":
            totals[f"worker {pid}"] = [user, system]
            voluntary, involuntary = process_switches(pid)
            workers[0] += voluntary
            workers[1] += involuntary
    totals["loop"] = list(thread_times(main, main))  # the main process's event loop thread alone
    totals["switches"] = list(switches(main))
    return {kind: (u, s) for kind, (u, s) in totals.items()}


def strace_counts(pid: int, out: str) -> subprocess.Popen:
    """``strace -c -f`` on a running process (every thread), writing its summary to ``out``."""
    return subprocess.Popen([which("strace") or "strace", "-c", "-f", "-o", out, "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_strace(out: str, messages: int) -> None:
    """The system calls per message of the summary, most frequent first."""
    rows = []
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                rows.append((int(parts[3]), float(parts[1]), parts[-1]))
    for calls, seconds, name in sorted(rows, reverse=True)[:25]:
        print(f"  {name:<16} {calls / messages:7.2f} per message  ({1e6 * seconds / messages:7.1f} us traced)")


def measure(tree: str, check: bool, tmp: str, sink_port: int, clamd, args, profile_to: str | None = None) -> str:
    folder = tempfile.mkdtemp(prefix="gw-", dir=tmp)
    policy = {"smtpgw.policy": [("Check", "true" if check else "false"), ("NotifyAdmin", "none"),
                                ("NotifyRecipient", "none")],
              "smtpgw.limits": [("IncomingSessions", "1024"), ("MaximalIncomingSessionsPerIP", "1024"),
                                ("MaximalIncomingMessagesPerSession", "1024"),
                                ("IncomingProcesses", str(args.incoming_processes))],
              "smtpgw.options": [("LogLevel", "info")],
              "smtpgw.antispam": [("Check", "true" if check else "false")]}
    if check:
        policy["smtpgw.ave"] = [("ClamdAddress", clamd.unix_address)]
    add_settings(policy, args.set)
    gw = TreeGateway(tree, profile_to, folder, sink_port, extra=policy)
    gw.start()
    try:
        run_load(gw, argparse.Namespace(**{**vars(args), "messages": 200}))  # workers up, caches warm
        clamd_pid = clamd.process.pid if check else None
        load = stacks.loadavg()
        tracer = strace_counts(gw.proc.pid, os.path.join(folder, "strace.txt")) if args.strace else None
        if tracer is not None:
            time.sleep(1.0)  # strace attaches to every thread (it prints nothing to wait for)
        before = snapshot(gw.proc.pid, clamd_pid)
        seconds = run_load(gw, args)
        after = snapshot(gw.proc.pid, clamd_pid)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
            print_strace(os.path.join(folder, "strace.txt"), args.messages)
    finally:
        gw.stop(60)
    n = args.messages
    parts = []
    for kind in ("main", "loop", "incoming", "delivery", "workers", "clamd"):
        if kind in after:
            user = after[kind][0] - before.get(kind, (0, 0))[0]
            system = after[kind][1] - before.get(kind, (0, 0))[1]
            part = f"{kind} {1000 * (user + system) / n:.3f} ms (user {1000 * user / n:.3f}, sys {1000 * system / n:.3f})"
            if kind == "workers":
                voluntary, involuntary = (a - b for a, b in zip(after["switches of workers"], before["switches of workers"]))
                part += f", context switches {voluntary / n:.2f} + {involuntary / n:.2f}"
                started = [k for k in after if k.startswith("worker ") and k not in before]
                gone = [k for k in before if k.startswith("worker ") and k not in after]
                if started or gone:  # a worker replaced during the load: not the jobs' CPU alone
                    part += (f" ({len(started)} started during the load: all their CPU counted, start-up too,"
                             f" {1000 * sum(sum(after[k]) for k in started) / n:.3f} ms a message;"
                             f" {len(gone)} gone: what they used before the load taken off the rest)")
            parts.append(part)
    parts.append(f"main's context switches {(after['switches'][0] - before['switches'][0]) / n:.1f}"
                 f" (loop {(after['switches'][1] - before['switches'][1]) / n:.1f})")
    return f"{n / seconds:6.0f} msgs/s, load {load:>5}: " + "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", choices=("on", "off"), default="off")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--incoming-processes", type=int, default=0)
    parser.add_argument("--set", action="append", help="a setting of the gateway's configuration, SECTION.Key=value")
    parser.add_argument("--tree", action="append", help="a source tree to run the gateway from (default: this one)")
    parser.add_argument("--strace", action="store_true", help="also count the main process's system calls (strace -c -f)")
    parser.add_argument("--cprofile", help="profile the main process (one run of the first tree) into this file")
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in (args.tree or [REPO])]
    for tool in ("smtp-source", "smtp-sink") + (("clamd",) if args.check == "on" else ()):
        if not which(tool):
            print(f"needs {tool}")
            return 1
    check = args.check == "on"
    with tempfile.TemporaryDirectory(prefix="smtpgw-cpu-") as tmp, sink_and_clamd(check) as (port, clamd):
        print(f"Check={'true' if check else 'false'}: {args.messages} x {args.size} B, {args.sessions} sessions, "
              f"{os.cpu_count()} cores; CPU per message")
        if args.cprofile:
            print(measure(trees[0], check, tmp, port, clamd, args, os.path.abspath(args.cprofile)))
            stats = pstats.Stats(args.cprofile)
            stats.sort_stats("tottime").print_stats(45)
            stats.sort_stats("cumulative").print_stats(70)
            return 0
        for round_ in range(args.rounds):
            for tree in trees:
                print(f"round {round_ + 1} {tree}: {measure(tree, check, tmp, port, clamd, args)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
