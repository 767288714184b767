"""The pipeline stages against tiny fakes of the interfaces they declare, without a gateway.

Each stage is given a small host object with exactly the members of its Protocol
(receive/receiver.Inbound, deliver/sender.Outbound, scan/scanner.Scanning) — a real event
loop, spool, committer and configuration, with the hand-offs recorded — and is driven through
its real interface: the receiver by an SMTP client on a socketpair, the sender and its client
against a real SMTP peer on loopback with a fake next-hop resolver, the scanner with a fake
worker pool whose results the test hands back. Waits are on the loop with deadlines.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, cast

import pytest

from smtpgw.config import Config, load_config
from smtpgw.deliver import nexthop
from smtpgw.deliver import sender as sender_module
from smtpgw.deliver.nexthop import Hop, ResolveCallback
from smtpgw.deliver.sender import Outbound, Sender
from smtpgw.net import smtp
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.receive.quota import Quota
from smtpgw.receive.receiver import Inbound, Session, Sessions
from smtpgw.reports import templates
from smtpgw.rules.routing import Destination
from smtpgw.scan.job import CopyResult
from smtpgw.scan.scanner import Scanner, Scanning
from smtpgw.spool.queue import CHK, QUE, SND, WFC, Committer, Envelope, Queue, Recipient, new_id
from smtpgw.spool.store import Store
from smtpgw.stats import Stats
from tests.support.net import Sink, free_port

MINIMAL = Path(__file__).parent / "data" / "config" / "minimal.conf"
MESSAGE = b"From: a@sender.test\r\nTo: user@example.test\r\nSubject: stages\r\n\r\nbody\r\n"
DEADLINE = 10.0


class Host:
    """The members every stage's host shares: configuration, loop, spool, counters, committer."""

    def __init__(self, root: Path, extra: str = "") -> None:
        conf = root / "smtpgw.conf"
        conf.write_text(MINIMAL.read_text() + extra)
        self.cfg: Config = load_config(conf)
        self.loop = EventLoop()
        self.queue = Queue(self.cfg.path.QueuePath)
        self.stats = Stats()
        self.committer = Committer(self.queue, self.loop.call_soon_threadsafe)

    def close(self) -> None:
        self.committer.close()
        self.loop.close()

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        assert self.loop.run_until(lambda: bool(predicate()), DEADLINE), f"no {what} in {DEADLINE}s"

    def queued(self, state: str, data: bytes = MESSAGE, **fields: Any) -> Envelope:
        env = Envelope(id=new_id(), sender="a@sender.test", recipients=[Recipient(addr="user@example.test")],
                       size=len(data), received_at=time.time(), **fields)
        self.queue.add_message(env, state, data=data)
        return env


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    made = Host(tmp_path)
    yield made
    made.close()


# -- the receiver -------------------------------------------------------------------------------
class Inbox(Host):
    """``Inbound``: what a session needs; hand-offs recorded, the spool's free space switchable."""

    def __init__(self, root: Path, extra: str = "") -> None:
        super().__init__(root, extra)
        self.quota = Quota(self.cfg.path.QueuePath)
        self.ssl_context = None
        self.resolver: Any = None  # no rule or zone needs DNS: no lookup is ever started
        self.received: list[Envelope] = []
        self.closed: list[Session] = []
        self.space = True

    def queue_has_space(self) -> bool:
        return self.space

    def message_received(self, env: Envelope) -> None:
        self.received.append(env)

    def session_closed(self, session: Session) -> None:
        self.closed.append(session)

    def admit_mail(self, ready: Callable[[], None], first: bool = False) -> bool:
        return True  # nothing waits for a scan here


