#!/usr/bin/env python3
"""Fuzz the message paths and the SMTP receiver for a while; print inputs, outcomes, worst time and RSS.

Two parts share the time given (``--minutes``; ``--smtp-share`` of it goes to SMTP):

* messages: mutated corpus and torture-set messages (tests/support/fuzz.py mutators) through MIME
  decomposition and rebuilding (mime.py, archives.py), the spam tokenizer and filter (spam/),
  notifications and the disclaimer (notify.py), DSNs (dsn.py) and the 7-bit conversion for peers
  without 8BITMIME (downgrade.py), each input in a child process
  under ``--time-limit`` seconds and ``--rss-limit`` MB of RSS growth; ``--coverage`` guides the
  mutation by line pairs covered in smtpgw (slower per input, finds deeper paths);
* smtp: mutated sessions (verbs, arguments, ESMTP parameters, pipelining, line lengths and ends,
  BDAT, corpus messages as DATA) against a gateway started here on 127.0.0.1 with the spam filter on,
  delivering to a local sink; every byte it sends must be an SMTP reply line, every session must
  end within ``--session-timeout``, the log must stay free of tracebacks and the gateway's RSS
  (every process) under ``--gateway-rss-limit`` MB.

Every crash or bound exceeded is written to ``--findings`` (outside the repository) with its
mutators and traceback, for minimising into a regression test. Same ``--seed``, same inputs.

    nice -n 5 python3 bench/fuzz.py --minutes 30 --coverage --findings /tmp/smtpgw-fuzz
    python3 bench/fuzz.py --ci            # the short deterministic slice tests/test_fuzz.py runs
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.support import fuzz  # noqa: E402
from tests.support.net import GatewayProcess, Sink  # noqa: E402


def message_part(args: argparse.Namespace, seconds: float | None, count: int | None) -> fuzz.Fuzzer:
    seeds = fuzz.load_seeds(args.corpus, every=args.corpus_every)
    fuzzer = fuzz.Fuzzer(seeds, args.seed, args.findings and os.path.join(args.findings, "messages"),
                         time_limit=args.time_limit, rss_limit_mb=args.rss_limit, cap=args.max_size << 10,
                         coverage=args.coverage)
    started = time.monotonic()

    def progress(f: fuzz.Fuzzer) -> None:
        total = sum(x.inputs for x in f.figures.values())
        print(f"[{time.monotonic() - started:7.0f} s] {total} runs, {len(f.edges)} line pairs, "
              f"{len(f.findings)} findings", flush=True)

    fuzzer.run(deadline=None if seconds is None else time.monotonic() + seconds, count=count,
               progress=progress if args.verbose else None, targets=tuple(args.targets))
    return fuzzer


def gateway_rss_mb(gw: GatewayProcess) -> float:
    """RSS of the gateway and all its descendants (the scanner workers), from /proc."""
    assert gw.proc is not None
    pids, total = [gw.proc.pid], 0
    while pids:
        pid = pids.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def smtp_part(args: argparse.Namespace, seconds: float | None, count: int | None) -> dict[str, object]:
    """Sessions against a private gateway; returns the figures."""
    messages = fuzz.load_seeds(args.corpus, every=max(args.corpus_every, 20))
    rng = random.Random(args.seed)
    figures: dict[str, object] = {"sessions": 0, "outcomes": set(), "worst_seconds": 0.0, "worst_rss_mb": 0.0,
                                  "findings": [], "delivered": 0}
    folder = tempfile.mkdtemp(prefix="smtpgw-fuzz-smtp-")
    sink = Sink()
    gw = GatewayProcess(folder, sink.port, extra={
        "smtpgw.timeouts": [("ReadTimeout", str(int(args.session_timeout)))],
        "smtpgw.limits": [("MaximalIncomingSessionsPerIP", "64")],
        "smtpgw.antispam": [("Check", "true")],
        "smtpgw.options": [("LogLevel", "info")],
    }).start()
    deadline = None if seconds is None else time.monotonic() + seconds
    findings: list[str] = figures["findings"]  # type: ignore[assignment]
    try:
        while (deadline is None or time.monotonic() < deadline) and (count is None or figures["sessions"] < count):
            script = fuzz.session_script(rng, messages) if rng.random() < 0.8 else [fuzz.garbage(rng)]
            stream, took, ended = fuzz.run_session(gw.port, script, args.session_timeout * 3)
            figures["sessions"] += 1  # type: ignore[operator]
            figures["outcomes"].add(fuzz.reply_codes(stream))  # type: ignore[attr-defined]
            figures["worst_seconds"] = max(figures["worst_seconds"], took)  # type: ignore[call-overload]
            bad = fuzz.check_replies(stream)
            problems = ([f"not an SMTP reply: {bad}"] if bad else []) + ([] if ended else [f"session open after {took:.0f} s"])
            if figures["sessions"] % 50 == 0 or problems:  # type: ignore[operator]
                rss = gateway_rss_mb(gw)
                figures["worst_rss_mb"] = max(figures["worst_rss_mb"], rss)  # type: ignore[call-overload]
                if rss > args.gateway_rss_limit:
                    problems.append(f"gateway RSS {rss:.0f} MB")
                if gw.proc is not None and gw.proc.poll() is not None:
                    problems.append(f"gateway exited with {gw.proc.returncode}")
                log = gw.log_text()
                if "Traceback" in log:
                    problems.append("traceback in the log")
            for problem in problems:
                findings.append(problem)
                if args.findings:
                    os.makedirs(os.path.join(args.findings, "smtp"), exist_ok=True)
                    path = os.path.join(args.findings, "smtp", f"session-{figures['sessions']}.bin")
                    with open(path, "wb") as f:
                        f.write(repr(script).encode() + b"\n\n" + stream)
                    findings[-1] += f" ({path})"
            with sink.cond:  # counted, not kept: a long run would hold every message
                figures["delivered"] += len(sink.messages)  # type: ignore[operator]
                sink.messages.clear()
            if gw.proc is not None and gw.proc.poll() is not None:
                break
    finally:
        gw.stop()
        sink.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--ci", action="store_true", help="a fixed count of inputs instead of a time (seconds)")
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--targets", nargs="+", default=list(fuzz.TARGETS), choices=fuzz.TARGETS)
    parser.add_argument("--smtp-share", type=float, default=0.25, help="share of the time for SMTP sessions")
    parser.add_argument("--corpus", default=fuzz.CORPUS)
    parser.add_argument("--corpus-every", type=int, default=4, help="every Nth corpus file (the torture set whole)")
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per input")
    parser.add_argument("--rss-limit", type=int, default=256, help="MB of RSS growth per input")
    parser.add_argument("--max-size", type=int, default=4096, help="KB per input")
    parser.add_argument("--session-timeout", type=float, default=5.0)
    parser.add_argument("--gateway-rss-limit", type=float, default=1024.0, help="MB, all gateway processes")
    parser.add_argument("--coverage", action="store_true", help="keep inputs that reach new line pairs")
    parser.add_argument("--findings", default="/tmp/smtpgw-fuzz")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    total = args.minutes * 60
    started = time.monotonic()
    if args.ci:
        fuzzer = message_part(args, None, 150)
        smtp = smtp_part(args, None, 60) if args.smtp_share > 0 else None
    else:
        fuzzer = message_part(args, total * (1 - args.smtp_share), None)
        smtp = smtp_part(args, max(0.0, started + total - time.monotonic()), None) if args.smtp_share > 0 else None
    print(f"messages ({time.monotonic() - started:.0f} s so far, seed {args.seed}):")
    print(fuzzer.report())
    failed = bool(fuzzer.findings)
    if smtp is not None:
        print(f"smtp: {smtp['sessions']} sessions, {len(smtp['outcomes'])} distinct reply sequences, "  # type: ignore[arg-type]
              f"worst session {smtp['worst_seconds']:.2f} s, worst gateway RSS {smtp['worst_rss_mb']:.0f} MB, "
              f"{smtp['delivered']} messages delivered to the sink")
        for problem in smtp["findings"]:  # type: ignore[attr-defined]
            print(f"  finding: {problem}")
        failed = failed or bool(smtp["findings"])
    print(f"total {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
