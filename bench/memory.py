#!/usr/bin/env python3
"""Memory of the gateway's processes: at rest with its scanner workers started, then holding idle sessions.

Starts smtpgw with the spam check and the anti-virus check on (a private clamd with the
test signatures; every scanner worker opens a copy of the shipped spam database, whose
index the gateway builds when it starts), sends a few messages over several sessions at once so that the workers start
and classify real mail, waits until each is delivered to a local sink, and prints the RSS
and PSS (/proc/PID/smaps_rollup: a page shared by N processes counts 1/N) of the main
process and of each worker, and their totals; then opens ``--idle`` SMTP sessions that
stay idle after the greeting and prints the same again, with the cost per session.

    python3 bench/memory.py [--idle 1000] [--messages 40] [--senders 4] [--detail] [--trace]

``--detail`` adds each process's largest mappings; ``--trace`` runs the gateway under
tracemalloc (slower, more memory: its figures are not the plain ones) and prints the bytes
the main process allocated per idle session and the lines that allocated them.

Must never: talk to anything but 127.0.0.1, wait without a deadline, or assert (it prints).
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import smtplib
import socket
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.spam.database import database_file  # noqa: E402
from smtpgw.spam.spamfilter import default_bases  # noqa: E402
from tests.support.clamd import start_clamd  # noqa: E402
from tests.support.net import GatewayProcess, Sink, wait_until  # noqa: E402

CORPUS = "/work/shared/corpus/spamassassin"


def smaps(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as src:
        for line in src:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                fields[name] = int(rest.split()[0])
    return fields.get("Rss", 0), fields.get("Pss", 0)


def descendants(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a worker may be started from any of them), and theirs."""
    kids = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as src:
                kids += [int(x) for x in src.read().split()]
        except OSError:
            continue
    return kids + [g for k in kids for g in descendants(k)]


def mappings(pid: int, top: int = 6) -> list[tuple[str, int]]:
    """The ``top`` mappings of ``pid`` by RSS (KiB), by file name ([heap] and anonymous ones summed)."""
    sizes: dict[str, int] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as src:
        for line in src:
            first = line.split()
            if "-" in first[0] and len(first) >= 5:  # a mapping's header line
                name = os.path.basename(first[5]) if len(first) > 5 else "[anon]"
            elif first[0] == "Rss:":
                sizes[name] = sizes.get(name, 0) + int(first[1])
    return sorted(sizes.items(), key=lambda item: -item[1])[:top]


