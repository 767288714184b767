"""The Sender: delivers QUE messages to their next hops over SMTP.

Owns: taking records from QUE (→ SND while in flight), grouping recipients by
destination (``ForwardRoute``, else the recipient domain's MX), a connection
cache per destination with ``OutgoingSessions`` and
``MaximalOutgoingSessionsPerHost`` limits, turning replies into per-recipient
states, the DSNs due after each attempt (queued by ``deliver/bounces.py`` and
scheduled here), retry scheduling with exponential back-off between
``MinimalBackoffTime`` and ``MaximalBackoffTime``, and giving up after
``MaximalQueueLifetime``.

Must never: send one envelope once per recipient when one transaction per
destination will do; drop a recipient without a final state; write a record's
new state anywhere but in place before moving it (a crash must not make a
delivered recipient look pending, nor the reverse); fsync on the loop (a next
hop that is down would stall it with one record write per queued message).
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from smtpgw.config import Config
from smtpgw.deliver import bounces, nexthop
from smtpgw.deliver.client import Connection, Transaction
from smtpgw.deliver.nexthop import Hop, Resolve
from smtpgw.log import event
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.net.smtp import ServerReply
from smtpgw.reports.templates import Template
from smtpgw.rules import routing
from smtpgw.spool.queue import QUE, SND, Committer, Envelope, MessageFile, Queue, Recipient, RecipientState
from smtpgw.stats import Stats

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("smtpgw.deliver.sender")

IDLE_CONNECTION_SECONDS = 2.0  # as Postfix's smtp_connection_cache_time_limit
RETRY_LOCAL_ERROR = 60  # seconds before a state the disk refused is written again
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")

Destination = routing.Destination


@dataclass
class Delivery:
    """The recipients of one envelope that go to one destination."""

    env: Envelope
    dest: Destination
    recipients: list[Recipient]
    converted: str | None = None  # a 7-bit copy made for this delivery (RFC 6152 §3)


@dataclass
class DestinationState:
    queue: deque[Delivery] = field(default_factory=deque)
    connections: list[Connection] = field(default_factory=list)
    hops: list[Hop] | None = None
    resolving: bool = False
    last_error: str | None = None
    # hops that could not be reached since the deliveries queued here were last deferred: each
    # is tried once per round even when UnreachableTTL=0 caches nothing
    failed_hops: set[tuple[str, int]] = field(default_factory=set)
    idle_timers: dict[int, object] = field(default_factory=dict)


def enhanced_status(reply: ServerReply) -> str:
    """The reply's enhanced status code (RFC 3463), or one derived from its basic code."""
    match = _ENHANCED.match(reply.lines[0] if reply.lines else "")
    if match and match.group(1) == str(reply.code)[0]:
        return match.group(0)
    return f"{str(reply.code)[0]}.0.0"


class Outbound(Protocol):
    """What the Sender needs from the process it runs in: the configuration in force, the loop,
    the spool and its I/O threads, the counters, the client TLS context (made when a next hop
    first offers STARTTLS), the resolver (for the
    default next-hop resolution), the DSN template, and where a finished message goes."""

    cfg: Config
    loop: EventLoop
    queue: Queue
    stats: Stats
    committer: Committer
    client_tls: Callable[[], ssl.SSLContext] | None  # the STARTTLS context, made at its first use
    resolver: Resolver
    templates: dict[str, Template]

    def delivery_complete(self, env: Envelope) -> None:
        """Every recipient of ``env`` (in SND) has its final state: archive and unlink it."""