class Client:
    """The client end of a socketpair whose other end is a Session on the host's loop."""

    def __init__(self, inbox: Inbox, ip: str = "127.0.0.1") -> None:
        self.inbox = inbox
        self.sock, theirs = socket.socketpair()
        theirs.setblocking(False)
        self.sock.setblocking(False)
        self.buffer = b""
        accepted: Inbound = inbox
        self.session = Session(accepted, theirs, (ip, 40000))
        self.session.start(smtp.GREETING.format(inbox.cfg.network.Hostname))

    def _reply(self) -> bytes | None:
        """One complete reply (its last line has a space after the code), or None yet."""
        try:
            self.buffer += self.sock.recv(65536)
        except BlockingIOError:
            pass
        lines = self.buffer.split(b"\r\n")
        for n, text in enumerate(lines[:-1]):
            if text[3:4] == b" ":
                reply = b"\r\n".join(lines[:n + 1])
                self.buffer = b"\r\n".join(lines[n + 1:])
                return reply
        return None

    def read(self) -> tuple[int, bytes]:
        got: list[bytes] = []

        def ready() -> bool:
            reply = self._reply()
            if reply is not None:
                got.append(reply)
            return bool(got)

        self.inbox.wait(ready, "reply")
        return int(got[0][:3]), got[0]

    def cmd(self, line: bytes) -> tuple[int, bytes]:
        self.sock.sendall(line + b"\r\n")
        return self.read()


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    made = Inbox(tmp_path)
    yield made
    made.close()


def test_a_session_hands_over_a_message_only_once_it_is_durable(inbox: Inbox) -> None:
    client = Client(inbox)
    assert client.read()[0] == 220
    code, ehlo = client.cmd(b"EHLO client.test")
    assert code == 250 and f"SIZE {inbox.cfg.limits.MaximalIncomingMessageSize * 1024}".encode() in ehlo
    assert b"STARTTLS" not in ehlo  # the host has no TLS context
    assert client.cmd(b"MAIL FROM:<a@sender.test>")[0] == 250
    assert client.cmd(b"RCPT TO:<user@example.test>")[0] == 250
    assert client.cmd(b"DATA")[0] == 354
    client.sock.sendall(MESSAGE + b".\r\n")
    code, text = client.read()
    assert code == 250 and text.startswith(b"250 2.0.0 Ok: queued as ")
    qid = text.rsplit(b" ", 1)[1].decode()
    assert [env.id for env in inbox.received] == [qid]
    assert inbox.queue.find(qid) == WFC  # the record is in WFC before the 250 leaves
    with open(inbox.queue.msg_path(qid), "rb") as f:
        stored = f.read()
    assert stored.endswith(MESSAGE) and stored.startswith(b"Received: from client.test")
    assert inbox.stats.counters.get("mta_received_messages", 0) == 0  # counting is the gateway's hand-off
    assert client.cmd(b"QUIT")[0] == 221
    inbox.wait(lambda: inbox.closed, "session_closed")
    assert inbox.closed == [client.session]


def test_relay_is_decided_by_the_configuration_the_host_gives(inbox: Inbox) -> None:
    client = Client(inbox, ip="192.0.2.7")  # not 127.0.0.0/8: only *@example.test is allowed
    client.read()
    client.cmd(b"EHLO client.test")
    client.cmd(b"MAIL FROM:<a@sender.test>")
    code, text = client.cmd(b"RCPT TO:<user@elsewhere.test>")
    assert (code, text) == (550, b"550 5.7.1 <user@elsewhere.test>: Relay access denied")
    assert inbox.stats.counters["mta_receivings_refused_for_relay"] == 1
    assert client.cmd(b"RCPT TO:<user@example.test>")[0] == 250


def test_a_short_spool_refuses_mail_with_4xx(inbox: Inbox) -> None:
    inbox.space = False
    client = Client(inbox)
    client.read()
    client.cmd(b"EHLO client.test")
    assert client.cmd(b"MAIL FROM:<a@sender.test>") == (452, b"452 4.3.1 Insufficient system storage")
    assert inbox.received == []


