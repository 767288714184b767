#!/usr/bin/env python3
"""Relay throughput: N messages over S sessions through smtpgw (and a private Postfix) to a sink.

Prints accepted msgs/s, end-to-end delivered msgs/s and peak RSS for smtpgw;
with Debian's postfix installed, the same load through a private Postfix relay
(own config and queue under a temp folder) in the same run, and the ratio;
then the RSS of 1,000 concurrent idle sessions.

    python3 bench/relay.py [--messages 2000] [--sessions 50] [--size 4096]
    python3 bench/relay.py --stacks [--runs 3] [--messages 2000]   # see bench/stacks.py

``--stacks``: smtpgw with Check=true and Check=false beside plain Postfix and Postfix + rspamd
(milter, clamd), in one run: e2e msgs/s, CPU busy and probe latency percentiles in one table.

Load: Postfix's smtp-source when installed, else a stdlib client (threads of
smtplib). Next hop: Postfix's smtp-sink when installed, else a stdlib sink.
Everything stays on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import os
import resource
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support.components import which  # noqa: E402
from tests.support.net import GatewayProcess, Sink, free_port, listening, wait_until  # noqa: E402

import stacks  # noqa: E402  (bench/stacks.py: the peer stacks side by side)


def start_sink() -> tuple[int, object]:
    """smtp-sink (fast, C) when installed, else the stdlib test sink."""
    port = free_port()
    sink_bin = which("smtp-sink")
    if sink_bin:
        proc = subprocess.Popen([sink_bin, "-u", "nobody", "-c", f"127.0.0.1:{port}", "1024"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: listening(port), 10, "smtp-sink")
        return port, proc
    sink = Sink()
    return sink.port, sink


def stop_sink(handle: object) -> None:
    if isinstance(handle, subprocess.Popen):
        handle.terminate()
        handle.wait(10)
    else:
        handle.close()  # type: ignore[attr-defined]


def load(port: int, messages: int, sessions: int, size: int, message_file: str | None = None,
         sender: str = "load@src.test", rcpt: str = "rcpt@example.test", unique: bool = False) -> float:
    """Send the load; returns the seconds it took until the last 250.

    ``message_file``: the message (header and body, LF or CRLF) to send each time instead of a
    generated one of ``size`` bytes; ``unique``: each message to its own recipient (a sequence
    number before ``rcpt``, as smtp-source -N)."""
    source = which("smtp-source")
    start = time.monotonic()
    if source:
        content = ["-F", message_file] if message_file else ["-l", str(size)]
        subprocess.run([source, "-s", str(sessions), "-m", str(messages), *content, *(["-N"] if unique else []),
                        "-f", sender,
                        "-t", rcpt, f"127.0.0.1:{port}"], check=True, timeout=900,
                       stdout=subprocess.DEVNULL)
        return time.monotonic() - start
    if message_file:
        with open(message_file, "rb") as f:  # smtplib sends bytes as they are: CRLF line ends here
            body = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    else:
        body = b"Subject: load\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78)
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    numbers = iter(range(1, messages + 1))

    def worker(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            for _ in range(n):
                client.sendmail(sender, [f"{next(numbers)}{rcpt}" if unique else rcpt], body)

    threads = [threading.Thread(target=worker, args=(n,)) for n in per if n]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    total = 0
    pids = [pid] + _children(pid)
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
        except (OSError, StopIteration):
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def count_lines(path: str, pattern: str) -> int:
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if pattern in line)
    except FileNotFoundError:
        return 0


def bench_smtpgw(folder: str, sink_port: int, args: argparse.Namespace) -> dict[str, float]:
    gw = GatewayProcess(folder, sink_port, extra={
        "smtpgw.limits": [("IncomingSessions", "1024"), ("MaximalIncomingSessionsPerIP", "1024"),
                          ("MaximalIncomingMessagesPerSession", "1024"), ("OutgoingSessions", "20"),
                          ("MaximalOutgoingSessionsPerHost", "10")],
        "smtpgw.options": [("LogLevel", "info")],
    })
    gw.start()
    try:
        t0 = time.monotonic()
        accepted_s = load(gw.port, args.messages, args.sessions, args.size)
        wait_until(lambda: count_lines(gw.log_path, "status=sent") >= args.messages, 900, "all delivered")
        delivered_s = time.monotonic() - t0
        return {"accepted": args.messages / accepted_s, "delivered": args.messages / delivered_s,
                "rss_mib": rss_kib(gw.proc.pid) / 1024, "rss_main_mib": rss_kib_main(gw.proc.pid) / 1024}
    finally:
        gw.stop()


def rss_kib_main(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def bench_postfix(folder: str, sink_port: int, args: argparse.Namespace) -> dict[str, float] | None:
    why = stacks.postfix_missing()
    if why:
        return None
    relay = stacks.PostfixRelay(folder, sink_port)
    try:
        relay.start()
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return None
    try:
        t0 = time.monotonic()
        accepted_s = load(relay.port, args.messages, args.sessions, args.size)
        wait_until(lambda: count_lines(relay.maillog, "status=sent") >= args.messages, 900, "postfix delivered all")
        delivered_s = time.monotonic() - t0
        return {"accepted": args.messages / accepted_s, "delivered": args.messages / delivered_s}
    finally:
        relay.stop()


def idle_sessions(folder: str, sink_port: int, count: int) -> float:
    """RSS (MiB) of the gateway holding ``count`` idle SMTP sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count * 2 + 100)), hard))
    gw = GatewayProcess(folder, sink_port, extra={
        "smtpgw.limits": [("IncomingSessions", "1024"), ("MaximalIncomingSessionsPerIP", "1024")],
        "smtpgw.options": [("LogLevel", "info")],
    })
    gw.start()
    socks = []
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            socks.append(s)
        for s in socks:
            if not s.recv(512).startswith(b"220"):
                raise RuntimeError("no greeting")
        return rss_kib_main(gw.proc.pid) / 1024
    finally:
        for s in socks:
            s.close()
        gw.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--stacks", action="store_true", help="the peer stacks side by side (bench/stacks.py)")
    stacks.add_arguments(parser)
    args = parser.parse_args()
    if args.stacks:
        with tempfile.TemporaryDirectory(prefix="smtpgw-stacks-") as tmp:
            os.chmod(tmp, 0o755)  # Postfix's and rspamd's daemons run as their own users
            return stacks.run_stacks(args, tmp)
    print(f"load: {args.messages} messages of {args.size} bytes over {args.sessions} sessions; "
          f"client {'smtp-source' if which('smtp-source') else 'smtplib'}, sink {'smtp-sink' if which('smtp-sink') else 'stdlib'}")
    with tempfile.TemporaryDirectory(prefix="smtpgw-bench-") as tmp:
        os.chmod(tmp, 0o755)  # Postfix's daemons run as the postfix user
        sink_port, sink = start_sink()
        try:
            ours = bench_smtpgw(os.path.join(tmp, "gw"), sink_port, args)
            print(f"smtpgw : accepted {ours['accepted']:7.1f} msgs/s, delivered end to end {ours['delivered']:7.1f} msgs/s, "
                  f"peak RSS {ours['rss_main_mib']:.1f} MiB (main), {ours['rss_mib']:.1f} MiB (with workers)")
            peer = bench_postfix(os.path.join(tmp, "postfix"), sink_port, args)
            if peer:
                print(f"postfix: accepted {peer['accepted']:7.1f} msgs/s, delivered end to end {peer['delivered']:7.1f} msgs/s")
                print(f"ratio smtpgw/postfix: accepted {ours['accepted'] / peer['accepted']:.2f}, "
                      f"end to end {ours['delivered'] / peer['delivered']:.2f}")
            else:
                print("postfix: not measured (needs Debian's postfix and root)")
            if args.idle:
                rss = idle_sessions(os.path.join(tmp, "idle"), sink_port, args.idle)
                print(f"smtpgw : {args.idle} concurrent idle sessions, RSS {rss:.1f} MiB")
        finally:
            stop_sink(sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