class Sender:
    def __init__(self, host: Outbound, resolve: Resolve | None = None) -> None:
        self.host = host
        self.loop = host.loop
        self.queue = host.queue
        # next hops of a destination: by default through the resolver in use at each call
        self.resolve: Resolve = resolve or nexthop.through(lambda: host.resolver)
        self.enabled = True
        self.schedule: list[tuple[float, int, str]] = []  # (when, -priority, qid)
        self.scheduled: set[str] = set()
        self.inflight: dict[str, int] = {}  # qid → deliveries still running
        self.concluding: set[str] = set()  # attempts being written by an I/O thread (``_finish``)
        self.envelopes: dict[str, Envelope] = {}
        self.dests: dict[Destination, DestinationState] = {}
        self.total_connections = 0
        self.unreachable: dict[tuple[str, int], float] = {}
        self._pump_due = False
        self._timer = None

    # -- scheduling ---------------------------------------------------------------
    def start(self) -> None:
        """At start-up (the gateway's, or a delivery process's): every QUE record scheduled,
        and the unreachable hosts' cache purged from now on."""
        self.load()
        self.purge_unreachable()

    def purge_unreachable(self) -> None:
        """``UnreachableCacheRefreshPeriod``: expired entries are ignored at once, dropped here."""
        now = time.time()
        self.unreachable = {k: until for k, until in self.unreachable.items() if until > now}
        self.loop.call_later(self.host.cfg.resolve.UnreachableCacheRefreshPeriod, self.purge_unreachable)

    def load(self) -> None:
        """Schedule every QUE record found at start-up."""
        for qid in self.queue.ids(QUE):
            env = self.queue.load(QUE, qid)
            if env is not None:
                self.enqueue(qid, env.next_attempt, env.priority)

    def enqueue(self, qid: str, when: float = 0.0, priority: int = 0, env: Envelope | None = None) -> None:
        """Schedule a QUE record; ``env`` is its current content when the caller has it."""
        if qid in self.scheduled or qid in self.inflight or qid in self.concluding:
            return
        self.scheduled.add(qid)
        # kept only for a record due now, and up to MaximalEnvelopesInMemory: the others are
        # read from QUE when their turn comes (a deferred queue does not live in memory)
        if env is not None and when <= time.time() and len(self.envelopes) < self.host.cfg.limits.MaximalEnvelopesInMemory:
            self.envelopes[qid] = env
        heapq.heappush(self.schedule, (when, -priority, qid))
        self.kick()

    def send_now(self, qid: str) -> bool:
        """``queue send ID``: deliver this one ahead of the rest, ignoring its back-off."""
        if qid in self.inflight or qid in self.concluding:
            return True
        self.unreachable.clear()  # the admin asks for an attempt now: no cached verdicts
        self.scheduled.discard(qid)
        self.schedule = [item for item in self.schedule if item[2] != qid]
        heapq.heapify(self.schedule)
        self.enqueue(qid, 0.0, priority=1)
        return True

    def send_all(self) -> int:
        items = [qid for _, _, qid in self.schedule]
        self.unreachable.clear()
        self.schedule = [(0.0, p, q) for _, p, q in self.schedule]  # p is already -priority
        heapq.heapify(self.schedule)
        self.kick()
        return len(items)

    def forget(self, qid: str) -> None:
        """A record removed by the admin: stop scheduling it."""
        self.scheduled.discard(qid)
        self.concluding.discard(qid)
        self.envelopes.pop(qid, None)
        self.schedule = [item for item in self.schedule if item[2] != qid]
        heapq.heapify(self.schedule)

    def switch(self, on: bool) -> None:
        """Sending on or off (``.c_send_on``/``.c_send_off``); switched on, it starts at once."""
        self.enabled = on
        if on:
            self.kick()

    def registries(self) -> dict[str, int]:
        """The length of what it keeps per message, destination and hop (the ``.c_memory`` report)."""
        return {
            "sender_schedule": len(self.schedule),
            "sender_envelopes": len(self.envelopes),
            "sender_inflight": len(self.inflight),
            "sender_concluding": len(self.concluding),
            "sender_destinations": len(self.dests),
            "sender_connections": self.total_connections,
            "sender_unreachable": len(self.unreachable),
        }

    def kick(self) -> None:
        if not self._pump_due:
            self._pump_due = True
            self.loop.call_soon(self._pump)

    @property
    def max_inflight(self) -> int:
        return self.host.cfg.limits.OutgoingSessions * 8

    @property
    def busy(self) -> int:
        """Messages in flight, their attempts being written included: at most ``max_inflight``
        (so a queue deferred at once waits in QUE, not in the I/O threads ahead of new mail)."""
        return len(self.inflight) + len(self.concluding)

    def _pump(self) -> None:
        self._pump_due = False
        if not self.enabled:
            return
        now = time.time()
        while self.schedule and self.busy < self.max_inflight:
            when, _, qid = self.schedule[0]
            if when > now:
                break
            heapq.heappop(self.schedule)
            self.scheduled.discard(qid)
            self._start(qid)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.schedule and self.busy < self.max_inflight:
            self._timer = self.loop.call_later(max(0.05, self.schedule[0][0] - now), self.kick)
        for dest in list(self.dests):
            self._serve(dest)

    # -- one envelope ---------------------------------------------------------------
    def _start(self, qid: str) -> None:
        env = self.envelopes.get(qid) or self.queue.load(QUE, qid)
        if env is None:
            return
        try:
            self.queue.move(qid, QUE, SND)
        except FileNotFoundError:  # removed meanwhile by another process (``Queue.take_out``)
            self.envelopes.pop(qid, None)
            return
        pending = env.pending()
        if self._expired(env):
            self._finish(env)
            return
        routes = self.host.cfg.forward.ForwardRoute
        by_dest = routing.group_by_route(routes, [r.addr for r in pending])
        lookup = {r.addr: r for r in pending}
        self.envelopes[qid] = env
        self.inflight[qid] = len(by_dest)
        for dest, addrs in by_dest.items():
            delivery = Delivery(env, dest, [lookup[a] for a in addrs])
            self.dests.setdefault(dest, DestinationState()).queue.append(delivery)
        if not by_dest:
            self.inflight.pop(qid)
            self._finish(env)

    def _expired(self, env: Envelope) -> bool:
        """RFC 5321 §4.5.4.1: give up after MaximalQueueLifetime; recipients fail with 4.4.7."""
        lifetime = self.host.cfg.timeouts.MaximalQueueLifetime * 86400
        if time.time() - env.received_at < lifetime:
            return False
        for rcpt in env.pending():
            rcpt.state = RecipientState.FAILED
            rcpt.status = "4.4.7"
            rcpt.diag = rcpt.diag or "x-smtpgw; delivery time expired"
            event(env.id, "DELIVERED, rcpt=<%s>, server=none, size=%d, status=failed, reason=\"queue lifetime expired\"", rcpt.addr, env.size)
        return True

    # -- destinations and connections ---------------------------------------------------
    def _serve(self, dest: Destination) -> None:
        state = self.dests[dest]
        if not state.queue:
            if not state.connections:
                del self.dests[dest]
            return
        for conn in state.connections:
            if conn.greeted and not conn.busy and not conn.closed and state.queue:
                self._use(conn, state)
        if not state.queue:
            return
        if state.hops is None:
            self._resolve(dest, state)
            return
        per_host = self.host.cfg.limits.MaximalOutgoingSessionsPerHost
        wanted = min(len(state.queue), per_host) - sum(1 for c in state.connections if not c.greeted)
        while wanted > 0 and len(state.connections) < per_host and self._free_slot():
            hop = self._pick_hop(state)
            if hop is None:
                why = f"no next hop reachable ({state.last_error})" if state.last_error else "no next hop reachable"
                self._defer_all(state, "4.4.1", why)
                return
            self._open(dest, state, hop)
            wanted -= 1

    def _free_slot(self) -> bool:
        if self.total_connections < self.host.cfg.limits.OutgoingSessions:
            return True
        for state in self.dests.values():  # close an idle connection elsewhere
            for conn in state.connections:
                if conn.greeted and not conn.busy and not state.queue:
                    conn.quit()
                    return False
        return False

    def _pick_hop(self, state: DestinationState) -> Hop | None:
        """The first hop, in the order resolved, not known to be down.

        RFC 5321 §5.1: next hops are tried in preference order (equal preferences are already
        shuffled by the lookup); every connection, not just the first, goes to the most preferred
        reachable one, never to a backup MX while the primary answers.
        """
        assert state.hops is not None
        now = time.time()
        for hop in state.hops:
            key = (hop.ip, hop.port)
            if key not in state.failed_hops and self.unreachable.get(key, 0) <= now:
                return hop
        return None

    def _resolve(self, dest: Destination, state: DestinationState) -> None:
        if state.resolving:
            return
        state.resolving = True

        def done(hops: list[Hop], permanent: str | None, temporary: str | None) -> None:
            state.resolving = False
            if permanent or temporary or not hops:
                why = permanent or temporary or "4.4.3 no next hop"
                status, _, text = why.partition(" ")
                if not _ENHANCED.match(status):  # the lookup's errors start with an enhanced code
                    status, text = ("5.1.2" if permanent else "4.4.3"), why
                self._defer_all(state, status, text, permanent=bool(permanent))
                return
            state.hops = hops
            self._serve(dest)

        self.resolve(dest, done)

    def _open(self, dest: Destination, state: DestinationState, hop: Hop) -> None:
        conn = Connection(
            self.loop, hop.host, hop.ip, hop.port, self.host.cfg.network.Hostname, self.host.cfg.timeouts,
            on_ready=lambda c: self._ready(dest, c),
            on_done=lambda c, txn: self._done(dest, c, txn),
            on_closed=lambda c, why: self._closed(dest, c, why),
            tls_context=self.host.client_tls,
        )
        state.connections.append(conn)
        self.total_connections += 1
        self.host.stats.inc("mta_outgoing_connections_total")
        self.host.stats.inc("mta_outgoing_connections_current")
        conn.connect()

    def _ready(self, dest: Destination, conn: Connection) -> None:
        state = self.dests.get(dest)
        if state is None or not state.queue or not self.enabled:
            self._park(dest, conn)
            return
        self._use(conn, state)

    def _park(self, dest: Destination, conn: Connection) -> None:
        """Keep an idle connection for a short while for the next message (connection cache)."""
        state = self.dests.get(dest)
        if state is None:
            conn.quit()
            return

        def expire() -> None:
            if not conn.busy and not conn.closed:
                conn.quit()

        state.idle_timers[id(conn)] = self.loop.call_later(IDLE_CONNECTION_SECONDS, expire)

    def _use(self, conn: Connection, state: DestinationState) -> None:
        timer = state.idle_timers.pop(id(conn), None)
        if timer is not None:
            timer.cancel()  # type: ignore[attr-defined]
        while state.queue:
            delivery = state.queue.popleft()
            refusal = self._refuse_before_sending(conn, delivery)
            if refusal is None:
                env = delivery.env
                if env.body == "8BITMIME" and not conn.has("8BITMIME"):
                    self._downgrade_then_send(conn, state, delivery)
                else:
                    self._send(conn, delivery, lambda: self.queue.open_message(env), env.size, env.body)
                return
            self._fail_delivery(conn, delivery, *refusal)
        self._park(self._dest_of(state), conn)

    def _send(self, conn: Connection, delivery: Delivery, message: Callable[[], MessageFile], size: int,
              body: str) -> None:
        """Send what ``message`` opens: the queued message (``Queue.open_message``) or its 7-bit copy."""
        env = delivery.env
        conn.delivery = delivery  # type: ignore[attr-defined]  # before start: it may end at once
        conn.start(Transaction(sender=env.sender, recipients=delivery.recipients, message=message, size=size,
                               body=body, ret=env.ret, envid=env.envid))

    def _fail_delivery(self, conn: Connection, delivery: Delivery, status: str, why: str, counter: str) -> None:
        self.host.stats.inc(counter)
        for rcpt in delivery.recipients:
            self._record(delivery.env, rcpt, RecipientState.FAILED, status, f"x-smtpgw; {why}", conn.host, conn.ip)
        self._delivery_finished(delivery)

    def _downgrade_then_send(self, conn: Connection, state: DestinationState, delivery: Delivery) -> None:
        """RFC 6152 §3: an 8-bit message for a peer without 8BITMIME is converted to 7-bit MIME
        (off the loop), or fails with 5.6.3 when it cannot be converted without changing it."""
        conn.busy = True
        env = delivery.env
        source = self.queue.msg_path(env.id)
        # One copy per delivery: deliveries of one message to several destinations convert at once,
        # and one must neither truncate nor unlink the copy another is streaming. No record of its
        # own: removed at the next start if left over.
        target = f"{source}.7bit-{secrets.token_hex(4)}"

        def convert() -> int | None:
            from smtpgw.mail import downgrade  # here: the MIME rewriting only for the peers that need it

            converted = downgrade.to_7bit(self.queue.read_message(env))
            if converted is None:
                return None
            with open(target, "wb") as f:
                f.write(converted)
            return len(converted)

        def converted(size: int | None, error: BaseException | None) -> None:
            conn.busy = False
            if size is not None:
                delivery.converted = target  # removed when the delivery ends
            if error is not None or conn.closed:
                why = f"local error converting to 7-bit: {error}" if error else f"connection to {conn.host} lost"
                for rcpt in delivery.recipients:
                    self._record(delivery.env, rcpt, RecipientState.DEFERRED, "4.3.0" if error else "4.4.2",
                                 f"x-smtpgw; {why}", conn.host, conn.ip)
                self._delivery_finished(delivery)
            elif size is None:
                why = f"{conn.host} does not accept 8-bit data (no 8BITMIME) and the message cannot be converted"
                self._fail_delivery(conn, delivery, "5.6.3", why, "mta_sendings_failed_for_8bitmime")
            else:
                self._send(conn, delivery, lambda: MessageFile(target), size, "7BIT")
                return
            if not conn.closed:
                self._use(conn, state)

        self.host.committer.call(convert, converted, alone=True)  # the whole message is read

    def _dest_of(self, state: DestinationState) -> Destination:
        return next(d for d, s in self.dests.items() if s is state)

    def _refuse_before_sending(self, conn: Connection, delivery: Delivery) -> tuple[str, str, str] | None:
        """What the peer's capabilities say cannot be sent (RFC 1870 §6, RFC 6152 §3)."""
        env = delivery.env
        limit = conn.max_size
        if limit is not None and env.size > limit:
            return "5.3.4", f"message size {env.size} exceeds the limit {limit} of {conn.host}", "mta_sendings_failed_for_message_size_limit"
        return None

    def _done(self, dest: Destination, conn: Connection, txn: Transaction) -> None:
        delivery: Delivery = conn.delivery  # type: ignore[attr-defined]
        env = delivery.env
        for rcpt in delivery.recipients:
            state, status, diag = self._outcome(txn, rcpt.addr)
            self._record(env, rcpt, state, status, diag, conn.host, conn.ip)
            # RFC 3461 §5.2.2: a peer without DSN gets no NOTIFY; we report "relayed"
            rcpt.relayed = state == RecipientState.SENT and not conn.has("DSN")
        if txn.error and not conn.greeted:
            self._unreachable(conn)
        self._delivery_finished(delivery)

    @staticmethod
    def _outcome(txn: Transaction, addr: str) -> tuple[RecipientState, str, str]:
        """A recipient's state after a transaction: sent | failed | deferred, with status and diagnostic."""
        def classify(reply: ServerReply) -> tuple[RecipientState, str, str]:
            state = RecipientState.FAILED if reply.code >= 500 else RecipientState.DEFERRED
            return state, enhanced_status(reply), f"smtp; {reply}"

        if txn.mail_reply is not None and txn.mail_reply.code >= 400:
            return classify(txn.mail_reply)
        rcpt_reply = txn.rcpt_replies.get(addr)
        if rcpt_reply is not None and rcpt_reply.code >= 400:
            return classify(rcpt_reply)
        if rcpt_reply is not None and txn.data_reply is not None:
            if txn.data_reply.code < 300:
                return RecipientState.SENT, enhanced_status(txn.data_reply), f"smtp; {txn.data_reply}"
            return classify(txn.data_reply)
        why = txn.error or "connection lost before the end of the transaction"
        return RecipientState.DEFERRED, "4.4.2" if "timeout" in why else "4.4.1", f"x-smtpgw; {why}"

    def _record(self, env: Envelope, rcpt: Recipient, state: RecipientState, status: str, diag: str, host: str, ip: str,
                reached: bool = True) -> None:
        """``reached``: ``host`` is a next hop we talked to, the DSN's Remote-MTA (RFC 3464 §2.3.5)."""
        rcpt.state = state
        rcpt.status = status
        rcpt.diag = diag
        rcpt.remote_mta = host if reached else None
        rcpt.attempts += 1
        rcpt.last_attempt = time.time()
        event(
            env.id, "DELIVERED, rcpt=<%s>, server=%s[%s], size=%d, status=%s, dsn=%s, reply=\"%s\"",
            rcpt.addr, host, ip, env.size, state, status, diag[:300],
        )
        if state == RecipientState.SENT:
            self.host.stats.inc("mta_sent_recipients")
        elif state == RecipientState.FAILED:
            self.host.stats.inc("mta_sendings_failed_total")
        else:
            self.host.stats.inc("mta_sendings_deferred_total")

    def _defer_all(self, state: DestinationState, status: str, why: str, permanent: bool = False) -> None:
        while state.queue:
            delivery = state.queue.popleft()
            for rcpt in delivery.recipients:
                self._record(delivery.env, rcpt, RecipientState.FAILED if permanent else RecipientState.DEFERRED, status, f"x-smtpgw; {why}",
                             "none", "-", reached=False)
            self._delivery_finished(delivery)
        state.hops = None  # resolve again next time
        state.failed_hops.clear()  # and try every hop again

    def _closed(self, dest: Destination, conn: Connection, why: str | None) -> None:
        self.total_connections -= 1
        self.host.stats.inc("mta_outgoing_connections_current", -1)
        if why and not conn.greeted:
            self.host.stats.inc("mta_outgoing_connections_errors")
            self._unreachable(conn)
        state = self.dests.get(dest)
        if state is not None:
            if why and not conn.greeted:
                state.failed_hops.add((conn.ip, conn.port))
            if why:
                state.last_error = why
            state.idle_timers.pop(id(conn), None)
            if conn in state.connections:
                state.connections.remove(conn)
        self.kick()

    def _unreachable(self, conn: Connection) -> None:
        """Remember the hop as down for UnreachableTTL; at most UnreachableCacheSize hops are
        remembered, the one remembered longest ago is forgotten first (dicts keep insertion order)."""
        resolve = self.host.cfg.resolve
        key = (conn.ip, conn.port)
        self.unreachable.pop(key, None)
        if resolve.UnreachableTTL <= 0 or resolve.UnreachableCacheSize <= 0:
            return
        self.unreachable[key] = time.time() + resolve.UnreachableTTL
        while len(self.unreachable) > resolve.UnreachableCacheSize:
            del self.unreachable[next(iter(self.unreachable))]

    def _delivery_finished(self, delivery: Delivery) -> None:
        if delivery.converted:
            converted, delivery.converted = delivery.converted, None
            self.host.committer.run(lambda: os.unlink(converted))
        qid = delivery.env.id
        left = self.inflight.get(qid, 1) - 1
        if left > 0:
            self.inflight[qid] = left
            return
        self.inflight.pop(qid, None)
        self.envelopes.pop(qid, None)
        self._finish(delivery.env)
        self.kick()

    def _due_reports(self, env: Envelope) -> list[tuple[str, list[Recipient]]]:
        """The DSNs due after this attempt (RFC 3461 §4.1): each kind with the recipients not yet
        reported in it (``env.notes["dsn"]``, kept in the record: each is reported once)."""
        reported: dict[str, list[str]] = env.notes.get("dsn", {})
        due = {
            "failure": [r for r in env.recipients if r.state == RecipientState.FAILED],
            "delay": [r for r in env.recipients if r.state == RecipientState.DEFERRED and r.notify and "DELAY" in r.notify],
            # a next hop with DSN reports success itself; we report only what we "relayed"
            "success": [r for r in env.recipients if r.state == RecipientState.SENT and r.relayed and r.notify and "SUCCESS" in r.notify],
        }
        fresh = {kind: [r for r in rcpts if r.addr not in reported.get(kind, [])] for kind, rcpts in due.items()}
        return [(kind, rcpts) for kind, rcpts in fresh.items() if rcpts]

    def _finish(self, env: Envelope) -> None:
        """All deliveries of this attempt are over: the recipients still pending are deferred, and
        the attempt goes to disk in an I/O thread — never on the loop, which a next hop that is
        down would otherwise stall for one record write per queued message (``_write_attempt``).
        An attempt that leaves every recipient final with no DSN due writes nothing (the record
        and message are removed next): it is concluded on the loop, without an I/O thread's turn."""
        self._expired(env)  # past MaximalQueueLifetime, deferred recipients fail now
        for rcpt in env.pending():
            rcpt.state = RecipientState.DEFERRED
        done = all(r.done for r in env.recipients)
        if not done:
            attempts = max((r.attempts for r in env.pending()), default=1)
            t = self.host.cfg.timeouts
            delay = min(t.MaximalBackoffTime, t.MinimalBackoffTime * 2 ** max(0, attempts - 1))
            env.next_attempt = time.time() + delay
            env.priority = 0
        due = self._due_reports(env)
        self.concluding.add(env.id)
        if done and not due:  # nothing to write (the record and message are removed after): no I/O thread
            self.loop.call_soon(self._attempt_written, env, done, ([], None), None)
            return
        self.host.committer.call(lambda: self._write_attempt(env, due, done),
                                 lambda written, error: self._attempt_written(env, done, written, error))

    def _write_attempt(self, env: Envelope, due: list[tuple[str, list[Recipient]]],
                       done: bool) -> tuple[list[Envelope], OSError | None]:
        """In an I/O thread (the loop does not touch ``env`` meanwhile): the DSNs due, each in QUE
        and marked reported in the record before the record is written; then, unless every
        recipient is done, the record in place in SND and moved back to QUE. Answers the DSNs
        made and the disk error that stopped it, if any (what was made is scheduled either way)."""
        made: list[Envelope] = []
        try:
            for kind, recipients in due:
                bounce = bounces.queue_dsn(self.queue, self.host.cfg, self.host.templates["dsn"], env, recipients, kind)
                if bounce is not None:
                    made.append(bounce)
                env.notes.setdefault("dsn", {}).setdefault(kind, []).extend(r.addr for r in recipients)
            if not done:
                self.queue.update(SND, env)
                self.queue.move(env.id, SND, QUE)
        except OSError as exc:
            return made, exc
        return made, None

    def _attempt_written(self, env: Envelope, done: bool, written: tuple[list[Envelope], OSError | None] | None,
                         error: BaseException | None) -> None:
        made, failure = written if written is not None else ([], error)
        for bounce in made:
            self.host.stats.inc("mta_dsn_generated")
            self.enqueue(bounce.id, env=bounce)
        if failure is not None:  # the disk refused the new state: keep the attempt's results, try again
            log.error("%s: cannot record the delivery attempt: %s; retrying in %ds", env.id, failure, RETRY_LOCAL_ERROR)
            self.loop.call_later(RETRY_LOCAL_ERROR, self._finish, env)
            return
        wanted = env.id in self.concluding  # not if the admin removed it from QUE meanwhile
        self.concluding.discard(env.id)
        if done:
            if any(r.state == RecipientState.SENT for r in env.recipients):
                self.host.stats.inc("mta_sent_messages")
                self.host.stats.inc("mta_sent_bytes", env.size)
            self.host.delivery_complete(env)
        elif wanted:
            self.enqueue(env.id, env.next_attempt, env=env)
        self.kick()

    # -- control -------------------------------------------------------------------------
    def stop(self) -> None:
        for state in self.dests.values():
            for conn in list(state.connections):
                conn.close("shutting down")

    def idle(self) -> bool:
        return not self.inflight and not self.concluding

