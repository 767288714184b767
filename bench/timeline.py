#!/usr/bin/env python3
"""Where mail waits: a timeline of one loaded run, sampled every 0.1 s, for one tree or two side by side.

    python3 bench/timeline.py [--check on|off] [--messages 2000] [--rounds 2] [--tree DIR ...]
    python3 bench/timeline.py --tree /work/wt/idle-base --tree .    # A/B, alternating rounds
    python3 bench/timeline.py --series /tmp/t.tsv                   # every sample, tab-separated

The gateway of bench/stacks.py (Check=true with the private clamd on a tmpfs, 20 delivery
sessions to the one smtp-sink) gets a warm-up of 200 messages, then ``--messages`` from
smtp-source (50 sessions of 4 KiB). Every 0.1 s a sampler thread reads, from /proc and the spool
only (nothing inside the gateway is changed for it):

- CPU: the whole machine; the main process's loop thread and its other (I/O) threads; each
  scanner worker and the loop thread with the time they were runnable but had no CPU
  (/proc/.../schedstat); clamd; the rest (smtp-source, smtp-sink, and others on a shared machine);
- what each scanner worker is doing at that instant (/proc/PID/syscall): computing (running),
  waiting for its next job (a read of its stdin), waiting for clamd (any other blocking call);
  the same for the loop thread (in its selector's wait = idle, the interpreter lock) and the I/O
  threads (in fsync / fdatasync; in a lock wait: for work, a folder fsync another thread runs for
  them, or the interpreter lock);
- the messages in each queue state (WFC: being committed, before the 250, or received and
  waiting for a scan slot; CHK at the scanner: key lookups, the pool's backlog, the workers'
  jobs, results being written; QUE scanned, not yet delivering; SND delivering, or delivered
  and not yet unlinked by an I/O thread), with the mean time a message spends in each (Little's
  law), and the inbound and outbound SMTP sessions (/proc/net/tcp);
- RECEIVED and delivered (status=sent) lines of the gateway's log.

The run is cut in phases: ramp (the first second), steady (until smtp-source ends), drain (until
the last message is delivered); each phase's averages are printed: so a long low-CPU tail shows
beside the steady state instead of inside one e2e figure.

Must never: talk to anything but 127.0.0.1; wait without a deadline; leave a process running.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import stacks  # noqa: E402  (bench/stacks.py)
from cpu import TreeGateway, add_settings, proc_times, thread_times  # noqa: E402  (bench/cpu.py)
from profile import pids_of, sink_and_clamd  # noqa: E402  (bench/profile.py)
from tests.support.components import which  # noqa: E402
from tests.support.net import wait_until  # noqa: E402

INTERVAL = 0.1
QUEUE_STATES = ("WFC", "CHK", "QUE", "SND")
# x86-64 system call numbers of the blocking calls the processes wait in
READ, FSYNC, FDATASYNC, FUTEX = 0, 74, 75, 202
SELECTOR_WAITS = {7, 23, 232, 270, 271, 281, 441}  # poll, select, epoll_wait, pselect6, ppoll, epoll_pwait(2)


def what_doing(pid: int, tid: int | None = None) -> tuple[str, int, int]:
    """("running", -1, -1) or ("blocked", syscall number, first argument) of a thread, now."""
    path = f"/proc/{pid}/task/{tid}/syscall" if tid else f"/proc/{pid}/syscall"
    try:
        with open(path) as f:
            fields = f.read().split()
    except OSError:
        return "gone", -1, -1
    if not fields or fields[0] == "running":
        return "running", -1, -1
    try:
        return "blocked", int(fields[0]), int(fields[1], 16) if len(fields) > 1 else -1
    except ValueError:
        return "running", -1, -1


def sessions(local_port: int, remote_port: int) -> tuple[int, int]:
    """Established TCP connections to the gateway's port and from anything to the sink's port."""
    inbound = outbound = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] != "01":
                    continue
                local, remote = int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16)
                inbound += local == local_port
                outbound += remote == remote_port
    except OSError:
        pass
    return inbound, outbound


def cpu_of(pids: list[int]) -> float:
    return sum(sum(proc_times(pid)) for pid in pids)


def schedstat(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread (/proc/.../schedstat)."""
    try:
        with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as f:
            on_cpu, waiting = f.read().split()[:2]
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(on_cpu) / 1e9, int(waiting) / 1e9


