"""The delivery process (``[smtpgw.limits] DeliveryProcess``): the Sender stage on a core of its own.

With DeliveryProcess=yes the main process keeps the listeners, the sessions it serves, the
scanner and everything around them, and hands each message that reaches QUE (scanned, relayed
unscanned, released from a store, a notification, a digest, a quota notice) to one delivery
process by its queue ID; that process reads the record from QUE itself and runs
deliver/sender.Sender on a loop of its own, with its own I/O threads, resolver and outbound
connections: QUE → SND → done or back to QUE, DSNs, back-off, and the end of a delivered message
(outgoing archive, unlink). As Postfix's qmgr and smtp beside smtpd.

Owns: starting, feeding, restarting, reloading and stopping the delivery process (``Delivery``,
in the main process, in the gateway's place of its Sender); the process itself
(``DeliveryProcess``, ``main``), which provides the Sender's ``Outbound``; what their channel
(app/channel.py) carries:

- main → delivery: ``{"q": [[id, when, priority], ...]}`` (records in QUE to schedule);
  ``{"forget": id}`` (the admin removed it from QUE); ``{"send": id}``, ``{"send_all": true}``
  (kmg-spec §4.6 send now); ``{"sending": bool}`` (``.c_send_on``/``.c_send_off``);
  ``{"reload": true}`` (read ``.delivery-config`` again and reopen the log); ``{"stop": true}``.
- delivery → main: ``{"ready": true, "resumed": n}`` once it has taken every record in QUE and
  turned SND back into QUE; then reports ``{"stats": {counter: delta}, "done": [[seconds, group],
  ...], "free": [paths], "free_small": [paths], "registries": {...}}``: the counters the Sender
  changed, the messages whose last recipient got its final state (the console's delivery latency
  and top groups), recycled tmp/ files for the main process to write again (``Queue.spare_free``:
  those of messages, and the small ones of records), and, once a
  second and when asked (``{"registries": true}``, answered with ``"answer": true``), the Sender's
  registry lengths (``.c_memory``).

Must never: let the main process move a record into or out of SND (only the delivery process
delivers; the main process takes a record out of QUE only by ``Queue.take_out``, which the
Sender's QUE → SND rename excludes); keep sending once the main process is gone (its channel
closed: it exits at once, and what it was sending is in SND, delivered again at the next start);
import the receiver, the scanner, the console (config.py checks passwords with its auth module) or the
spam engine into the delivery process.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # The delivery process hashes nothing itself (message IDs, DNS query IDs and file names come from
    # os.urandom through secrets; its hmac is never used): hashlib's OpenSSL module would map
    # libcrypto, 3.5 MiB RSS, into a process that speaks TLS only with a next hop that offers
    # STARTTLS (ssl, which maps it then, is imported at the first such handshake: client_tls). Set
    # before anything imports hashlib (the process is started with -S: no site module before this).
    sys.modules.setdefault("_hashlib", None)

import argparse
import functools
import logging
import os
import pickle
import socket
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from smtpgw import child_command
from smtpgw.app.channel import (
    Channel, exit_orphaned, flush_log_every, leave, publish_reload, release_heap_every, serve_signals, setup_log,
)
from smtpgw.config import Config, load_snapshot, save_snapshot
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.reports import templates
from smtpgw.spool.ops import removal_refused
from smtpgw.spool.queue import MAX_PROCESSES, QUE, SND, Committer, Envelope, Queue, RecipientState, set_process
from smtpgw.spool.store import Store
from smtpgw.stats import Stats

if TYPE_CHECKING:
    import ssl

    from smtpgw.console.traffic import Traffic

log = logging.getLogger("smtpgw")

CONFIG_NAME = ".delivery-config"  # in QueuePath: the configuration the main process accepted (pickled)
INDEX = MAX_PROCESSES - 1  # the last character of the IDs it makes (DSNs): above any incoming process's
CHUNK = 500  # queue IDs or entries per packet
REPORT_INTERVAL = 1.0  # seconds: counters and registries reported at least this often
KEEP_FREE = 64  # recycled files it keeps for its own record writes; the rest go to the main process
ASK_TIMEOUT = 2.0  # seconds .c_memory waits for the delivery process's registries
STOP_GRACE = 5.0  # seconds deliveries in flight have to end at stop (as the single process's SHUTDOWN_GRACE)
LOG_FLUSH_INTERVAL = 0.2
GAUGE = "mta_outgoing_connections_current"  # a counter of the process's life, taken back when it ends


def config_path(queue_root: str) -> str:
    return os.path.join(queue_root, CONFIG_NAME)


@functools.cache
def client_tls() -> ssl.SSLContext:
    """The outbound STARTTLS context: opportunistic TLS (RFC 7435), encrypt when offered, do not
    authenticate. Made (and ssl imported: libssl and libcrypto, 4 MiB RSS) when a next hop first
    offers STARTTLS (deliver/client.py calls it then), once per process."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def archive_copy(queue: Queue, archive: Store, env: Envelope, status: str) -> Callable[[], None]:
    """(run in an I/O thread) A copy of ``env``'s message as it is read (``Queue.open_message``:
    with the header a scan put in its record) into ``archive``."""
    record = env.as_dict(spool=False)

    def put() -> None:
        with queue.open_message(env) as message:
            archive.put(env.id, message, record, status)
    return put