def test_admission_keeps_the_session_limits(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path, "[smtpgw.limits]\nIncomingSessions=2\nMaximalIncomingSessionsPerIP=1\n")
    registry = Sessions()
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        for _, theirs in pairs:
            theirs.setblocking(False)
        first = registry.admit(inbox, pairs[0][1], ("192.0.2.1", 1), True)
        same_ip = registry.admit(inbox, pairs[1][1], ("192.0.2.1", 2), True)
        other_ip = registry.admit(inbox, pairs[2][1], ("192.0.2.2", 3), True)
        off = registry.admit(inbox, pairs[3][1], ("192.0.2.3", 4), False)
        greetings = [mine.recv(512) for mine, _ in pairs]
        assert greetings[0].startswith(b"220 gw.example.test")
        assert [g[:3] for g in greetings[1:]] == [b"421", b"421", b"421"]
        assert (first.closing, same_ip.closing, other_ip.closing, off.closing) == (False, True, True, True)
        assert inbox.stats.counters["mta_incoming_connections_errors"] == 2  # not the one refused while off
        registry.closed(same_ip)
        assert registry.per_ip == {"192.0.2.1": 1, "192.0.2.2": 1, "192.0.2.3": 1} and same_ip not in registry.open
    finally:
        for mine, theirs in pairs:
            mine.close()
            theirs.close()
        inbox.close()


