#!/usr/bin/env python3
"""Soak: a long mixed load through smtpgw, watching for memory, descriptors, spool entries or speed that drift.

    python3 bench/soak.py [--messages 200000] [--minutes 0] [--sessions 20] [--rss-bound 5]

The gateway runs as in production terms: scanning on (a private clamd from
tests/support/clamd.py), the spam filter on, notifications on. The load, sent
in rounds by smtp-source (or the stdlib client, bench/relay.py's ``load``), is
a mix of clean mail, spam (GTUBE), EICAR attachments, mail to a next hop that
answers 451 to every other attempt for a recipient (deferred, then delivered
on the retry after MinimalBackoffTime) and mail to one that answers 550
(bounced: a DSN goes back to the sender). Clean mail goes to Postfix's
smtp-sink (or the stdlib sink); the deferring and refusing next hop is
tests/support's ``Sink``.

Every ``--interval`` seconds (10) a sample: RSS and open file descriptors of
the main process and of each scanner worker, entries in each spool directory,
messages/s in (RECEIVED) and out (status=sent), delivery latency percentiles
(RECEIVED to status=sent, as seen in the log, 0.2 s resolution). At the end:
a table with a bar per row for the main process's RSS, the trend of each
process's RSS and of the throughput (slope per 100k messages, from the
``--warmup`` mark, 20,000 messages, to the end), the ``.c_memory`` report before
and after, and the idle values of descriptors and spool entries.

Exit status 1 when a bound is crossed: a process's RSS grew by more than
``--rss-bound`` MiB (5) from the warm-up mark to the end; the out rate of the
last quarter of the run fell more than ``--rate-drift`` (25 %) below the
first quarter's; descriptors or spool entries are not back to their idle
values once the queue has drained.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from relay import _children, load, start_sink, stop_sink  # noqa: E402
from smtpgw.app.memory import proc_status  # noqa: E402
from smtpgw.spam.formalsigns import GTUBE  # noqa: E402
from tests.support.clamd import eicar, mime_message, start_clamd  # noqa: E402
from tests.support.components import which  # noqa: E402
from tests.support.net import GatewayProcess, Sink, wait_until  # noqa: E402

SPOOL = ("tmp", "msg", "WFC", "CHK", "WFS", "SPL", "QUE", "SND", "corrupt")
BUSY = ("WFC", "CHK", "WFS", "SPL", "QUE", "SND")
DEFER_DOMAIN, BOUNCE_DOMAIN = "defer.test", "bounce.test"
MIX = {"clean": 80, "spam": 8, "eicar": 4, "deferred": 4, "bounced": 4}  # per cent of each round
MIB = 1024.0


# region the mail


def _text_body(size: int) -> str:
    line = "The quarterly figures are attached below; please check the totals before Friday.\n"
    return line * max(1, size // len(line))


def messages(size: int) -> dict[str, bytes]:
    """The message of each kind (LF line ends: smtp-source adds the CR, smtplib too)."""
    head = ("From: Load Source <load@src.test>\nTo: rcpt@example.test\nDate: Mon, 1 Jan 2024 10:00:00 +0000\n"
            "Message-ID: <soak@src.test>\nSubject: {subject}\n\n")
    clean = head.format(subject="quarterly figures") + _text_body(size)
    spam = head.format(subject="quarterly figures") + GTUBE + "\n" + _text_body(size)
    infected = mime_message([("Content-Type: text/plain", _text_body(size // 2).encode()),
                             ("Content-Type: application/octet-stream\nContent-Disposition: attachment; "
                              "filename=\"eicar.com\"", eicar())], eol=b"\n")
    return {"clean": clean.encode(), "spam": spam.encode(), "eicar": infected,
            "deferred": clean.encode(), "bounced": clean.encode()}


RECIPIENTS = {"clean": "rcpt@example.test", "spam": "rcpt@example.test", "eicar": "rcpt@example.test",
              "deferred": f"user@{DEFER_DOMAIN}", "bounced": f"user@{BOUNCE_DOMAIN}"}


class SideHop:
    """The next hop for the deferred and bounced shares: 451 to every other attempt for a
    recipient of DEFER_DOMAIN (the retry is accepted), 550 to BOUNCE_DOMAIN. What it received is
    let go of at every sample (``trim``): the soak must not grow itself."""

    def __init__(self) -> None:
        self.sink = Sink()
        self.port = self.sink.port
        self.deferred: set[str] = set()
        self.sink.rcpt_reply = self._reply

    def _reply(self, addr: str) -> str | None:
        domain = addr.rpartition("@")[2].lower()
        if domain == BOUNCE_DOMAIN:
            return "550 5.1.1 no such user here"
        if domain == DEFER_DOMAIN:
            if addr in self.deferred:
                self.deferred.discard(addr)
                return None
            self.deferred.add(addr)
            return "451 4.3.0 try again later"
        return None

    def trim(self) -> None:
        with self.sink.cond:
            self.sink.messages.clear()
            self.sink.commands.clear()

    def close(self) -> None:
        self.sink.close()


# endregion
# region watching the log

RECEIVED = re.compile(r"\] (\S+): RECEIVED,")
SENT = re.compile(r"\] (\S+): DELIVERED, .*status=sent")


class LogWatch(threading.Thread):
    """Follows the gateway's log: counts RECEIVED and status=sent, and the time from one to the other."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.received = 0
        self.sent = 0
        self.lines = {"SCAN DEFERRED": 0, "status=deferred": 0, "status=failed": 0, "DSN,": 0, "NOTIFICATION,": 0}
        self.latencies: list[float] = []  # since the last take_latencies()
        self._seen: dict[str, float] = {}  # qid → when its RECEIVED line was read
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._offset, self._rest = 0, b""

    def run(self) -> None:
        while not self._halt.wait(0.2):
            self.poll()

    def poll(self) -> None:
        """Read what the log gained since the last call (complete lines only)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(8 << 20)
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        data = self._rest + chunk
        cut = data.rfind(b"\n") + 1
        self._rest = data[cut:]
        self._count(data[:cut].decode("utf-8", "replace").splitlines())

    def _count(self, lines: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for line in lines:
                m = RECEIVED.search(line)
                if m:
                    self.received += 1
                    self._seen[m.group(1)] = now
                    continue
                m = SENT.search(line)
                if m:
                    self.sent += 1
                    start = self._seen.pop(m.group(1), None)
                    if start is not None:
                        self.latencies.append(now - start)
                    continue
                for key in self.lines:
                    if key in line:
                        self.lines[key] += 1

    def take(self) -> tuple[int, int, list[float], dict[str, int]]:
        with self._lock:
            taken, self.latencies = self.latencies, []
            return self.received, self.sent, taken, dict(self.lines)

    def stop(self) -> None:
        self._halt.set()


# endregion
# region samples


@dataclass
class Sample:
    t: float
    received: int
    sent: int
    rate_in: float
    rate_out: float
    latency: tuple[float, float, float]  # p50, p90, p99 seconds
    rss: dict[str, float]  # process label → MiB
    fds: dict[str, int]
    spool: dict[str, int]
    counts: dict[str, int] = field(default_factory=dict)


def processes(pid: int) -> dict[str, int]:
    """The main process and its scanner workers, labelled main, w1, w2... by pid order."""
    kids = sorted(p for p in _children(pid) if _is_worker(p))
    return {"main": pid, **{f"w{i}": p for i, p in enumerate(kids, start=1)}}


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"smtpgw.scan.job" in f.read()
    except OSError:
        return False


def drained(gw: GatewayProcess) -> bool:
    counts = spool_counts(gw.queue)
    return not any(counts[name] for name in BUSY)


def fds_in_use(pid: int, spares: str) -> int:
    """Open descriptors but the empty spare files the queue keeps open in tmp/ (a bounded stock)."""
    folder = f"/proc/{pid}/fd"
    count = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return -1
    for name in names:
        try:
            target = os.readlink(os.path.join(folder, name))
        except OSError:
            continue
        count += not target.startswith(spares + os.sep)
    return count


def spool_counts(queue: str) -> dict[str, int]:
    counts = {}
    for name in SPOOL:
        try:
            counts[name] = sum(1 for n in os.listdir(os.path.join(queue, name)) if not n.startswith("."))
        except FileNotFoundError:
            counts[name] = 0
    return counts


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (0.0, 0.0, 0.0)
    if len(values) == 1:
        return (values[0],) * 3  # type: ignore[return-value]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


def take_sample(gw: GatewayProcess, watch: LogWatch, start: float, last: Sample | None) -> Sample:
    received, sent, latencies, counts = watch.take()
    now = time.monotonic() - start
    span = max(1e-6, now - (last.t if last else 0.0))
    procs = processes(gw.proc.pid)  # type: ignore[union-attr]
    return Sample(
        t=now, received=received, sent=sent,
        rate_in=(received - (last.received if last else 0)) / span,
        rate_out=(sent - (last.sent if last else 0)) / span,
        latency=percentiles(latencies),
        rss={name: proc_status(pid).get("VmRSS", 0) / MIB for name, pid in procs.items()},
        fds={name: fds_in_use(pid, os.path.join(gw.queue, "tmp")) for name, pid in procs.items()},
        spool=spool_counts(gw.queue), counts=counts,
    )


def row(s: Sample) -> str:
    rss = " ".join(f"{k}={v:5.1f}" for k, v in s.rss.items())
    busy = sum(s.spool[name] for name in BUSY)
    return (f"{s.t:7.0f}s in={s.received:7d} out={s.sent:7d} {s.rate_in:6.1f}/s {s.rate_out:6.1f}/s "
            f"lat p50/p90/p99={s.latency[0]:4.1f}/{s.latency[1]:4.1f}/{s.latency[2]:5.1f}s "
            f"RSS MiB {rss} fds main={s.fds.get('main', -1)} queued={busy} msg={s.spool['msg']} tmp={s.spool['tmp']}")


# endregion
# region the verdict


def slope_per_100k(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value over messages received, per 100,000 messages."""
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return statistics.linear_regression(xs, ys).slope * 100_000