def remove_delivered(queue: Queue, committer: Committer, archive: Store | None, env: Envelope) -> None:
    """Every recipient of ``env`` (in SND) is final: a copy into OutgoingArchivePath when one was
    sent (kmg-spec §3.9: every message sent, notifications and DSNs included), then the record
    and the message unlinked, in an I/O thread."""
    copy = None
    if archive is not None and any(r.state == RecipientState.SENT for r in env.recipients):
        copy = archive_copy(queue, archive, env, "SNT")
    committer.remove(env.id, SND, before=copy)


# -- the main process's side -------------------------------------------------------------------
class Master(Protocol):
    """What ``Delivery`` needs from the gateway process (app/gateway.Gateway)."""

    cfg: Config
    loop: EventLoop
    queue: Queue
    stats: Stats
    traffic: "Traffic"
    stopping: bool


class Delivery:
    """The delivery process as the main process sees it: in the gateway's place of the Sender
    (``enqueue``, ``forget``, ``send_now``, ``send_all``, ``switch``, ``registries``)."""

    def __init__(self, master: Master) -> None:
        from smtpgw.app.supervise import Supervised  # here: the main process's side only (subprocess)

        self.master = master
        self.process = Supervised(master, "delivery process", self._command, self._message, self._lost,
                                  on_spawned=self._spawned, called="the delivery process")
        self.enabled = True
        self.due: list[list[Any]] = []  # [id, when, priority] not yet sent
        self.sending = False
        self.gauge = 0  # the process's share of mta_outgoing_connections_current
        self.figures: dict[str, int] = {}  # its registries as last reported
        self.asked: list[Callable[[], None]] = []  # what waits for its registries as they are now

    # -- start, restart ----------------------------------------------------------------
    def start(self) -> None:
        """Started after the listeners are bound and the privileges dropped (gateway start)."""
        save_snapshot(config_path(self.master.queue.root), self.master.cfg)
        self.process.start()
        self.master.loop.call_later(REPORT_INTERVAL, self._check_alive)

    def _check_alive(self) -> None:
        """It sends a packet at least every REPORT_INTERVAL; one silent for DeliveryProcessTimeout
        is killed and started again (Supervised.check_alive)."""
        if self.master.stopping:
            return
        self.process.check_alive(self.master.cfg.timeouts.DeliveryProcessTimeout, "DeliveryProcessTimeout")
        self.master.loop.call_later(REPORT_INTERVAL, self._check_alive)

    def _command(self, channel: int) -> list[str]:
        return child_command("smtpgw.app.delivery", "--queue", self.master.queue.root,
                             "--channel", str(channel)) + ([] if self.enabled else ["--sending-off"])

    def _spawned(self) -> None:
        self.due.clear()  # the new process takes every record in QUE itself

    def _message(self, message: dict[str, Any]) -> None:
        if message.get("ready"):
            assert self.process.proc is not None
            resumed = message.get("resumed", 0)
            log.info("delivery process started, pid=%d%s", self.process.proc.pid,
                     f", {resumed} message(s) it was sending queued again" if resumed else "")
        for name, amount in message.get("stats", {}).items():
            self.master.stats.inc(name, amount)
            if name == GAUGE:
                self.gauge += amount
        for seconds, group in message.get("done", ()):
            self.master.traffic.delivered_after(seconds, group or None)
        if message.get("free"):
            self.master.queue.adopt_free(message["free"])
        if message.get("free_small"):
            self.master.queue.adopt_free(message["free_small"], small=True)
        if "registries" in message:
            self.figures = message["registries"]
        if message.get("answer"):
            self._answered()

    def _lost(self) -> None:
        """Its channel closed: the process ended (or is ending); its connections with it."""
        self.master.stats.inc(GAUGE, -self.gauge)
        self.gauge = 0
        self.figures = {}

    # -- the Sender's place -----------------------------------------------------------------
    def enqueue(self, qid: str, when: float = 0.0, priority: int = 0, env: Envelope | None = None) -> None:
        """A record in QUE, to be scheduled by the delivery process (which reads it itself);
        sent in one packet with the others of this turn of the loop."""
        self.due.append([qid, when, priority])
        if not self.sending:
            self.sending = True
            self.master.loop.call_soon(self._send_due)

    def _send_due(self) -> None:
        self.sending = False
        due, self.due = self.due, []
        for start in range(0, len(due), CHUNK):
            self._send({"q": due[start:start + CHUNK]})

    def _send(self, message: dict[str, Any]) -> None:
        """A packet now; with no process running nothing is lost: the next one takes all of QUE."""
        self.process.send(message)

    def forget(self, qid: str) -> None:
        self._send({"forget": qid})

    def take_out(self, qid: str) -> str | None:
        """``queue remove`` of a record in QUE: removed unless the delivery process took it into
        SND meanwhile (then it is refused as a message in SND is: being delivered)."""
        if not self.master.queue.take_out(qid, QUE):
            return removal_refused(qid, SND)
        self.forget(qid)
        return None

    def send_now(self, qid: str) -> bool:
        self._send_due()  # a record just handed over is scheduled first
        self._send({"send": qid})
        return True

    def send_all(self) -> int:
        """``queue send-all``: every record in QUE is due now; how many there are."""
        self._send_due()
        self._send({"send_all": True})
        return len(self.master.queue.ids(QUE))

    def switch(self, on: bool) -> None:
        self.enabled = on
        self._send({"sending": on})

    def registries(self) -> dict[str, int]:
        return dict(self.figures)

    def ask_registries(self, then: Callable[[], None]) -> None:
        """``then`` runs once the process has reported its registries as they are now (after
        everything handed to it so far), or after ASK_TIMEOUT without an answer (the last ones)."""
        self.asked.append(then)
        if self.process.channel is None:
            self._answered()
            return
        self._send_due()
        self._send({"registries": True})
        self.master.loop.call_later(ASK_TIMEOUT, self._answered)

    def _answered(self) -> None:
        asked, self.asked = self.asked, []
        for then in asked:
            then()

    def pids(self) -> list[int]:
        return [self.process.proc.pid] if self.process.proc is not None else []

    # -- reload, stop -----------------------------------------------------------------------
    def reload(self, cfg: Config) -> None:
        """HUP accepted by the main process: the same configuration, and a reopened log, there."""
        if publish_reload(config_path(self.master.queue.root), cfg, "delivery process"):
            self._send({"reload": True})

    def stop(self) -> None:
        """Deliveries in flight end (STOP_GRACE at most), then it exits; killed if it does not."""
        self._send_due()
        self._send({"stop": True})
        self.master.loop.run_until(lambda: self.process.proc is None, STOP_GRACE + 2)
        self.process.kill_unstopped()


