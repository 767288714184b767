#!/usr/bin/env python3
"""The spool's commit hand-off alone: the loop, the I/O threads and the disk, without SMTP.

    python3 bench/commit.py [--sessions 50] [--commits 3000] [--rounds 3] [--tree DIR ...]
    python3 bench/commit.py --tree /tmp/old --tree .      # A/B, alternating rounds

What a receiving session does at the end of DATA, ``--sessions`` at a time in a closed loop: a
spare tmp/ file taken, 4 KiB written into it, ``Committer.submit`` (fsync, msg/ID, the WFC record,
the folder fsyncs) and, on the loop once the callback came, WFC → QUE and ``Committer.remove``
(as the delivery of a message ends), then the next commit. Printed for each round and tree (each
run in a process of its own, from the tree's own ``smtpgw`` package, the trees in turn): commits
a second, the process's CPU and context switches a commit (all threads), and the latency from
``submit`` to the callback (p50, p90). The CPU a commit costs moves far less with the machine's
load than the rate and the latency, which follow the disk's fsync time.

Must never: write outside its own temporary folder; wait without a deadline.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = 300.0  # seconds a run may take


def run(tree: str, sessions: int, commits: int) -> str:
    """(in the process of one run, ``tree``'s package imported) The figures of one run."""
    sys.path.insert(0, tree)
    from smtpgw.net.loop import EventLoop
    from smtpgw.spool.queue import QUE, WFC, Committer, Envelope, Queue, Recipient, new_id

    with tempfile.TemporaryDirectory(prefix="smtpgw-commit-") as root:
        loop = EventLoop()
        queue = Queue(root)
        committer = Committer(queue, loop.call_soon_threadsafe)
        body = b"x" * 4096
        sent, latencies = [0], []

        def commit() -> None:
            if sent[0] >= commits:
                return
            sent[0] += 1
            tmp = committer.take_tmp()
            os.write(tmp.fd, body)
            env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")])
            started = time.monotonic()

            def done(error: BaseException | None) -> None:
                if error is not None:
                    raise SystemExit(f"commit failed: {error}")
                latencies.append(time.monotonic() - started)
                queue.move(env.id, WFC, QUE)
                committer.remove(env.id, QUE)
                commit()
            committer.submit(env, tmp, done)

        before, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for _ in range(sessions):
            commit()
        finished = loop.run_until(lambda: len(latencies) >= commits, DEADLINE)
        seconds, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_SELF)
        committer.close()
        loop.close()
    if not finished:
        raise SystemExit(f"{len(latencies)} of {commits} commits in {DEADLINE:.0f}s")
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / commits
    switches = (after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw) / commits
    latencies.sort()
    return (f"{commits / seconds:6.0f} commits/s: CPU {1000 * cpu:.3f} ms, context switches {switches:.1f}"
            f" a commit; latency p50 {1000 * latencies[len(latencies) // 2]:.1f} ms,"
            f" p90 {1000 * latencies[len(latencies) * 9 // 10]:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", help="a source tree (default: this one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single run, in its own process
    args = parser.parse_args()
    if args.one:
        print(run(args.one, args.sessions, args.commits))
        return 0
    trees = [os.path.abspath(tree) for tree in args.tree or [REPO]]
    with open("/proc/loadavg") as f:
        print(f"commits of 4 KiB, {args.sessions} at a time, {os.cpu_count()} cores, load {f.read().split()[0]}")
    for round_ in range(1, args.rounds + 1):
        for tree in trees:
            out = subprocess.run([sys.executable, __file__, "--one", tree, "--sessions", str(args.sessions),
                                  "--commits", str(args.commits)], capture_output=True, text=True,
                                 timeout=DEADLINE + 60)
            figures = out.stdout.strip() or out.stderr.strip().splitlines()[-1]
            print(f"round {round_} {tree}: {figures}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