# -- the sender and its client --------------------------------------------------------------------
class Outbox(Host):
    """``Outbound``: what the Sender needs; finished messages recorded."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.client_tls = None
        self.resolver: Any = None  # the tests give the Sender its own next-hop resolver
        self.templates = templates.load_templates(self.cfg.base.TemplatesPath)
        self.complete: list[Envelope] = []

    def delivery_complete(self, env: Envelope) -> None:
        self.complete.append(env)
        self.queue.remove(env.id, SND)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    made = Outbox(tmp_path)
    yield made
    made.close()


@pytest.fixture
def peer() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    sink.close()


def resolving_to(hops: list[Hop], asked: list[Destination], permanent: str | None = None) -> Callable[..., None]:
    def resolve(dest: Destination, done: ResolveCallback) -> None:
        asked.append(dest)
        done(hops, permanent, None)
    return resolve


def test_the_sender_delivers_through_the_hops_it_is_given(outbox: Outbox, peer: Sink) -> None:
    asked: list[Destination] = []
    handed: Outbound = outbox
    sender = Sender(handed, resolve=resolving_to([Hop("peer.test", "127.0.0.1", peer.port)], asked))
    env = outbox.queued(QUE)
    sender.enqueue(env.id, env=env)
    outbox.wait(lambda: outbox.complete, "delivery_complete")
    sender.stop()
    assert asked == [("host", "127.0.0.1", 2526)]  # minimal.conf: ForwardRoute=* [127.0.0.1:2526]
    [received] = peer.wait_for(1)
    assert (received.sender, received.recipients, received.data) == ("a@sender.test", ["user@example.test"], MESSAGE)
    [done] = outbox.complete
    assert [(r.addr, r.state) for r in done.recipients] == [("user@example.test", "sent")]
    assert outbox.stats.counters["mta_sent_messages"] == 1


@pytest.mark.parametrize("eight_bit_peer", [True, False], ids=["8bitmime", "downgraded"])
def test_a_header_from_the_record_goes_out_ahead_of_the_body_in_the_message_file(outbox: Outbox,
                                                                                eight_bit_peer: bool) -> None:
    """A scan's header change lives in the record (``head`` over msg/ID from ``body_offset``): the
    peer gets that header and the body, SIZE= counts them, and a peer without 8BITMIME gets the
    7-bit conversion of that message (RFC 6152 §3), not of msg/ID."""
    extensions = ("PIPELINING", "SIZE 1000000", "ENHANCEDSTATUSCODES") + (("8BITMIME",) if eight_bit_peer else ())
    peer = Sink(extensions=extensions)
    try:
        original = MESSAGE.replace(b"body", b"caf\xc3\xa9")
        head = ("X-Anti-Virus: clean\r\nFrom: a@sender.test\r\nTo: user@example.test\r\nSubject: [SPAM] stages\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
        offset = original.index(b"\r\n\r\n") + 4
        env = outbox.queued(QUE, original, head=head, body_offset=offset, body="8BITMIME")
        expected = head.encode("latin-1") + original[offset:]
        assert env.size == len(expected)
        sender = Sender(outbox, resolve=resolving_to([Hop("peer.test", "127.0.0.1", peer.port)], []))
        sender.enqueue(env.id, env=env)
        outbox.wait(lambda: outbox.complete, "delivery_complete")
        sender.stop()
        [received] = peer.wait_for(1)
    finally:
        peer.close()
    if eight_bit_peer:
        assert received.data == expected and f" SIZE={len(expected)}" in received.mail_line
    else:
        assert received.data.isascii() and b"\r\nSubject: [SPAM] stages\r\n" in received.data
        assert received.data.startswith(b"X-Anti-Virus: clean\r\n") and b"caf=C3=A9" in received.data


def test_a_permanent_next_hop_failure_fails_the_recipient_and_queues_the_dsn(
        outbox: Outbox, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("smtpgw"), "propagate", True)  # smtpgw.log.setup may have closed it
    asked: list[Destination] = []
    sender = Sender(outbox, resolve=resolving_to([], asked, permanent="5.1.2 no such domain"))
    env = outbox.queued(QUE)
    with caplog.at_level(logging.INFO, logger="smtpgw"):
        sender.enqueue(env.id, env=env)
        # the DSN is scheduled by the Sender itself, fails the same way, and is reported on by none
        outbox.wait(lambda: len(outbox.complete) == 2, "delivery_complete of the message and its DSN")
    sender.stop()
    done, bounce = outbox.complete
    assert [(r.addr, r.state, r.status) for r in done.recipients] == [("user@example.test", "failed", "5.1.2")]
    assert (bounce.sender, bounce.srcid, [r.addr for r in bounce.recipients]) == ("", env.id, ["a@sender.test"])
    assert outbox.stats.counters["mta_dsn_generated"] == 1  # never a DSN about a DSN
    assert any(f"DSN, kind=failure, srcid={env.id}" in r.getMessage() for r in caplog.records)


def test_a_deferred_attempt_is_written_off_the_loop_and_scheduled_again(
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the next hop down, the attempt's record goes back to QUE from an I/O thread: a queue
    deferred at once never stalls the loop with one fsync per message."""
    writers: list[str] = []
    update = outbox.queue.update

    def update_from(state: str, env: Envelope) -> None:
        writers.append(threading.current_thread().name)
        update(state, env)
    monkeypatch.setattr(outbox.queue, "update", update_from)
    sender = Sender(outbox, resolve=resolving_to([Hop("down.test", "127.0.0.1", free_port())], []))
    env = outbox.queued(QUE)
    sender.enqueue(env.id, env=env)
    outbox.wait(lambda: writers and env.id in sender.scheduled, "the deferred message scheduled again")
    sender.stop()
    assert writers and threading.main_thread().name not in writers, writers
    assert outbox.queue.find(env.id) == QUE and not outbox.complete
    stored = outbox.queue.load(QUE, env.id)
    assert stored is not None and stored.next_attempt > time.time()
    assert [(r.state, r.attempts) for r in stored.recipients] == [("deferred", 1)]
    assert sender.idle()


