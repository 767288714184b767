#!/usr/bin/env python3
"""The scanner worker pool alone: jobs per second when the loop is busy between results.

    python3 bench/pool.py [--messages 2000] [--inflight 10] [--loop-ms 1.5] [--rounds 3]

Real workers (``python3 -m smtpgw.scan.job``, Check=true: the spam filter and the private clamd
on a tmpfs) scan ``--messages`` generated 4 KiB messages queued in CHK, ``--inflight`` at a time
as the scanner keeps AntiviralSessions; for each result the loop then burns ``--loop-ms`` of CPU,
what the gateway's loop spends a message besides (receiving, handing off, applying the result,
sending: about 1.4 ms with Check=true, bench/PROFILE.md After 6). Each round runs the pool with
a worker taking one job at a time (``PREFETCH`` 1) and with the next job waiting in its stdin
(``PREFETCH`` 2), in turn, and prints msgs/s and the share of the time each worker spent
computing and runnable without a CPU (/proc/PID/schedstat over the run's time); the rest it was
blocked, waiting for a job or for clamd. With PREFETCH 1 the next job still goes out before
the loop handles the result (the pool before PREFETCH handled the result first). The machine
being shared, the two are compared run by run, with the load.

Must never: talk to anything but 127.0.0.1; wait without a deadline; leave a process running.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from timeline import schedstat  # noqa: E402  (bench/timeline.py)
from smtpgw.config import load_config, save_snapshot  # noqa: E402
from smtpgw.net.loop import EventLoop  # noqa: E402
from smtpgw.scan import workers  # noqa: E402
from smtpgw.spool.queue import CHK, Envelope, Queue, Recipient, new_id  # noqa: E402
from tests.support.clamd import RAM_DISK, start_clamd  # noqa: E402
from tests.support.net import GatewayProcess  # noqa: E402

BODY = b"".join(b"Line %d of a message to scan, nothing to see here, only words.\r\n" % n for n in range(60))


def queued(queue: Queue, n: int) -> list[Envelope]:
    envs = []
    for i in range(n):
        env = Envelope(id=new_id(), sender="load@src.test", recipients=[Recipient("rcpt@example.test")])
        queue.add_message(env, CHK, data=b"From: load@src.test\r\nTo: rcpt@example.test\r\nSubject: load %d\r\n"
                          b"Message-ID: <%d@src.test>\r\n\r\n" % (i, i) + BODY)
        envs.append(env)
    return envs


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def run(config_path: str, envs: list[Envelope], prefetch: int, args: argparse.Namespace) -> str:
    workers.PREFETCH = prefetch
    loop = EventLoop()
    done: list[str] = []
    pending = [(env.id, {"env": env.as_dict()}) for env in envs]
    pool: workers.WorkerPool

    def result(qid: str, data: dict[str, Any]) -> None:
        if "error" in data:
            raise SystemExit(f"{qid}: {data['error']}")
        done.append(qid)
        burn(args.loop_ms / 1000)
        if pending:
            pool.submit(*pending.pop())

    pool = workers.WorkerPool(loop, config_path, 2, result, job_timeout=300)
    warm = args.inflight  # the workers started and warm before the clock starts
    for _ in range(warm):
        pool.submit(*pending.pop())
    assert loop.run_until(lambda: len(done) >= warm, 120), "warm-up"
    pids = [w.proc.pid for w in pool.workers]
    before = [schedstat(pid) for pid in pids]
    t0 = time.monotonic()
    for _ in range(args.inflight - sum(len(w.jobs) for w in pool.workers) - len(pool.backlog)):
        pool.submit(*pending.pop())
    try:
        assert loop.run_until(lambda: len(done) == len(envs), 600), "all scanned"
    finally:
        elapsed = time.monotonic() - t0
        after = [schedstat(pid) for pid in pids]
        pool.stop()
        loop.close()
    # what is neither computing nor runnable is blocked: waiting for a job, or for clamd
    busy = ", ".join(f"{100 * (a[0] - b[0]) / elapsed:3.0f}% + runnable {100 * (a[1] - b[1]) / elapsed:3.0f}% "
                     f"(blocked {100 - 100 * (a[0] - b[0] + a[1] - b[1]) / elapsed:3.0f}%)"
                     for a, b in zip(after, before))
    return f"PREFETCH {prefetch}: {(len(envs) - warm) / elapsed:5.0f} msgs/s, workers computing {busy}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=10)
    parser.add_argument("--loop-ms", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    clamd = start_clamd(temporary_parent=RAM_DISK)
    try:
        with tempfile.TemporaryDirectory(prefix="smtpgw-pool-") as tmp:
            gw = GatewayProcess(os.path.join(tmp, "gw"), None, extra={
                "smtpgw.ave": [("ClamdAddress", clamd.unix_address)], "smtpgw.policy": [("Check", "true")],
                "smtpgw.antispam": [("Check", "true")], "smtpgw.options": [("LogLevel", "info")]})
            cfg = load_config(gw.config)
            queue = Queue(cfg.path.QueuePath)
            config_path = workers.worker_config_path(queue.root)
            save_snapshot(config_path, cfg)
            print(f"{args.messages} messages, {args.inflight} in flight, the loop {args.loop_ms} ms a result, "
                  f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
            for round_ in range(args.rounds):
                for prefetch in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                    envs = queued(queue, args.messages)
                    print(f"round {round_ + 1} {run(config_path, envs, prefetch, args)}, "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
                    for env in envs:
                        queue.remove(env.id, CHK)
    finally:
        clamd.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