@dataclass
class Sample:
    t: float
    values: dict[str, float] = field(default_factory=dict)


class Sampler(threading.Thread):
    """Samples every ``INTERVAL`` s until stopped; each sample holds rates over the last interval
    (CPU shares, 1.0 = one core) and counts at its instant."""

    def __init__(self, gw: TreeGateway, sink_port: int, clamd_pid: int | None) -> None:
        super().__init__(daemon=True)
        self.gw, self.sink_port, self.clamd_pid = gw, sink_port, clamd_pid
        self.main = gw.proc.pid
        self.samples: list[Sample] = []
        self.halt = threading.Event()
        self.log_offset = os.path.getsize(gw.log_path)
        self.received = self.delivered = 0

    def _log_counts(self) -> None:
        with open(self.gw.log_path, "rb") as f:
            f.seek(self.log_offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # whole lines only: the rest is read next time
        self.log_offset += end
        self.received += chunk.count(b" RECEIVED,", 0, end)
        self.delivered += chunk.count(b"status=sent", 0, end)

    def _cpu(self, workers: list[int]) -> dict[str, float]:
        totals: dict[str, float] = {}
        totals["loop"], totals["loop_rq"] = schedstat(self.main)
        totals["io"] = cpu_of([self.main]) - sum(thread_times(self.main, self.main))
        totals["workers"] = 0.0
        for n, pid in enumerate(workers):
            totals[f"w{n}"], totals[f"w{n}_rq"] = schedstat(pid)
            totals["workers"] += totals[f"w{n}"]
        if self.clamd_pid:
            totals["clamd"] = cpu_of([self.clamd_pid])
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        totals["machine"] = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
        return totals

    def _states(self, workers: list[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, pid in enumerate(workers):
            state, call, arg = what_doing(pid)
            # a worker blocked reading fd 0 waits for its next job; any other wait is clamd's answer
            out[f"w{n}_run"] = state == "running"
            out[f"w{n}_nojob"] = state == "blocked" and call == READ and arg == 0
            out[f"w{n}_clamd"] = state == "blocked" and not (call == READ and arg == 0)
        state, call, _ = what_doing(self.main, self.main)
        out["loop_wait"] = state == "blocked" and call in SELECTOR_WAITS
        out["loop_gil"] = state == "blocked" and call == FUTEX  # the interpreter lock, held by an I/O thread
        out["loop_call"] = state == "blocked" and call not in SELECTOR_WAITS and call != FUTEX
        io_sync = io_wait = 0
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{self.main}/task") if int(t) != self.main]
        except OSError:
            tids = []
        for tid in tids:
            state, call, _ = what_doing(self.main, tid)
            io_sync += state == "blocked" and call in (FSYNC, FDATASYNC)
            io_wait += state == "blocked" and call == FUTEX
        out["io_fsync"], out["io_wait"] = io_sync, io_wait
        for name in QUEUE_STATES:
            try:
                out[name] = len(os.listdir(os.path.join(self.gw.queue, name)))
            except OSError:
                out[name] = 0
        out["in"], out["out"] = sessions(self.gw.port, self.sink_port)
        return out

    def run(self) -> None:
        workers = self._workers()
        last, last_t = self._cpu(workers), time.monotonic()
        while not self.halt.wait(INTERVAL):
            now_workers = self._workers()
            if now_workers != workers:  # a worker started or was replaced: its shares start from here
                workers = now_workers
                last = self._cpu(workers)
                last_t = time.monotonic()
                continue
            cpu, t = self._cpu(workers), time.monotonic()
            span = max(1e-6, t - last_t)
            values = {f"cpu_{k}": (v - last.get(k, v)) / span for k, v in cpu.items()}
            last, last_t = cpu, t
            values.update(self._states(workers))
            self._log_counts()
            values["received"], values["delivered"] = self.received, self.delivered
            values["nworkers"] = len(workers)
            self.samples.append(Sample(t, values))

    def _workers(self) -> list[int]:
        found = []
        for pid in pids_of(self.main)[1:]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"scan.job" in f.read():
                        found.append(pid)
            except OSError:
                pass
        return sorted(found)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


COLUMNS = ("cpu_machine", "cpu_loop", "cpu_loop_rq", "cpu_io", "cpu_workers", "cpu_w0", "cpu_w0_rq", "cpu_w1",
           "cpu_w1_rq", "cpu_clamd", "w0_run", "w0_nojob", "w0_clamd", "w1_run", "w1_nojob", "w1_clamd", "loop_wait", "loop_gil", "loop_call", "io_fsync", "io_wait",
           "WFC", "CHK", "QUE", "SND", "in", "out")


def phase_line(name: str, samples: list[Sample], t0: float) -> str:
    if len(samples) < 2:
        return f"  {name:<6} (no samples)"
    span = samples[-1].t - samples[0].t
    n = len(samples)

    def mean(key: str) -> float:
        return sum(s.values.get(key, 0.0) for s in samples) / n

    received = samples[-1].values["received"] - samples[0].values["received"]
    delivered = samples[-1].values["delivered"] - samples[0].values["delivered"]
    workers = int(max(s.values["nworkers"] for s in samples))
    rate = received / max(span, 1e-6)

    def ms(key: str) -> float:
        return 1000 * mean(key) / rate if rate else 0.0

    busy = " ".join(f"w{i} cpu {100 * mean(f'cpu_w{i}'):3.0f}% + runnable {100 * mean(f'cpu_w{i}_rq'):3.0f}%; "
                    f"samples: run {100 * mean(f'w{i}_run'):3.0f}% / no job "
                    f"{100 * mean(f'w{i}_nojob'):3.0f}% / clamd {100 * mean(f'w{i}_clamd'):3.0f}%;"
                    for i in range(workers))
    return (f"  {name:<6} {samples[0].t - t0:5.1f}-{samples[-1].t - t0:5.1f} s: in {received / max(span, 1e-6):4.0f}/s, "
            f"out {delivered / max(span, 1e-6):4.0f}/s; CPU machine {100 * mean('cpu_machine'):3.0f}%, "
            f"loop {100 * mean('cpu_loop'):3.0f}% + runnable {100 * mean('cpu_loop_rq'):3.0f}% (samples: selector "
            f"{100 * mean('loop_wait'):3.0f}%, GIL {100 * mean('loop_gil'):3.0f}%, other call {100 * mean('loop_call'):3.0f}%), "
            f"io {100 * mean('cpu_io'):3.0f}% (threads in fsync {mean('io_fsync'):.2f}, in a lock wait {mean('io_wait'):.2f}), "
            f"clamd {100 * mean('cpu_clamd'):3.0f}%, rest {100 * (mean('cpu_machine') - mean('cpu_loop') - mean('cpu_io') - mean('cpu_workers') - mean('cpu_clamd')):3.0f}%\n"
            f"         {busy}\n"
            f"         queue WFC {mean('WFC'):5.1f} CHK {mean('CHK'):5.1f} QUE {mean('QUE'):5.1f} SND {mean('SND'):5.1f}; "
            f"sessions in {mean('in'):4.1f} out {mean('out'):4.1f}\n"
            # Little's law: the mean time a message spends in a place is its mean count there over the rate
            f"         a message's time (Little): in WFC {ms('WFC'):4.0f} ms, CHK {ms('CHK'):4.0f} ms, "
            f"QUE {ms('QUE'):4.0f} ms, SND {ms('SND'):4.0f} ms; "
            f"a session's cycle {1000 * mean('in') / rate if rate else 0:4.0f} ms")


def measure(tree: str, check: bool, tmp: str, sink_port: int, clamd, args) -> list[str]:
    folder = tempfile.mkdtemp(prefix="gw-", dir=tmp)
    extra = stacks.smtpgw_settings(clamd.unix_address if check else None, check, args.incoming_processes)
    add_settings(extra, args.set)
    gw = TreeGateway(tree, None, folder, sink_port, extra=extra)
    gw.start()
    try:
        stacks.smtp_source(gw.port, 200, args.sessions, args.size)  # workers up, caches warm
        wait_until(lambda: all(not os.listdir(os.path.join(gw.queue, s)) for s in QUEUE_STATES), 120, "warm-up done")
        load = stacks.loadavg()
        sampler = Sampler(gw, sink_port, clamd.process.pid if check else None)
        busy0, total0 = stacks.cpu_times()
        t0 = time.monotonic()
        sampler.start()
        stacks.smtp_source(gw.port, args.messages, args.sessions, args.size)
        t_source = time.monotonic()
        wait_until(lambda: sampler.delivered >= args.messages, args.timeout, "all delivered")
        t_end = time.monotonic()
        busy1, total1 = stacks.cpu_times()
        sampler.stop()
    finally:
        gw.stop(60)
    samples = sampler.samples
    cores = os.cpu_count() or 1
    lines = [f"{args.messages / (t_end - t0):5.0f} msgs/s e2e ({args.messages / (t_source - t0):.0f}/s accepted), "
             f"CPU busy {100.0 * cores * (busy1 - busy0) / max(1, total1 - total0):3.0f}%, load {load}; "
             f"drain {t_end - t_source:.1f} s of {t_end - t0:.1f} s"]
    for name, lo, hi in (("ramp", t0, t0 + 1.0), ("steady", t0 + 1.0, t_source), ("drain", t_source, t_end + INTERVAL)):
        lines.append(phase_line(name, [s for s in samples if lo <= s.t < hi], t0))
    if args.series:
        with open(args.series, "a") as f:
            f.write(f"# {tree}\nt\t" + "\t".join(COLUMNS) + "\treceived\tdelivered\n")
            for s in samples:
                f.write(f"{s.t - t0:.2f}\t" + "\t".join(f"{s.values.get(c, 0):.2f}" for c in COLUMNS)
                        + f"\t{s.values['received']:.0f}\t{s.values['delivered']:.0f}\n")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", choices=("on", "off"), default="on")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--incoming-processes", type=int, default=0)
    parser.add_argument("--set", action="append", help="a setting of the gateway's configuration, SECTION.Key=value")
    parser.add_argument("--tree", action="append", help="a source tree to run the gateway from (default: this one)")
    parser.add_argument("--series", help="append every sample to this file (tab-separated)")
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in (args.tree or [REPO])]
    check = args.check == "on"
    for tool in ("smtp-source", "smtp-sink") + (("clamd",) if check else ()):
        if not which(tool):
            print(f"needs {tool}")
            return 1
    with tempfile.TemporaryDirectory(prefix="smtpgw-timeline-") as tmp, sink_and_clamd(check) as (port, clamd):
        print(f"Check={'true' if check else 'false'}: {args.messages} x {args.size} B, {args.sessions} sessions, "
              f"{os.cpu_count()} cores; sampled every {INTERVAL} s (CPU 100% = one core)")
        for round_ in range(args.rounds):
            for tree in trees if round_ % 2 == 0 else reversed(trees):
                lines = measure(tree, check, tmp, port, clamd, args)
                print(f"round {round_ + 1} {tree}: " + "\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