def plot(samples: list[Sample], rows: int = 30, width: int = 40) -> list[str]:
    """The run in at most ``rows`` lines, each with a bar for the main process's RSS."""
    if not samples:
        return []
    step = max(1, len(samples) // rows)
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    low = min(s.rss["main"] for s in samples)
    high = max(s.rss["main"] for s in samples)
    scale = (high - low) or 1.0
    out = [f"main RSS bar: {low:.1f} MiB (empty) .. {high:.1f} MiB (full)"]
    for s in picked:
        bar = "#" * (1 + int((s.rss["main"] - low) / scale * (width - 1)))
        out.append(f"{row(s)} |{bar:<{width}}|")
    return out


def verdict(samples: list[Sample], warmup: int, rss_bound: float, rate_drift: float) -> tuple[list[str], bool]:
    """The trend lines and whether every bound held."""
    lines: list[str] = []
    ok = True
    after = [s for s in samples if s.received >= warmup] or samples[-1:]
    first, last = after[0], samples[-1]
    lines.append(f"trend from {first.received} messages (t={first.t:.0f}s) to {last.received} (t={last.t:.0f}s):")
    for name in sorted(set(first.rss) & set(last.rss)):
        points = [(s.received, s.rss[name]) for s in after if name in s.rss]
        growth = last.rss[name] - first.rss[name]
        held = growth <= rss_bound
        ok &= held
        lines.append(f"  RSS {name:5}: {first.rss[name]:6.1f} -> {last.rss[name]:6.1f} MiB, growth {growth:+5.1f} MiB "
                     f"(bound {rss_bound} MiB), slope {slope_per_100k(points):+6.2f} MiB/100k msgs"
                     f"{'' if held else '  <-- OVER THE BOUND'}")
    loaded = [s for s in after if s.rate_out > 0]
    if len(loaded) >= 8:
        quarter = len(loaded) // 4
        early = statistics.fmean(s.rate_out for s in loaded[:quarter])
        late = statistics.fmean(s.rate_out for s in loaded[-quarter:])
        held = late >= early * (1 - rate_drift)
        ok &= held
        lines.append(f"  out rate: first quarter {early:.1f}/s, last quarter {late:.1f}/s (bound: at most "
                     f"{rate_drift:.0%} lower), slope {slope_per_100k([(s.received, s.rate_out) for s in loaded]):+.2f}"
                     f" msgs/s per 100k{'' if held else '  <-- OVER THE BOUND'}")
        p90_early = statistics.fmean(s.latency[1] for s in loaded[:quarter])
        p90_late = statistics.fmean(s.latency[1] for s in loaded[-quarter:])
        lines.append(f"  latency p90: first quarter {p90_early:.2f}s, last quarter {p90_late:.2f}s")
    return lines, ok


# endregion
# region running it


def start_gateway(folder: str, sink_port: int, side_port: int, clamd_address: str) -> GatewayProcess:
    forward = [("ForwardRoute", f"*@{DEFER_DOMAIN} [127.0.0.1:{side_port}]"),
               ("ForwardRoute", f"*@{BOUNCE_DOMAIN} [127.0.0.1:{side_port}]"),
               ("ForwardRoute", f"* [127.0.0.1:{sink_port}]")]
    gw = GatewayProcess(folder, None, replace={"smtpgw.forward": forward}, extra={
        "smtpgw.limits": [("IncomingSessions", "1024"), ("MaximalIncomingSessionsPerIP", "1024"),
                          ("MaximalIncomingMessagesPerSession", "1024"), ("OutgoingSessions", "20"),
                          ("MaximalOutgoingSessionsPerHost", "10")],
        "smtpgw.options": [("LogLevel", "info")],
        "smtpgw.timeouts": [("MinimalBackoffTime", "64"), ("MaximalBackoffTime", "128")],
        "smtpgw.resolve": [("UnreachableTTL", "10")],
        "smtpgw.ave": [("ClamdAddress", clamd_address)],
        "smtpgw.antispam": [("Check", "true")],
        "smtpgw.policy": [("Check", "true")],
    })
    return gw.start(60)


def send_round(port: int, files: dict[str, str], total: int, sessions: int, number: int,
               kinds: tuple[str, ...] = tuple(MIX)) -> None:
    """Round ``number`` of the mix, each kind by its own client at once. The deferred share
    goes to recipients unique to the round and the message (``unique``), so that the next
    hop defers each exactly once."""
    weights = sum(MIX[kind] for kind in kinds)
    threads = []
    for kind in kinds:
        count = round(total * MIX[kind] / weights)
        if not count:
            continue
        parallel = max(1, round(sessions * MIX[kind] / weights))
        rcpt = f"r{number}-{RECIPIENTS[kind]}" if kind == "deferred" else RECIPIENTS[kind]
        threads.append(threading.Thread(target=load, args=(port, count, parallel, 0, files[kind]),
                                        kwargs={"rcpt": rcpt, "unique": kind == "deferred"}))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000, help="stop sending after this many (default 200000)")
    parser.add_argument("--minutes", type=float, default=0.0, help="stop sending after this long (0: no limit)")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    parser.add_argument("--size", type=int, default=4096, help="bytes of text per message")
    parser.add_argument("--round", type=int, default=1000, help="messages per round of the mix")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=int, default=20_000, help="messages before the trend is measured")
    parser.add_argument("--rss-bound", type=float, default=5.0, help="MiB a process may grow after the warm-up")
    parser.add_argument("--rate-drift", type=float, default=0.25, help="share the out rate may fall")
    parser.add_argument("--drain", type=float, default=600.0, help="seconds allowed for the queue to drain")
    parser.add_argument("--folder", help="keep the gateway's folder here (default: a temp folder, removed)")
    args = parser.parse_args()

    print(f"soak: {args.messages} messages{f' or {args.minutes} min' if args.minutes else ''}, mix "
          + ", ".join(f"{k} {v}%" for k, v in MIX.items())
          + f"; {args.sessions} sessions; client {'smtp-source' if which('smtp-source') else 'smtplib'}, "
          f"sink {'smtp-sink' if which('smtp-sink') else 'stdlib'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="smtpgw-soak-") as tmp:
        folder = args.folder or os.path.join(tmp, "gw")
        files = {}
        for kind, data in messages(args.size).items():
            files[kind] = os.path.join(tmp, f"{kind}.eml")
            with open(files[kind], "wb") as f:
                f.write(data)
        clamd = start_clamd()
        sink_port, sink = start_sink()
        side = SideHop()
        gw = start_gateway(folder, sink_port, side.port, clamd.unix_address)
        try:
            return soak(gw, side, files, args)
        finally:
            gw.stop(60)
            side.close()
            stop_sink(sink)
            clamd.stop()


def soak(gw: GatewayProcess, side: SideHop, files: dict[str, str], args: argparse.Namespace) -> int:
    watch = LogWatch(gw.log_path)
    watch.start()
    start = time.monotonic()
    # idle values are those of a gateway that has worked: workers started, spare files made
    send_round(gw.port, files, 200, args.sessions, 0, kinds=("clean", "spam", "eicar", "bounced"))
    wait_until(lambda: drained(gw), args.drain, "the warm-up round to drain")
    before = gw.memory_report()
    idle = take_sample(gw, watch, start, None)
    print("idle:", row(idle), flush=True)
    sent = 0
    stop_at = start + args.minutes * 60 if args.minutes else float("inf")

    def sender() -> None:
        nonlocal sent
        number = 0
        while sent < args.messages and time.monotonic() < stop_at:
            count = min(args.round, args.messages - sent)
            number += 1
            send_round(gw.port, files, count, args.sessions, number)
            sent += count

    loader = threading.Thread(target=sender, daemon=True)
    loader.start()
    samples: list[Sample] = []
    last = idle
    next_at = time.monotonic() + args.interval
    while loader.is_alive():
        loader.join(max(0.0, next_at - time.monotonic()))
        if time.monotonic() >= next_at:
            last = take_sample(gw, watch, start, last)
            samples.append(last)
            side.trim()
            print(row(last), flush=True)
            next_at += args.interval
    load_end = last.t
    print(f"load done: {watch.received} received in {load_end:.0f}s; waiting for the queue to drain", flush=True)
    try:
        wait_until(lambda: drained(gw), args.drain, "the queue to drain")
    except AssertionError as exc:
        print(f"queue not drained: {exc}", flush=True)
    after = gw.memory_report()  # its log line written means every earlier one is in the file too
    gw.wait_log(r"memory: rss=", 60, count=2)
    watch.stop()
    watch.join()
    watch.poll()
    final = take_sample(gw, watch, start, last)

    print("\n".join(plot(samples)))
    lines, ok = verdict(samples, args.warmup, args.rss_bound, args.rate_drift)
    print("\n".join(lines))
    print("after the drain:", row(final))
    print("RSS of every gateway process after the load: "
          + ", ".join(f"{k} {v:.1f} MiB" for k, v in final.rss.items()))
    print(f"log counts: {final.counts}")
    for name in sorted(set(idle.fds) & set(final.fds)):
        held = final.fds[name] <= idle.fds[name]
        ok &= held
        print(f"fds {name}: idle {idle.fds[name]}, after {final.fds[name]}{'' if held else '  <-- NOT BACK'}")
    for name in BUSY + ("msg",):
        held = final.spool[name] <= idle.spool[name]
        ok &= held
        if not held:
            print(f"spool {name}: idle {idle.spool[name]}, after {final.spool[name]}  <-- NOT BACK")
    print(f"spool after the drain: {final.spool}")
    for name, report in (("before", before), ("after", after)):
        print(f".c_memory main process {name} the load: rss={report['rss_kib']} KiB, objects={report['gc_objects']}, "
              f"C heap in use={report.get('heap_in_use', 0) // 1024} KiB, free={report.get('heap_free', 0) // 1024} KiB")
    print(f"registries after: {after['registries']}")
    print("PASS" if ok else "FAIL: a bound was crossed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
