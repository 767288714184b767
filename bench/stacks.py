"""Filtering relays side by side: smtpgw (Check on and off) beside plain Postfix and Postfix + rspamd.

Owns: starting the peer stacks on loopback (a private Postfix relay; Postfix whose smtpd_milters
point at a private rspamd 3.4 proxy in milter + self_scan mode with its clamav module; smtpgw with
``[smtpgw.policy] Check=true`` and ``Check=false``), all relaying to one ``smtp-sink`` that dumps
every message, with one private clamd (tests/support/clamd.py) for rspamd and smtpgw; driving each
with smtp-source, interleaved over the runs; measuring end-to-end msgs/s (first byte sent → last
message at the sink), the whole machine's CPU busy % from /proc/stat over that time, and the
latency of probe messages sent at 10/s during the load (send → arrival at the sink, matched by a
unique ``X-Bench-Probe`` header); printing one table of medians.

    python3 bench/relay.py --stacks [--runs 1] [--messages 500] [--sessions 50] [--size 4096]
    python3 bench/relay.py --stacks --runs 3 --messages 2000        # the full comparison

Must never: talk to anything but 127.0.0.1; wait without a deadline; leave a process it started
running (every stack is stopped in ``finally``); touch the system's Postfix or rspamd configuration
(each peer has its own config and queue under a temp folder).
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support.components import which  # noqa: E402
from tests.support.net import GatewayProcess, free_port, listening, wait_until  # noqa: E402

SENDER, RCPT = "load@src.test", "rcpt@example.test"
PROBE_HEADER = re.compile(rb"^X-Bench-Probe: (\S+) (\d+) ([\d.]+)", re.M)
PROBE_FILLER = ("Probe body line for the latency test, nothing to see here. " * 2 + "\r\n") * 34  # ~4 KiB
EICAR_HEX = ("58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e"
             "444152442d414e544956495255532d544553542d46494c452124482b482a")

# region Postfix


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
myhostname = postfix.bench.test
local_transport = error:5.1.1 local delivery is disabled
relayhost = [127.0.0.1]:{sink}
mynetworks = 127.0.0.0/8
disable_dns_lookups = yes
smtp_dns_support_level = disabled
smtp_host_lookup = native
smtpd_tls_security_level = none
smtp_tls_security_level = none
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 100
"""

MILTER_CF = """\
smtpd_milters = inet:127.0.0.1:{port}
milter_default_action = tempfail
milter_protocol = 6
milter_mail_macros = i {{mail_addr}} {{client_addr}} {{client_name}} {{auth_authen}}
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_missing() -> str | None:
    if not which("postfix"):
        return "Debian's postfix is not installed"
    if os.geteuid() != 0:
        return "a private Postfix needs root"
    return None


class PostfixRelay:
    """A private Postfix 3.7 relay in ``folder`` (own main.cf, master.cf, queue), no system config."""

    def __init__(self, folder: str, sink_port: int, milter_port: int | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.env = dict(os.environ, MAIL_CONFIG=folder)
        self.maillog = os.path.join(folder, "maillog")
        os.makedirs(folder, exist_ok=True)
        main = MAIN_CF.format(d=folder, sink=sink_port)
        if milter_port is not None:
            main += MILTER_CF.format(port=milter_port)
        with open(os.path.join(folder, "main.cf"), "w") as f:
            f.write(main)
        with open(os.path.join(folder, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=self.port))
        for sub in ("queue", "data"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        shutil.chown(os.path.join(folder, "data"), "postfix")

    def start(self) -> None:
        postfix = which("postfix") or "postfix"
        subprocess.run([postfix, "-c", self.folder, "check"], env=self.env, capture_output=True, timeout=60)
        started = subprocess.run([postfix, "-c", self.folder, "start"], env=self.env, capture_output=True,
                                 text=True, timeout=60)
        if started.returncode != 0:
            # postfix(1) prints its reasons on a terminal only; its log has them too
            log = open(self.maillog).read()[-2000:] if os.path.exists(self.maillog) else ""
            raise RuntimeError(f"postfix did not start (exit {started.returncode}): {started.stdout}{started.stderr}{log}")
        wait_until(lambda: listening(self.port), 30, "postfix smtpd")

    def stop(self) -> None:
        subprocess.run([which("postfix") or "postfix", "-c", self.folder, "stop"], env=self.env,
                       capture_output=True, timeout=60)


# endregion
# region rspamd


RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    .include "$CONFDIR/logging.inc"
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
    count = {procs};
    max_retries = 5;
    discard_on_reject = false;
    quarantine_on_reject = false;
    spam_header = "X-Spam";
    reject_message = "Spam message rejected";
}}
"""