def role_of(pid: int) -> str:
    """``incoming`` for an incoming process (IncomingProcesses), ``delivery`` for the delivery
    process (DeliveryProcess), else ``worker``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as src:
            command = src.read()
        return "incoming" if b"smtpgw.app.incoming" in command else "delivery" if b"smtpgw.app.delivery" in command else "worker"
    except OSError:
        return "worker"


def snapshot(main: int) -> list[tuple[str, int, int, int]]:
    """(role, pid, RSS KiB, PSS KiB) of the main process and each of its descendants."""
    rows = []
    for role, pid in [("main", main)] + [(role_of(p), p) for p in descendants(main)]:
        try:
            rss, pss = smaps(pid)
        except OSError:
            continue  # exited meanwhile
        rows.append((role, pid, rss, pss))
    return rows


def show(title: str, rows: list[tuple[str, int, int, int]], detail: bool = False) -> int:
    print(title)
    for role, pid, rss, pss in rows:
        print(f"  {role:6} {pid:7}  RSS {rss / 1024:6.1f} MiB  PSS {pss / 1024:6.1f} MiB")
        if detail:
            print("         " + ", ".join(f"{name} {kib / 1024:.1f}" for name, kib in mappings(pid)))
    rss = sum(r[2] for r in rows)
    pss = sum(r[3] for r in rows)
    print(f"  total ({len(rows)} processes)  RSS {rss / 1024:6.1f} MiB  PSS {pss / 1024:6.1f} MiB")
    return rss


def messages(count: int) -> list[bytes]:
    """``count`` messages of the public corpus (ham and spam in turn), or plain ones without it."""
    files = sorted(glob.glob(os.path.join(CORPUS, "ham", "*")))[:count] + sorted(glob.glob(os.path.join(CORPUS, "spam", "*")))[:count]
    files.sort(key=os.path.basename)
    if not files:
        return [f"Subject: memory {i}\r\n\r\nbody {i}\r\n".encode() for i in range(count)]
    out = []
    for path in files[:count]:
        with open(path, "rb") as src:
            out.append(src.read())
    return out


def send(port: int, batch: list[bytes]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for raw in batch:
            client.sendmail("load@src.test", ["rcpt@example.test"], raw)


def warm_up(gw: GatewayProcess, count: int, senders: int) -> None:
    """Send ``count`` messages over ``senders`` sessions at once; wait until every one is delivered."""
    batch = messages(count)
    threads = [threading.Thread(target=send, args=(gw.port, batch[i::senders])) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    gw.wait_log(r"status=sent", 300, count=len(batch))


def show_traced(before: dict, after: dict, sessions: int) -> None:
    """What the main process allocated for the sessions (the ``.c_memory`` report's tracemalloc part)."""
    print(f"traced per idle session: {(after['traced_bytes'] - before['traced_bytes']) / sessions:.0f} bytes; "
          "largest sources:")
    for line in after["grown_since_last"][:10]:
        print("  " + line.replace(REPO + os.sep, ""))


def idle_sessions(port: int, count: int) -> list[socket.socket]:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    for sock in socks:
        if not sock.recv(512).startswith(b"220"):
            raise RuntimeError("no greeting")
    return socks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--incoming-processes", type=int, default=0, help="IncomingProcesses (default 0: half the cores, at least one)")
    parser.add_argument("--delivery-process", choices=("yes", "no"), default="yes", help="DeliveryProcess (default yes)")
    parser.add_argument("--detail", action="store_true", help="the largest mappings of each process (MiB)")
    parser.add_argument("--trace", action="store_true",
                        help="trace the main process's allocations (PYTHONTRACEMALLOC): bytes per idle session and where")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.idle * 2 + 200)), hard))
    print(f"{os.cpu_count()} cores; spam check on; {args.messages} messages over {args.senders} sessions, "
          f"then {args.idle} idle sessions")
    if args.trace:
        os.environ["PYTHONTRACEMALLOC"] = "1"  # inherited by the gateway (and its workers)
    with tempfile.TemporaryDirectory(prefix="smtpgw-memory-") as tmp:
        sink = Sink()
        clamd = start_clamd()
        bases = os.path.join(tmp, "bases")  # a copy: the gateway builds the index at start, as after an install
        os.makedirs(bases)
        shutil.copy(database_file(default_bases()), bases)
        gw = GatewayProcess(tmp, sink.port, extra={
            "path": [("BasesPath", bases)],
            "smtpgw.limits": [("IncomingSessions", str(min(args.idle + 24, 1024))),  # the schema's bound
                              ("MaximalIncomingSessionsPerIP", str(min(args.idle + 24, 1024))),
                              ("IncomingProcesses", str(args.incoming_processes)),
                              ("DeliveryProcess", args.delivery_process)],
            "smtpgw.options": [("LogLevel", "info")],
            "smtpgw.antispam": [("Check", "true")],
            "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
            "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none")],
        })
        gw.start(60)
        try:
            warm_up(gw, args.messages, args.senders)
            wait_until(lambda: len(descendants(gw.proc.pid)) > 0, 30, "scanner workers")
            at_rest = show("at rest, after the messages:", snapshot(gw.proc.pid), args.detail)
            traced = gw.memory_report()["tracemalloc"] if args.trace else None
            socks = idle_sessions(gw.port, args.idle)
            try:
                busy = show(f"with {args.idle} idle sessions:", snapshot(gw.proc.pid), args.detail)
                if traced is not None and args.idle:
                    show_traced(traced, gw.memory_report()["tracemalloc"], args.idle)
            finally:
                for sock in socks:
                    sock.close()
            if args.idle:
                print(f"per idle session: {(busy - at_rest) / args.idle:.1f} KiB (RSS growth / sessions)")
        finally:
            gw.stop()
            sink.close()
            clamd.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