def test_an_attempt_the_disk_refuses_stays_in_snd_and_is_written_again(
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(logging.getLogger("smtpgw"), "propagate", True)
    monkeypatch.setattr(sender_module, "RETRY_LOCAL_ERROR", 0.1)
    sender = Sender(outbox, resolve=resolving_to([Hop("down.test", "127.0.0.1", free_port())], []))
    env = outbox.queued(QUE)
    que = Path(outbox.queue.root, QUE)
    aside = que.with_name("QUE.aside")
    with caplog.at_level(logging.ERROR, logger="smtpgw"):
        sender.enqueue(env.id, env=env)
        outbox.wait(lambda: outbox.queue.find(env.id) == SND, "the message in delivery")
        que.rename(aside)
        que.write_text("")  # the move back to QUE fails: ENOTDIR
        outbox.wait(lambda: "cannot record the delivery attempt" in caplog.text, "the refused write logged")
        que.unlink()
        aside.rename(que)
        outbox.wait(lambda: outbox.queue.find(env.id) == QUE and env.id in sender.scheduled,
                    "the attempt written once the disk takes it")
    sender.stop()
    stored = outbox.queue.load(QUE, env.id)
    assert stored is not None and [(r.state, r.attempts) for r in stored.recipients] == [("deferred", 1)]


@pytest.mark.parametrize(("dest", "hops"), [
    (("host", "192.0.2.5", 2526), [Hop("192.0.2.5", "192.0.2.5", 2526)]),
    (("host", "2001:db8::5", 25), [Hop("2001:db8::5", "2001:db8::5", 25)]),
    (("host", "localhost", 2525), [Hop("localhost", "127.0.0.1", 2525)]),  # RFC 6761 §6.3
])
def test_next_hops_known_without_dns(dest: Destination, hops: list[Hop]) -> None:
    got: list[tuple[list[Hop], str | None, str | None]] = []
    nexthop.resolve_destination(cast(Resolver, None), dest, lambda *answer: got.append(answer))
    assert got == [(hops, None, None)]  # at once: no resolver is asked


# -- the scanner --------------------------------------------------------------------------------
class FakePool:
    """``JobPool``: records the jobs; the test hands each result back through ``on_result``."""

    made: list["FakePool"] = []

    def __init__(self, loop: EventLoop, config_path: str, size: int, on_result: Callable[[str, dict], None],
                 timeout: float) -> None:
        self.on_result = on_result
        self.jobs: list[tuple[str, dict]] = []
        self.cancelled: list[str] = []
        FakePool.made.append(self)

    def submit(self, qid: str, payload: dict[str, Any]) -> None:
        self.jobs.append((qid, payload))

    def cancel(self, qid: str) -> bool:
        self.cancelled.append(qid)
        return True

    def retire_all(self) -> None:
        pass

    def stop(self) -> list[str]:
        return []


class Scans(Host):
    """``Scanning``: what the scanning stage needs; scanned messages recorded."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "[smtpgw.limits]\nMaximalScanAttempts=2\n")
        self.scanned: list[Envelope] = []

    def message_scanned(self, env: Envelope) -> None:
        self.scanned.append(env)


@pytest.fixture
def scans(tmp_path: Path) -> Iterator[tuple[Scans, Scanner, FakePool]]:
    made = Scans(tmp_path)
    handed: Scanning = made
    scanner = Scanner(handed, make_pool=FakePool)
    yield made, scanner, FakePool.made[-1]
    scanner.stop()
    made.close()


def test_a_scanned_message_goes_to_que_and_on(scans: tuple[Scans, Scanner, FakePool]) -> None:
    host, scanner, pool = scans
    env = host.queued(WFC)
    scanner.accept(env)
    assert [qid for qid, _ in pool.jobs] == [env.id] and host.queue.find(env.id) == CHK
    copy = CopyResult(group="policy", recipients=["user@example.test"], notes={"status": "clean"})
    pool.on_result(env.id, {"copies": [vars(copy)]})
    assert host.queue.find(env.id) == QUE
    assert [e.id for e in host.scanned] == [env.id] and host.scanned[0].group == "policy"
    assert host.stats.counters["antiviral_status_clean"] == 1


def test_copies_and_notifications_are_written_off_the_loop(
        scans: tuple[Scans, Scanner, FakePool], monkeypatch: pytest.MonkeyPatch) -> None:
    """A result with two group copies and a notification: every record it makes is written by an
    I/O thread (each costs fsyncs), and scheduled on the loop once all are durable."""
    host, scanner, pool = scans
    writers: list[str] = []
    add_message = host.queue.add_message

    def add_from(env: Envelope, state: str, data: bytes | None = None, link_from: str | None = None) -> None:
        writers.append(threading.current_thread().name)
        add_message(env, state, data=data, link_from=link_from)
    env = host.queued(WFC)
    env.recipients.append(Recipient(addr="other@example.test"))
    host.queue.write_record(WFC, env)
    monkeypatch.setattr(host.queue, "add_message", add_from)
    scanner.accept(env)
    notice = Path(host.queue.root, "tmp", f"{env.id}.notify-admin")
    notice.write_bytes(b"From: gateway@example.test\r\nSubject: notice\r\n\r\nabout it\r\n")
    copies = [vars(CopyResult(group="policy", recipients=["user@example.test"], notes={"status": "clean",
              "notifications": [{"kind": "admin", "path": str(notice), "from": "gateway@example.test",
                                 "to": ["admin@example.test"], "size": notice.stat().st_size}]})),
              vars(CopyResult(group="other", recipients=["other@example.test"], notes={"status": "clean"}))]
    pool.on_result(env.id, {"copies": copies})
    host.wait(lambda: len(host.scanned) == 3, "the notice and both copies scheduled")
    assert len(writers) == 3 and threading.main_thread().name not in writers, writers
    assert host.queue.find(env.id) is None and not notice.exists()
    assert sorted(e.id for e in host.scanned if e.id.startswith(env.id)) == [f"{env.id}-1", f"{env.id}-2"]
    assert all(host.queue.find(e.id) == QUE for e in host.scanned)
    assert env.id not in scanner.inflight


def test_held_mail_goes_in_turn_a_sessions_first_message_ahead(scans: tuple[Scans, Scanner, FakePool]) -> None:
    """InFlowDelay: while messages wait for a scan slot, MAILs are held; when a slot frees, a
    session's first message goes before the next messages of sessions that already sent some."""
    host, scanner, pool = scans
    for _ in range(scanner.limit + 1):  # every slot taken, one message waiting
        scanner.accept(host.queued(WFC))
    assert len(scanner.waiting) == 1
    released: list[str] = []
    assert not scanner.admit(lambda: released.append("bulk 1"))
    assert not scanner.admit(lambda: released.append("bulk 2"))
    assert not scanner.admit(lambda: released.append("new session"), first=True)
    done = pool.jobs[0][0]
    pool.on_result(done, {"copies": [vars(CopyResult(group="policy", recipients=["user@example.test"],
                                                     notes={"status": "clean"}))]})
    host.wait(lambda: len(released) == 3, "every held MAIL let go once nothing waits")
    assert released == ["new session", "bulk 1", "bulk 2"]
    assert not scanner.holding


def test_a_deferred_scan_waits_in_wfc(scans: tuple[Scans, Scanner, FakePool]) -> None:
    host, scanner, pool = scans
    env = host.queued(WFC)
    scanner.accept(env)
    pool.on_result(env.id, {"deferred": "clamd: connection refused"})
    assert host.queue.find(env.id) == WFC and env.id in scanner.retries and host.scanned == []
    assert host.stats.counters["antiviral_scanner_unavailable"] == 1


def test_failed_scans_count_until_the_message_is_quarantined(scans: tuple[Scans, Scanner, FakePool]) -> None:
    host, scanner, pool = scans
    env = host.queued(WFC)
    scanner.accept(env)
    pool.on_result(env.id, {"error": "worker died", "started": True})
    reloaded = host.queue.load(WFC, env.id)
    assert reloaded is not None and reloaded.scan_attempts == 1  # durable before the retry
    scanner.rescan_all()  # the retry now rather than in a minute
    assert [qid for qid, _ in pool.jobs] == [env.id, env.id]
    pool.on_result(env.id, {"error": "worker died", "started": True})  # MaximalScanAttempts=2
    host.wait(lambda: host.scanned, "the admin's notice queued (by an I/O thread)")
    assert host.queue.find(env.id) is None  # out of the queue only once kept in quarantine
    [item] = Store(host.cfg.policy.QuarantinePath).list()
    assert (item.queue_id, item.status) == (env.id, "ERR")
    assert [e.srcid for e in host.scanned] == [env.id]  # the admin's notice, queued
    assert os.path.exists(host.queue.record_path(QUE, host.scanned[0].id))


def test_a_message_removed_while_it_waits_is_withdrawn_from_the_pool(scans: tuple[Scans, Scanner, FakePool]) -> None:
    host, scanner, pool = scans
    env = host.queued(WFC)
    scanner.accept(env)
    scanner.cancel(env.id)
    assert pool.cancelled == [env.id] and env.id not in scanner.inflight


class KeyQueries:
    """``Resolver`` as the DKIM key lookups use it: the TXT names asked, never answered (a query's
    handle only needs ``cancel``)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def query(self, name: str, qtype: int, done: Callable[..., None]) -> Any:
        self.asked.append(name)
        return SimpleNamespace(cancel=lambda: None)

    def asking(self, name: str, qtype: int) -> bool:
        return name in self.asked


SIGNED = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=s1; c=relaxed/relaxed; h=from;\r\n"
          b" bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\r\nFrom: a@example.test\r\n\r\nbody\r\n")


@pytest.mark.parametrize(("dkim_signed", "read"), [(None, True), (True, True), (False, False)])
def test_the_dkim_key_names_are_read_from_msg_unless_the_record_says_unsigned(
        scans: tuple[Scans, Scanner, FakePool], dkim_signed: bool | None, read: bool) -> None:
    """The receiver notes whether the header holds a DKIM-Signature (``Envelope.dkim_signed``);
    a record that says it does not is sent to its worker without msg/ID read (and no key looked
    up), one that says it does or says nothing (written before the flag) has its keys looked up."""
    host, scanner, pool = scans
    resolver = KeyQueries()
    host.resolver = resolver  # type: ignore[attr-defined]
    env = host.queued(WFC, data=SIGNED, dkim_signed=dkim_signed)
    scanner.accept(env)
    if read:
        assert resolver.asked == ["s1._domainkey.example.test"] and env.id in scanner.lookups and not pool.jobs
    else:
        assert resolver.asked == [] and pool.jobs == [(env.id, {"env": env.as_dict(), "dkim": {}})]


def test_the_dkim_flag_is_kept_in_the_record_and_an_old_record_reads_as_not_known(tmp_path: Path) -> None:
    queue = Queue(str(tmp_path / "queue"))
    for flag in (True, False, None):
        env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient(addr="c@d.test")], dkim_signed=flag)
        queue.write_record(WFC, env)
        loaded = queue.load(WFC, env.id)
        assert loaded is not None and loaded.dkim_signed is flag
        assert ("dkim_signed" in env.as_dict()) is (flag is not None)
        assert "dkim_signed" not in env.as_dict(spool=False)  # a stored copy's bytes are not the ones received


def test_an_attempt_that_leaves_every_recipient_final_writes_nothing_and_takes_no_io_thread(
        outbox: Outbox, peer: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sent with no DSN due: the record is not written again (it is removed next), so the attempt
    is concluded on the loop; one with a recipient deferred writes its record in an I/O thread."""
    calls: list[str] = []
    call = outbox.committer.call

    def counted(job: Callable[[], Any], done: Callable[[Any, BaseException | None], None], **kw: Any) -> None:
        calls.append(threading.current_thread().name)
        call(job, done, **kw)
    monkeypatch.setattr(outbox.committer, "call", counted)
    sender = Sender(outbox, resolve=resolving_to([Hop("peer.test", "127.0.0.1", peer.port)], []))
    env = outbox.queued(QUE)
    sender.enqueue(env.id, env=env)
    outbox.wait(lambda: outbox.complete, "delivery_complete")
    assert calls == [] and outbox.queue.find(env.id) is None
    peer.rcpt_reply = lambda addr: "451 4.3.0 try again later"
    deferred = outbox.queued(QUE)
    sender.enqueue(deferred.id, env=deferred)
    outbox.wait(lambda: calls and outbox.queue.find(deferred.id) == QUE and deferred.id not in sender.concluding,
                "the deferred attempt written")
    sender.stop()
    stored = outbox.queue.load(QUE, deferred.id)
    assert stored is not None and [r.state for r in stored.recipients] == ["deferred"]