# every DNS query goes to 127.0.0.1:53, where nothing answers: no lookup leaves loopback
RSPAMD_OPTIONS = """\
dns {
  nameserver = ["127.0.0.1:53"];
  timeout = 1s;
  retransmits = 1;
}
filters = "chartable,regexp";
"""

RSPAMD_ANTIVIRUS = """\
clamav {{
  type = "clamav";
  servers = "{clamd}";
  scan_mime_parts = false;
  symbol = "CLAM_VIRUS";
  action = "reject";
  max_size = 20000000;
  timeout = 15.0;
  retransmits = 1;
}}
"""

RSPAMD_NETWORK_MODULES = ("rbl", "spf", "dkim", "dmarc", "arc", "asn", "emails", "hfilter", "whitelist",
                          "mx_check", "fuzzy_check", "dkim_signing")


def rspamd_missing() -> str | None:
    if not which("rspamd"):
        return "rspamd is not installed (Debian package rspamd)"
    try:
        pwd.getpwnam("_rspamd")
    except KeyError:
        return "no _rspamd account"
    return postfix_missing()


class Rspamd:
    """A private rspamd: proxy workers in milter + self_scan mode, antivirus through clamd INSTREAM of
    the whole message, DNS-based modules off, Bayes off (it would need a trained redis)."""

    def __init__(self, folder: str, clamd_tcp: str, procs: int = 2) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        etc = os.path.join(folder, "etc")
        os.makedirs(os.path.join(etc, "local.d"), exist_ok=True)
        for sub in ("run", "db", "log"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
            shutil.chown(os.path.join(folder, sub), "_rspamd", "_rspamd")
        files = {
            "rspamd.conf": RSPAMD_CONF.format(port=self.port, procs=procs),
            "local.d/options.inc": RSPAMD_OPTIONS,
            "local.d/antivirus.conf": RSPAMD_ANTIVIRUS.format(clamd=clamd_tcp),
            "local.d/classifier-bayes.conf": "enabled = false;\n",
            **{f"local.d/{m}.conf": "enabled = false;\n" for m in RSPAMD_NETWORK_MODULES},
        }
        for name, text in files.items():
            with open(os.path.join(etc, name), "w") as f:
                f.write(text)

    def start(self) -> None:
        var = {"LOCAL_CONFDIR": "etc", "RUNDIR": "run", "DBDIR": "db", "LOGDIR": "log"}
        self.proc = subprocess.Popen(
            ["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", os.path.join(self.folder, "etc", "rspamd.conf"),
             *(f"--var={k}={os.path.join(self.folder, v)}" for k, v in var.items())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.proc.poll() is not None or listening(self.port), 120, "rspamd milter port")
        if self.proc.poll() is not None:
            raise RuntimeError(f"rspamd exited with {self.proc.returncode}: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.folder, "log", "rspamd.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


# endregion
# region the sink, the load and the probes


class DumpSink:
    """smtp-sink on loopback writing every message to a file in ``folder`` (its mtime is the arrival)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o777)  # smtp-sink runs as nobody
        self.port = free_port()
        self.seen: dict[str, tuple[str, int, float] | None] = {}  # file name → its probe, if it is one
        self.proc = subprocess.Popen(
            [which("smtp-sink") or "smtp-sink", "-u", "nobody", "-d", os.path.join(folder, "%H%M%S."),
             f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: listening(self.port), 10, "smtp-sink")

    def count(self) -> int:
        return len(os.listdir(self.folder))

    def clear(self) -> None:
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        self.seen: dict[str, tuple[str, int, float] | None] = {}

    def probe_arrivals(self, label: str) -> dict[int, float]:
        """Probe number → arrival time, for the probes of run ``label`` (each file read once)."""
        for name in os.listdir(self.folder):
            if name not in self.seen:
                path = os.path.join(self.folder, name)
                with open(path, "rb") as f:
                    match = PROBE_HEADER.search(f.read(8192))
                self.seen[name] = (match.group(1).decode(), int(match.group(2)), os.stat(path).st_mtime) if match else None
        return {n: t for item in self.seen.values() if item is not None for probe, n, t in [item] if probe == label}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Probes(threading.Thread):
    """One small message per connection every ``interval`` s until ``stop`` (at most ``limit``);
    each carries ``X-Bench-Probe: LABEL N SEND-TIME``."""

    def __init__(self, port: int, label: str, interval: float = 0.1, limit: int = 3000) -> None:
        super().__init__(daemon=True)
        self.port, self.label, self.interval, self.limit = port, label, interval, limit
        self.sent: dict[int, float] = {}  # accepted (250) probes: number → send time
        self.reply_ms: list[float] = []
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        due = time.time()
        for n in range(self.limit):
            if self.halt.wait(max(0.0, due - time.time())):
                return
            due += self.interval
            t0 = time.time()
            body = (f"From: a@src.test\r\nTo: {RCPT}\r\nSubject: probe {n}\r\n"
                    f"X-Bench-Probe: {self.label} {n} {t0:.6f}\r\n"
                    f"Message-ID: <probe-{self.label}-{n}@bench.test>\r\n\r\n" + PROBE_FILLER)
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as client:
                    client.sendmail(SENDER, [RCPT], body.encode())
            except (smtplib.SMTPException, OSError):
                self.refused += 1
                continue
            self.sent[n] = t0
            self.reply_ms.append((time.time() - t0) * 1000)

    def stop(self) -> None:
        self.halt.set()
        self.join(150)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (/proc/stat; iowait counts as idle)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    total = sum(values)
    return total - idle, total


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def smtp_source(port: int, messages: int, sessions: int, size: int) -> None:
    subprocess.run([which("smtp-source") or "smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"],
                   check=True, timeout=900, stdout=subprocess.DEVNULL)


# endregion
# region one measured run


@dataclass
class Figures:
    rate: float  # e2e msgs/s
    cpu: float  # whole machine busy %, 100 per core
    accept_rate: float
    latency: list[float]  # probe send → arrival, ms
    reply_ms: list[float]
    load: str
    lost: list[int] = field(default_factory=list)  # probes accepted and never seen at the sink


def measure(port: int, sink: DumpSink, label: str, args: argparse.Namespace) -> Figures:
    sink.clear()
    load = loadavg()
    probes = Probes(port, label)
    busy0, total0 = cpu_times()
    t0 = time.monotonic()
    probes.start()
    smtp_source(port, args.messages, args.sessions, args.size)
    accepted_s = time.monotonic() - t0
    wait_until(lambda: sink.count() >= args.messages + len(probes.sent), args.timeout, f"{label}: all at the sink")
    elapsed = time.monotonic() - t0
    busy1, total1 = cpu_times()
    probes.stop()
    # the probes still in flight: a bounded wait for each of them, by its header (a count of files
    # could be made up by a late message of an earlier run)
    deadline = time.monotonic() + 60
    while not set(probes.sent) <= set(arrived := sink.probe_arrivals(label)) and time.monotonic() < deadline:
        time.sleep(0.5)  # polling the sink's folder; not a synchronisation with a fixed delay
    latency = [(arrived[n] - t) * 1000 for n, t in probes.sent.items() if n in arrived]
    cores = os.cpu_count() or 1
    return Figures(args.messages / elapsed, 100.0 * cores * (busy1 - busy0) / max(1, total1 - total0),
                   args.messages / accepted_s, latency, probes.reply_ms, load,
                   lost=sorted(set(probes.sent) - set(arrived)))


# endregion
# region the stacks


@dataclass
class Stack:
    name: str
    title: str
    missing: Callable[[], str | None]
    start: Callable[[], int]  # starts it, returns its SMTP port
    stop: Callable[[], None] = lambda: None
    verify: Callable[[], str] | None = None  # after the EICAR message: what the stack did with it
    log_path: str | None = None  # smtpgw's log: what happened to a probe that did not arrive
    port: int = 0
    runs: list[Figures] = field(default_factory=list)


def smtpgw_stack(folder: str, sink_port: int, clamd_address: str | None, check: bool,
                 processes: int = 0, delivery: str = "") -> GatewayProcess:
    return GatewayProcess(folder, sink_port, extra=smtpgw_settings(clamd_address, check, processes, delivery))


def smtpgw_settings(clamd_address: str | None, check: bool, processes: int = 0,
                    delivery: str = "") -> dict[str, list[tuple[str, str]]]:
    """The benchmark's settings of smtpgw (beside tests/support's base configuration)."""
    policy = [("Check", "true" if check else "false"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none")]
    # the per-client limits opened for the one load-generating client, and the deliveries to the
    # one next hop as concurrent as the Postfix stacks' (default_destination_concurrency_limit 20)
    extra = {
        "smtpgw.limits": [("IncomingSessions", "1024"), ("MaximalIncomingSessionsPerIP", "1024"),
                          ("MaximalIncomingMessagesPerSession", "1024"), ("IncomingProcesses", str(processes)),
                          ("MaximalOutgoingSessionsPerHost", "20")] + ([("DeliveryProcess", delivery)] if delivery else []),
        "smtpgw.options": [("LogLevel", "info")],
        "smtpgw.policy": policy,
        "smtpgw.antispam": [("Check", "true" if check else "false")],
    }
    if clamd_address:
        extra["smtpgw.ave"] = [("ClamdAddress", clamd_address)]
    return extra


def eicar_outcome(port: int) -> str:
    """What the stack answers to a message with the EICAR test file (built from hex here)."""
    body = (f"From: a@src.test\r\nTo: {RCPT}\r\nSubject: bench av test\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nav test\r\n"
            "--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=eicar.com\r\n\r\n"
            + bytes.fromhex(EICAR_HEX).decode() + "\r\n--b--\r\n")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.sendmail(SENDER, [RCPT], body.encode())
        return "accepted (250)"
    except smtplib.SMTPResponseException as exc:
        return f"refused {exc.smtp_code}"
    except smtplib.SMTPRecipientsRefused:
        return "recipient refused"


def run_stacks(args: argparse.Namespace, tmp: str) -> int:
    cores = os.cpu_count() or 1
    print(f"stacks: {args.runs} interleaved run(s) of {args.messages} x {args.size} B over {args.sessions} sessions "
          f"(smtp-source), probes at 10/s; {cores} cores; all to one smtp-sink on loopback")
    for tool in ("smtp-source", "smtp-sink"):
        if not which(tool):
            print(f"--stacks needs Postfix's {tool} (Debian package postfix)")
            return 1
    from tests.support.clamd import RAM_DISK, start_clamd  # the private clamd, shared by rspamd and smtpgw

    sink = DumpSink(os.path.join(tmp, "sink"))
    # clamd writes every stream it scans to a file in its TemporaryDirectory: on a tmpfs, as a
    # deployment would put it, a scan creates no inode on the spool's disk (both stacks use it)
    clamd = start_clamd(temporary_parent=RAM_DISK) if which("clamd") else None
    stacks = [s for s in build_stacks(tmp, sink.port, clamd, args.incoming_processes, args.delivery_process) if not args.only or s.name in args.only.split(",")]
    try:
        for stack in stacks:
            why = stack.missing()
            if why:
                print(f"{stack.name:7}: skipped: {why}")
                continue
            stack.port = stack.start()
            if clamd is not None and stack.verify is not None:
                print(f"{stack.name:7}: EICAR message {eicar_outcome(stack.port)}{stack.verify()}")
        live = [s for s in stacks if s.port]
        for run in range(args.runs):
            for stack in live if run % 2 == 0 else reversed(live):
                figures = measure(stack.port, sink, f"{stack.name}.{run}", args)
                stack.runs.append(figures)
                for n in figures.lost:
                    print(f"  {stack.name}: probe {n} accepted, not at the sink: {probe_story(stack, f'{stack.name}.{run}', n)}")
                print(f"  run {run + 1} {stack.name:7}: {figures.rate:6.1f} msgs/s e2e, accept {figures.accept_rate:6.1f}/s, "
                      f"CPU {figures.cpu:4.0f}%, probes p90 {percentile(figures.latency, 90):6.0f} ms, load {figures.load}",
                      flush=True)
        print_table(live)
    finally:
        for stack in stacks:
            if stack.port:
                stack.stop()
        if clamd is not None:
            clamd.remove()
        sink.stop()
    return 0


def probe_story(stack: Stack, label: str, n: int) -> str:
    """The gateway's log lines about probe ``n`` of run ``label`` (found by its Message-ID)."""
    if stack.log_path is None:
        return "(no log)"
    with open(stack.log_path, errors="replace") as f:
        lines = f.read().splitlines()
    ids = {line.split(": ", 1)[0].split()[-1] for line in lines if f"probe-{label}-{n}@" in line}
    return " | ".join(line for line in lines if any(f" {qid}: " in line for qid in ids)) or "nothing logged"


def build_stacks(tmp: str, sink_port: int, clamd, processes: int = 0, delivery: str = "") -> list[Stack]:
    clamd_missing = (lambda: None) if clamd is not None else (lambda: "clamd is not installed (clamav-daemon)")
    plain = PostfixRelay(os.path.join(tmp, "pf-plain"), sink_port) if not postfix_missing() else None
    stacks = [Stack("plain", "Postfix, plain relay (no filtering)", postfix_missing,
                    lambda: (plain.start(), plain.port)[1], lambda: plain.stop())]
    holder: dict[str, object] = {}

    def start_rspamd() -> int:
        rs = holder["rspamd"] = Rspamd(os.path.join(tmp, "rspamd"), clamd.tcp_address)
        rs.start()
        pf = holder["pf"] = PostfixRelay(os.path.join(tmp, "pf-rspamd"), sink_port, milter_port=rs.port)
        pf.start()
        return pf.port

    def stop_rspamd() -> None:
        for key in ("pf", "rspamd"):
            if key in holder:
                holder[key].stop()  # type: ignore[attr-defined]

    stacks.append(Stack("rspamd", "Postfix + rspamd 3.4 milter (+ clamd)",
                        lambda: clamd_missing() or rspamd_missing(), start_rspamd, stop_rspamd, lambda: ""))
    for name, check in (("gw-on", True), ("gw-off", False)):
        gw = smtpgw_stack(os.path.join(tmp, name), sink_port, clamd.unix_address if clamd else None, check, processes, delivery)
        stacks.append(Stack(name, f"smtpgw, Check={'true' if check else 'false'}" + (" (spam + clamd)" if check else " (relay only)"),
                            clamd_missing if check else (lambda: None),
                            (lambda gw=gw: (gw.start(), gw.port)[1]), (lambda gw=gw: gw.stop()),
                            (lambda gw=gw: ", " + gw.wait_log(r'AV-SCANNED.*status="infected"', 60)[0].split(" ", 3)[-1])
                            if check else None, gw.log_path))
    return stacks


def print_table(stacks: list[Stack]) -> None:
    print()
    print("| stack | e2e msgs/s | CPU busy | probe latency p50 / p90 / p99 (ms) | probes | load avg |")
    print("|---|---|---|---|---|---|")
    for stack in stacks:
        runs = stack.runs
        latency = [x for f in runs for x in f.latency]
        lost = sum(len(f.lost) for f in runs)
        print(f"| {stack.title} | {statistics.median(f.rate for f in runs):.0f} | "
              f"{statistics.median(f.cpu for f in runs):.0f}% | "
              f"{percentile(latency, 50):.0f} / {percentile(latency, 90):.0f} / {percentile(latency, 99):.0f} | "
              f"{len(latency)}{f' ({lost} not arrived)' if lost else ''} | "
              f"{', '.join(f.load for f in runs)} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=1, help="interleaved runs per stack (--stacks; medians)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one run's last message")
    parser.add_argument("--incoming-processes", type=int, default=0,
                        help="smtpgw's IncomingProcesses (default 0: half the cores, at least one)")
    parser.add_argument("--delivery-process", choices=("yes", "no"), default="",
                        help="smtpgw's DeliveryProcess (default: the configuration's default)")
    parser.add_argument("--only", help="these stacks only (--stacks), e.g. gw-on,rspamd (names: plain, rspamd, gw-on, gw-off)")