# -- the delivery process ------------------------------------------------------------------
class DeliveryProcess:
    """The Sender stage in a process of its own; provides deliver/sender.Outbound."""

    def __init__(self, cfg: Config, queue_root: str, channel: socket.socket, sending: bool) -> None:
        from smtpgw.deliver.sender import Sender  # here: not in the main process, which imports this module

        self.cfg = cfg
        self.loop = EventLoop()
        self.stats = Stats()  # deltas since the last report
        self.stats.counters.clear()
        self.queue = Queue(queue_root)
        self.committer = Committer(self.queue, self.loop.call_soon_threadsafe)
        self.client_tls: Callable[[], ssl.SSLContext] | None = client_tls
        self.resolver = Resolver.from_config(self.loop, cfg.resolve)
        self.templates = templates.load_templates(cfg.base.TemplatesPath)
        self.archive = Store(cfg.path.OutgoingArchivePath) if cfg.path.OutgoingArchivePath else None
        self.sender: Sender = Sender(self)
        self.sender.enabled = sending
        self.done: list[list[Any]] = []
        self.reporting = False
        self.stopping = False
        self.channel = Channel(self.loop, channel, self._message, self._master_gone)

    def run(self) -> None:
        serve_signals(self.loop, self.stop)
        resumed = self.resume()
        self.sender.start()
        self.channel.send({"ready": True, "resumed": resumed, "registries": self.sender.registries()})
        self.loop.call_later(REPORT_INTERVAL, self._report_figures)
        self.loop.call_later(LOG_FLUSH_INTERVAL, flush_log_every, self.loop, LOG_FLUSH_INTERVAL)
        self.loop.call_soon(release_heap_every, self.loop)  # what the start-up freed (the snapshot, imports), then each minute
        self.loop.run_forever()

    def resume(self) -> int:
        """What a delivery process that ended was sending goes back to QUE, to be sent again
        (as ``Queue.recover`` does at the gateway's start: delivered but not yet unlinked is
        delivered again, never lost). Only a delivery process moves records into SND, and
        there is one at a time."""
        resumed = 0
        for qid in self.queue.ids(SND):
            try:
                self.queue.move(qid, SND, QUE)
                resumed += 1
            except FileNotFoundError:
                pass
        return resumed

    # -- Outbound ---------------------------------------------------------------------------
    def delivery_complete(self, env: Envelope) -> None:
        self.done.append([round(time.time() - env.received_at, 6), env.group or ""])
        remove_delivered(self.queue, self.committer, self.archive, env)
        self._report_soon()

    # -- the channel ---------------------------------------------------------------------
    def _message(self, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        for qid, when, priority in message.get("q", ()):
            self.sender.enqueue(qid, when, priority)
        if "forget" in message:
            self.sender.forget(message["forget"])
        if "send" in message:
            self.sender.send_now(message["send"])
        if message.get("send_all"):
            self.sender.send_all()
        if "sending" in message:
            self.sender.switch(bool(message["sending"]))
        if message.get("registries"):
            self._send_report(figures=True, answer=True)
        if message.get("reload"):
            self.reload()
        if message.get("stop"):
            self.stop()

    def _report_soon(self) -> None:
        if not self.reporting:
            self.reporting = True
            self.loop.call_soon(self._send_report)

    def _send_report(self, figures: bool = False, answer: bool = False) -> None:
        self.reporting = False
        done, self.done = self.done, []
        deltas = {name: value for name, value in self.stats.counters.items() if value}
        self.stats.counters.clear()
        free = self.queue.spare_free(KEEP_FREE // 2)
        free_small = self.queue.spare_free(KEEP_FREE // 2, small=True)
        for start in range(0, max(len(done), len(free), len(free_small), 1), CHUNK):
            packet: dict[str, Any] = {}
            if done[start:start + CHUNK]:
                packet["done"] = done[start:start + CHUNK]
            if free[start:start + CHUNK]:
                packet["free"] = free[start:start + CHUNK]
            if free_small[start:start + CHUNK]:
                packet["free_small"] = free_small[start:start + CHUNK]
            if start == 0:
                if deltas:
                    packet["stats"] = deltas
                if figures:
                    packet["registries"] = self.sender.registries()
                if answer:
                    packet["answer"] = True
            if packet:
                self.channel.send(packet)

    def _report_figures(self) -> None:
        self._send_report(figures=True)
        self.loop.call_later(REPORT_INTERVAL, self._report_figures)

    # -- reload, stop -------------------------------------------------------------------
    def reload(self) -> None:
        """The configuration the main process accepted (ForwardRoute, limits, timeouts: the
        Sender reads them at each use), a new resolver, and the log reopened (rotation)."""
        try:
            cfg = load_snapshot(config_path(self.queue.root))
            setup_log(cfg)
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            log.error("the delivery process keeps its configuration: %s", exc)
            return
        self.cfg = cfg
        self.resolver.close()
        self.resolver = Resolver.from_config(self.loop, cfg.resolve)

    def stop(self) -> None:
        """Deliveries in flight end (STOP_GRACE at most: what is left stays in SND for the next
        start), connections close, the last counters go to the main process; then exit."""
        if self.stopping:
            return
        self.stopping = True
        self.sender.enabled = False
        self.loop.run_until(self.sender.idle, STOP_GRACE)
        self.sender.stop()
        self.loop.run_until(lambda: not self.sender.total_connections, 1.0)
        self.committer.close()
        self._send_report()
        leave(self.loop, self.channel, STOP_GRACE)

    def _master_gone(self) -> None:
        """The main process is gone (killed): exit at once, sending nothing more. What was being
        sent is in SND, queued again and sent by the next gateway."""
        if self.stopping:
            return
        exit_orphaned("delivery process")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smtpgw.app.delivery", description="the delivery process (DeliveryProcess)")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--sending-off", action="store_true", help="sending switched off (.c_send_off)")
    args = parser.parse_args(argv)
    set_process(INDEX)
    channel = socket.socket(fileno=args.channel)
    cfg = load_snapshot(config_path(args.queue))
    setup_log(cfg)
    DeliveryProcess(cfg, args.queue, channel, not args.sending_off).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
