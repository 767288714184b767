"""Incoming processes (``[smtpgw.limits] IncomingProcesses``): inbound SMTP served on every core.

The main process keeps the listening sockets and admits every connection (receive/receiver.Sessions:
IncomingSessions and MaximalIncomingSessionsPerIP count the sessions of all processes); it serves
an admitted connection itself or passes it (SCM_RIGHTS) to the incoming process with the fewest
open sessions. An incoming process runs only the receive stage: the SMTP session, the access
checks and their DNS lookups (a resolver and cache of its own), and the durable commit into WFC
with I/O threads of its own; then it reports to the main process, which hands the message on as
it does for its own sessions (``Gateway.message_received``).

Owns: starting, feeding, restarting and stopping the incoming processes (``Incoming``, in the main
process); the incoming process itself (``IncomingProcess``, ``main``), which provides the receive
stage's ``Inbound``; and their channel, one SOCK_SEQPACKET socketpair per process carrying one
JSON object per packet:

- main → incoming: ``{"conn": [ip, port]}`` with the connection's descriptor; ``{"quota": ...}``
  (the day's counts, which the main process alone keeps: an incoming process refuses by them with
  QuotaAction=defer, as up to date as the last message counted); ``{"hold": bool}`` (messages wait
  for a scan slot: InFlowDelay) and ``{"go": n}`` (a held MAIL may go on); ``{"reload": true}`` (read ``.incoming-config`` again and reopen
  the log: the configuration the main process accepted at HUP); ``{"stop": true}``.
- incoming → main: ``{"ready": true}``, then reports ``{"ids": [...], "closed": [ip, ...],
  "stats": {counter: delta}}``: the queue IDs committed to WFC, the sessions that ended, and the
  counters their sessions changed, sent as they happen (and the counters at least once a second);
  ``{"admit": n, "first": bool}``: a MAIL waits for the scanner's turn (InFlowDelay,
  ``Scanner.admit``; ``first``: the session's first message, let go ahead of the others).

Must never: let an incoming process move a record out of WFC or hand a message to the scanner
(the main process does, on the ID reported); keep serving once the main process is gone (its
channel closed: it exits at once, answering nothing more); import the scanner, the sender, the
console or the spam engine into an incoming process.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import socket
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Protocol

from smtpgw import RELEASE_INTERVAL, child_command
from smtpgw.app.channel import (
    Channel, exit_orphaned, flush_log_every, leave, publish_reload, release_heap_every, serve_signals, setup_log,
)
from smtpgw.app.supervise import STOP_GRACE, Supervised
from smtpgw.config import Config, load_snapshot, save_snapshot
from smtpgw.net import smtp
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop, Timer
from smtpgw.receive.quota import Quota, local_day
from smtpgw.receive.receiver import Session, Sessions, client_address, greeting
from smtpgw.spool import ops
from smtpgw.spool.queue import WFC, Committer, Envelope, Queue, process_tag, set_process
from smtpgw.stats import Stats

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("smtpgw")

CONFIG_NAME = ".incoming-config"  # in QueuePath: the configuration the main process accepted (pickled)
CHUNK = 500  # queue IDs or addresses per packet
STATS_INTERVAL = 1.0  # seconds: counters reported at least this often, a packet sent even with none
HOLD_POLL = 0.1  # seconds between looks at the scan wait (InFlowDelay) in the main process
LOG_FLUSH_INTERVAL = 0.2


def process_count(cfg: Config) -> int:
    """IncomingProcesses; 0 (the default) means half the cores, at least one. Receiving and
    delivering a filtered message costs about as much CPU as scanning it, and the scanner workers
    are one per core: on 2 cores a second receiving process took CPU from them (bench/PROFILE.md,
    Incoming processes: 0.82x with Check=true, 1.46x with Check=false, +27 MiB)."""
    return cfg.limits.IncomingProcesses or max(1, (os.cpu_count() or 1) // 2)


def config_path(queue_root: str) -> str:
    return os.path.join(queue_root, CONFIG_NAME)


def server_tls(cfg: Config) -> ssl.SSLContext | None:
    """The STARTTLS context of TLSCertificateFile/TLSKeyFile (None without them); OSError (an
    ssl.SSLError is one) when they cannot be loaded. ssl is imported here: a gateway without a
    certificate speaks no TLS inbound, and one whose next hops offer none maps no libssl."""
    cert, key = cfg.network.TLSCertificateFile, cfg.network.TLSKeyFile
    if not cert:
        return None
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


# -- the main process's side -------------------------------------------------------------------
class Master(Protocol):
    """What ``Incoming`` needs from the gateway process (app/gateway.Gateway)."""

    cfg: Config
    loop: EventLoop
    queue: Queue
    stats: Stats
    quota: Quota
    inbound: Sessions
    stopping: bool

    def message_received(self, env: Envelope) -> None: ...

    def known_in_wfc(self) -> set[str]:
        """The WFC records the scanner has been given (waiting, being retried)."""

    def holding_mail(self) -> bool:
        """Whether messages wait for a scan slot (InFlowDelay holds new ones back)."""

    def admit_mail(self, ready: Callable[[], None], first: bool = False) -> bool:
        """InFlowDelay: True when a new message may come now, else ``ready`` runs when it may."""


class Child(Supervised):
    """An incoming process as the main process sees it."""

    def __init__(self, incoming: Incoming, index: int) -> None:
        super().__init__(incoming.master, f"incoming process {index}", self._command,
                         lambda message: incoming._message(self, message), lambda: incoming._lost(self),
                         on_reaped=lambda: incoming._reaped(self))
        self.index = index
        self.root = incoming.master.queue.root
        self.per_ip: Counter[str] = Counter()  # its open sessions by client address
        self.sessions = 0

    def _command(self, channel: int) -> list[str]:
        return child_command("smtpgw.app.incoming", "--index", str(self.index),
                             "--queue", self.root, "--channel", str(channel))


class Incoming:
    """The incoming processes of the main process: 1..N-1 (the main process is number 0)."""

    def __init__(self, master: Master, count: int) -> None:
        self.master = master
        self.children = [Child(self, index) for index in range(1, count)]
        self.hold = False
        self.hold_timer: Timer | None = None

    # -- start, restart ----------------------------------------------------------------
    def start(self) -> None:
        self.publish(self.master.cfg)
        for child in self.children:
            child.start()
        self.hold_timer = self.master.loop.call_later(HOLD_POLL, self._watch_hold)

    def publish(self, cfg: Config) -> None:
        """Leave the configuration in force where incoming processes read it (start, reload)."""
        save_snapshot(config_path(self.master.queue.root), cfg)

    def _message(self, child: Child, message: dict[str, Any]) -> None:
        if message.get("ready"):
            assert child.proc is not None
            log.info("incoming process %d started, pid=%d", child.index, child.proc.pid)
            self._send_quota(child, full=True)
            if self.hold and child.channel is not None:
                child.channel.send({"hold": True})
        for qid in message.get("ids", ()):
            self._received(qid)
        for ip in message.get("closed", ()):
            if child.per_ip[ip] > 0:
                self._release(child, ip)
        for name, amount in message.get("stats", {}).items():
            self.master.stats.inc(name, amount)
        if "admit" in message and child.channel is not None:
            self._admit(child.channel, message["admit"], bool(message.get("first")))

    def _admit(self, channel: Channel, asked: int, first: bool) -> None:
        """A MAIL held in an incoming process (InFlowDelay) goes when the scanner lets it."""
        def go() -> None:
            channel.send({"go": asked})  # a channel since closed (the process died) sends nothing

        if self.master.admit_mail(go, first):
            go()

    def _received(self, qid: str) -> bool:
        env = self.master.queue.load(WFC, qid)
        if env is None:
            log.error("%s: reported by an incoming process but not in WFC", qid)
            return False
        try:
            self.master.message_received(env)
        except Exception:  # durable in WFC: found again at the next start
            log.exception("%s: hand-off to the scanner failed", qid)
        return True

    def _release(self, child: Child, ip: str) -> None:
        child.sessions -= 1
        child.per_ip[ip] -= 1
        if child.per_ip[ip] <= 0:
            del child.per_ip[ip]
        self.master.inbound.closed_elsewhere(self.master, ip)

    def _lost(self, child: Child) -> None:
        """Its channel closed: the process ended (or is ending). Its sessions are gone with it."""
        for ip, count in list(child.per_ip.items()):
            for _ in range(count):
                self._release(child, ip)

    def _reaped(self, child: Child) -> str:
        """It has ended: what it committed and did not report handed on, what it left half
        written removed; the end of the log line "ended: …"."""
        found = self._find_unreported(child.index)
        dropped = self.master.queue.drop_unacknowledged(process_tag(child.index))
        if dropped:
            log.info("incoming process %d: %d file(s) of messages it never acknowledged removed", child.index, dropped)
        return f", {found} message(s) it had not reported taken over" if found else ""

    def _find_unreported(self, index: int) -> int:
        """Messages a dead incoming process committed to WFC without reporting them: its IDs end
        in its index (spool/queue.set_process); the ones the scanner was not given are handed on
        now. Only the main process moves records out of WFC, so nothing in progress is touched."""
        tag = process_tag(index)
        known = self.master.known_in_wfc()
        unreported = [qid for qid in self.master.queue.ids(WFC) if qid.endswith(tag) and "-" not in qid and qid not in known]
        return sum(self._received(qid) for qid in unreported)

    # -- what the main process gives them -----------------------------------------------
    def hand_over(self, conn: socket.socket, peer: tuple) -> bool:
        """``Sessions.admit``'s ``elsewhere``: True when an incoming process took the connection
        (the one with the fewest sessions; the main process serves it when that is itself)."""
        here = len(self.master.inbound.open)
        best: Child | None = None
        for child in self.children:
            if child.ready and child.channel is not None and child.sessions < (best.sessions if best else here):
                best = child
        if best is None or best.channel is None:
            return False
        ip = client_address(peer)
        if not best.channel.send_descriptor({"conn": [ip, peer[1]]}, conn.fileno()):
            return False
        conn.close()
        best.per_ip[ip] += 1
        best.sessions += 1
        return True

    def counted(self, env: Envelope) -> None:
        """The main process counted a message for the quotas and gave it to the scanner: tell
        the processes that refuse by the quotas, and whether mail now waits for a scan slot."""
        self._check_hold()
        if self.master.cfg.quota.QuotaAction != "defer":
            return
        addresses = [r.addr.lower() for r in env.recipients if r.addr.lower() in self.master.quota.recipients]
        for child in self.children:
            if child.ready and child.channel is not None:
                child.channel.send({"quota": self._quota_state(addresses, False)})

    def _send_quota(self, child: Child, full: bool) -> None:
        if self.master.cfg.quota.QuotaAction != "defer" or child.channel is None:
            return
        addresses = sorted(self.master.quota.recipients)
        for start in range(0, max(len(addresses), 1), CHUNK):
            child.channel.send({"quota": self._quota_state(addresses[start:start + CHUNK], full and start == 0)})

    def _quota_state(self, addresses: list[str], reset: bool) -> dict[str, Any]:
        quota = self.master.quota
        return {"day": quota.day, "bytes": quota.bytes, "over": quota.over, "rcpts": addresses, "reset": reset}

    def _watch_hold(self) -> None:
        """InFlowDelay across processes: tell them when messages start or stop waiting for a scan;
        and the watchdog (``_check_alive``)."""
        if self.master.stopping:
            return
        self._check_hold()
        self._check_alive()
        self.hold_timer = self.master.loop.call_later(HOLD_POLL, self._watch_hold)

    def _check_alive(self) -> None:
        """An incoming process sends a packet at least every STATS_INTERVAL; one silent for
        IncomingProcessTimeout is killed and started again (Supervised.check_alive)."""
        limit = self.master.cfg.timeouts.IncomingProcessTimeout
        for child in self.children:
            child.check_alive(limit, "IncomingProcessTimeout")

    def _check_hold(self) -> None:
        hold = self.master.holding_mail()
        if hold != self.hold:
            self.hold = hold
            self._broadcast({"hold": hold})

    def _broadcast(self, message: dict[str, Any]) -> None:
        for child in self.children:
            child.send(message)

    def reload(self, cfg: Config) -> None:
        """HUP accepted by the main process: the same configuration, and a reopened log, in each."""
        if publish_reload(config_path(self.master.queue.root), cfg, "incoming processes"):
            self._broadcast({"reload": True})

    def stop(self) -> None:
        """Each process closes its sessions (421) and exits; wait for them, STOP_GRACE at most."""
        if self.hold_timer is not None:
            self.hold_timer.cancel()
        self._broadcast({"stop": True})
        self.master.loop.run_until(lambda: all(child.proc is None for child in self.children), STOP_GRACE)
        for child in self.children:
            child.kill_unstopped()

    def pids(self) -> list[int]:
        return [child.proc.pid for child in self.children if child.proc is not None]


# -- the incoming process ------------------------------------------------------------------
class IncomingProcess:
    """The receive stage in a process of its own; provides receive/receiver.Inbound."""

    def __init__(self, cfg: Config, index: int, queue_root: str, channel: socket.socket) -> None:
        self.cfg = cfg
        self.index = index
        self.loop = EventLoop()
        self.stats = Stats()  # deltas since the last report
        self.queue = Queue(queue_root)
        self.committer = Committer(self.queue, self.loop.call_soon_threadsafe)
        self.day = local_day()
        self.quota = Quota(queue_root, today=lambda: self.day)
        self.ssl_context = server_tls(cfg)
        self.resolver = Resolver.from_config(self.loop, cfg.resolve)
        self.open: set[Session] = set()
        self.hold = False  # messages wait for a scan slot (the main process says so)
        self.held: dict[int, Callable[[], None]] = {}  # MAIL commands waiting for the main process's go
        self.asked = 0
        self.stopping = False
        self.report: dict[str, list[str]] = {"ids": [], "closed": []}
        self.reporting = False
        self.channel = Channel(self.loop, channel, self._message, self._master_gone)

    def run(self) -> None:
        serve_signals(self.loop, self.stop)
        self.channel.send({"ready": True})
        self.loop.call_later(STATS_INTERVAL, self._report_stats)
        self.loop.call_later(LOG_FLUSH_INTERVAL, flush_log_every, self.loop, LOG_FLUSH_INTERVAL)
        self.loop.call_later(RELEASE_INTERVAL, release_heap_every, self.loop)
        self.loop.run_forever()

    # -- Inbound ------------------------------------------------------------------------
    def queue_has_space(self) -> bool:
        return ops.has_space(self.queue, self.cfg.limits.MinimalQueueFreeSpaceSize * 1024 * 1024)

    def message_received(self, env: Envelope) -> None:
        self.report["ids"].append(env.id)
        self._report_soon()

    def session_closed(self, session: Session) -> None:
        self.open.discard(session)
        self.report["closed"].append(session.ip)
        self._report_soon()

    def admit_mail(self, ready: Callable[[], None], first: bool = False) -> bool:
        """InFlowDelay: while the main process says messages wait for a scan slot, a MAIL asks it
        (``{"admit": n, "first": bool}``) and waits for its ``{"go": n}``: the main process's
        scanner lets held MAILs of every process go in turn, as one moves on or after
        InFlowDelay (Scanner.admit)."""
        if not self.hold or not self.cfg.limits.InFlowDelay:
            return True
        self.asked += 1
        self.held[self.asked] = ready
        self.channel.send({"admit": self.asked, "first": first})
        return False

    # -- the channel ---------------------------------------------------------------------
    def _message(self, message: dict[str, Any], fds: list[int]) -> None:
        if "conn" in message and fds:
            self._serve(fds.pop(0), message["conn"])
        for fd in fds:
            os.close(fd)
        if "quota" in message:
            self._quota(message["quota"])
        if "hold" in message:
            self.hold = bool(message["hold"])
        if "go" in message and (ready := self.held.pop(message["go"], None)) is not None:
            ready()
        if message.get("reload"):
            self.reload()
        if message.get("stop"):
            self.stop()

    def _serve(self, fd: int, peer: list[Any]) -> None:
        sock = socket.socket(fileno=fd)
        if self.stopping:
            sock.close()
            self.report["closed"].append(client_address(tuple(peer)))
            self._report_soon()
            return
        sock.setblocking(False)
        session = Session(self, sock, tuple(peer))
        self.open.add(session)
        session.start(greeting(self.cfg.network.Hostname))

    def _quota(self, state: dict[str, Any]) -> None:
        if state["reset"] or state["day"] != self.day:
            self.day = state["day"]
            self.quota = Quota(self.queue.root, today=lambda: self.day)
        self.quota.bytes = state["bytes"]
        self.quota.over = state["over"]
        self.quota.recipients.update(state["rcpts"])

    def _report_soon(self) -> None:
        if not self.reporting:
            self.reporting = True
            self.loop.call_soon(self._send_report)

    def _send_report(self) -> None:
        self.reporting = False
        ids, closed = self.report["ids"], self.report["closed"]
        self.report = {"ids": [], "closed": []}
        deltas = {name: value for name, value in self.stats.counters.items() if value}
        self.stats.counters.clear()
        for start in range(0, max(len(ids), len(closed), 1), CHUNK):
            packet: dict[str, Any] = {"ids": ids[start:start + CHUNK], "closed": closed[start:start + CHUNK]}
            if start == 0 and deltas:
                packet["stats"] = deltas
            self.channel.send(packet)

    def _report_stats(self) -> None:
        self._send_report()  # with nothing to report too: the main process's watchdog hears it
        self.loop.call_later(STATS_INTERVAL, self._report_stats)

    # -- reload, stop -------------------------------------------------------------------
    def reload(self) -> None:
        """The configuration the main process accepted, and the log reopened (rotation)."""
        try:
            cfg = load_snapshot(config_path(self.queue.root))
            ssl_context = server_tls(cfg)
            setup_log(cfg)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:  # ssl.SSLError is an OSError
            log.error("incoming process %d keeps its configuration: %s", self.index, exc)
            return
        self.cfg = cfg
        self.ssl_context = ssl_context
        self.resolver.close()
        self.resolver = Resolver.from_config(self.loop, cfg.resolve)

    def stop(self) -> None:
        """Close every session with 421, let the commits under way end, report, exit."""
        if self.stopping:
            return
        self.stopping = True
        for session in list(self.open):
            session.close_with(smtp.SHUTTING_DOWN.format(self.cfg.network.Hostname))
        self.loop.run_until(lambda: not self.open, 1.0)
        self.committer.close()
        self.loop.run_once(0)  # the commits' completions, queued by the I/O threads
        self._send_report()
        leave(self.loop, self.channel, STOP_GRACE)

    def _master_gone(self) -> None:
        """The main process is gone (killed): exit at once, answering nothing more. A message
        whose 250 was sent is in WFC, where the next gateway finds it."""
        if self.stopping:
            return
        exit_orphaned(f"incoming process {self.index}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smtpgw.app.incoming", description="an incoming process (IncomingProcesses)")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--channel", type=int, required=True)
    args = parser.parse_args(argv)
    set_process(args.index)
    channel = socket.socket(fileno=args.channel)
    cfg = load_snapshot(config_path(args.queue))
    setup_log(cfg)
    IncomingProcess(cfg, args.index, args.queue, channel).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
