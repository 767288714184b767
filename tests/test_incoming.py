"""app/incoming.py without a gateway: what the main process does when an incoming process dies.

A small master (a real loop, spool, counters and admission registry, the hand-offs recorded) and
the ``Incoming`` of the main process, driven as the channel and the process's end drive it.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from smtpgw.app.incoming import Channel, Incoming
from smtpgw.receive.quota import Quota
from smtpgw.receive.receiver import Sessions
from smtpgw.spool import queue as spool
from smtpgw.spool.queue import QUE, WFC, Envelope, Recipient
from tests.test_stages import Host


class Master(Host):
    """The members ``Incoming`` uses of the gateway process, with the hand-offs recorded."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.quota = Quota(self.cfg.path.QueuePath)
        self.inbound = Sessions()
        self.stopping = False
        self.received: list[str] = []
        self.waiting: set[str] = set()

    def message_received(self, env: Envelope) -> None:
        self.received.append(env.id)

    def known_in_wfc(self) -> set[str]:
        return set(self.waiting)

    def holding_mail(self) -> bool:
        return False

    def admit_mail(self, ready: Callable[[], None]) -> bool:
        return True


def queued(master: Master, process: int, state: str = WFC, suffix: str = "") -> str:
    spool.set_process(process)
    env = Envelope(id=spool.new_id() + suffix, sender="a@b.test", recipients=[Recipient("x@example.test")])
    master.queue.add_message(env, state, data=b"Subject: x\r\n\r\nx\r\n")
    return env.id


def test_a_dead_incoming_process_s_unreported_messages_and_sessions_are_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "_counter", itertools.count())
    monkeypatch.setattr(spool, "_process_tag", None)
    master = Master(tmp_path)
    incoming = Incoming(master, 3)
    child = incoming.children[0]  # process 1
    unreported = queued(master, 1)
    given = queued(master, 1)
    master.waiting.add(given)  # reported before it died: the scanner has it
    others = [queued(master, 2), queued(master, 0), queued(master, 1, QUE), queued(master, 0, suffix="-1")]
    # its two open sessions, admitted by the main process
    master.inbound.per_ip["192.0.2.7"] += 2
    master.inbound.elsewhere = 2
    child.per_ip["192.0.2.7"], child.sessions = 2, 2
    master.stats.set("mta_incoming_connections_current", 2)
    spool.set_process(1)  # what it left of messages it never answered: a file being received, one without record
    leftovers = [Path(master.queue.root, "tmp", spool.new_id() + "abcdef"), Path(master.queue.msg_path(spool.new_id()))]
    for path in leftovers:
        path.write_bytes(b"Subject: never acknowledged\r\n")
    child.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.proc.wait()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    monkeypatch.setattr(child, "start", lambda: None)  # no restart in this test
    child.channel = Channel(master.loop, ours, lambda m, f: None, child._lost)
    theirs.close()  # the process is gone: its end of the channel closes
    master.loop.run_until(lambda: child.proc is None, 5)
    assert master.received == [unreported]  # only its own IDs, in WFC, not already given: nothing else
    assert master.inbound.elsewhere == 0 and not master.inbound.per_ip
    assert master.stats.counters["mta_incoming_connections_current"] == 0
    assert all(master.queue.find(qid) is not None for qid in others)
    assert not any(path.exists() for path in leftovers)
    assert all(Path(master.queue.msg_path(qid)).exists() for qid in [unreported, given, *others])
    master.close()
