"""A message that kills or hangs its scanner worker: only it is blamed, it is kept in quarantine
with status error after MaximalScanAttempts, and the admin can remove it while it is scanned.

A worker is made to hang deterministically by a clamd that holds every stream carrying
STALL_MARKER (tests/support/clamd.py StallingClamd, in front of the real private clamd), and
it is killed with SIGKILL as a crash would: the holder's PID comes from the held connection.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import time

import pytest

from smtpgw.spool.store import Store
from tests.support.clamd import STALL_MARKER
from tests.support.net import RawClient, wait_until

SCAN_WORKERS = min(10, os.cpu_count() or 1)  # the gateway's pool: min(AntiviralSessions, cores)


def scanning(front, limits: dict[str, str] | None = None, **policy: str) -> dict[str, list[tuple[str, str]]]:
    """Configuration: every message scanned through ``front`` (a StallingClamd)."""
    return {
        "smtpgw.ave": [("ClamdAddress", front.address)],
        "smtpgw.policy": [("Check", "true"), *policy.items()],
        "smtpgw.limits": list((limits or {}).items()),
    }


def send(gw, subject: str, body: bytes) -> str:
    """Send one message; returns its queue ID (found by its Subject in msg/)."""
    data = f"From: a@b.test\r\nTo: x@example.test\r\nSubject: {subject}\r\n\r\n".encode() + body + b"\r\n"
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", ["x@example.test"], data)
    folder = os.path.join(gw.queue, "msg")
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            if f"\r\nSubject: {subject}\r\n".encode() in f.read():
                return name
    raise AssertionError(f"no queued message with Subject {subject}")


def record(gw, state: str, qid: str) -> dict:
    with open(os.path.join(gw.queue, state, qid)) as f:
        return json.load(f)


def kill_holder(front, nth: int) -> None:
    """Wait for the ``nth`` scan stuck in the clamd and SIGKILL the worker running it."""
    wait_until(lambda: len(front.held_pids) >= nth, 30, f"scan {nth} stuck in clamd")
    os.kill(front.held_pids[nth - 1], signal.SIGKILL)


def test_mail_waiting_behind_a_worker_that_dies_is_delivered_without_blame(make_gateway, sink, stalling_clamd):
    gw = make_gateway(sink.port, extra=scanning(stalling_clamd))
    poison = [send(gw, f"poison {n}", STALL_MARKER) for n in range(SCAN_WORKERS)]
    wait_until(lambda: len(stalling_clamd.held_pids) == SCAN_WORKERS, 30, "every worker stuck on a poison message")
    innocent = send(gw, "innocent", b"nothing to see here")
    withdrawn = send(gw, "withdrawn", b"removed before any worker takes it")
    assert {innocent, withdrawn} <= set(gw.queued("CHK"))  # waiting for a worker
    result = gw.cli("queue", "remove", withdrawn)
    assert result.returncode == 0, result.stderr
    gw.wait_log(rf"{withdrawn}: REMOVED, state=CHK")

    for pid in stalling_clamd.held_pids:
        os.kill(pid, signal.SIGKILL)
    [got] = sink.wait_for(1)
    assert b"Subject: innocent" in got.data
    gw.wait_log(r"SCAN FAILED, attempt=1, max=3", count=SCAN_WORKERS)
    text = gw.log_text()
    assert f"{innocent}: SCAN FAILED" not in text and f"{innocent}: scan failed" not in text
    for qid in poison:  # back in WFC for a later try, the failure on record
        assert record(gw, "WFC", qid)["scan_attempts"] == 1
    assert not os.path.exists(os.path.join(gw.queue, "msg", withdrawn))
    assert withdrawn not in gw.queued() and len(sink.messages) == 1


def test_a_message_that_kills_its_worker_each_time_is_quarantined_with_status_error(make_gateway, sink, stalling_clamd):
    gw = make_gateway(sink.port, extra=scanning(stalling_clamd, {"MaximalScanAttempts": "2"}))
    qid = send(gw, "poison", STALL_MARKER)
    kill_holder(stalling_clamd, 1)
    gw.wait_log(rf"{qid}: SCAN FAILED, attempt=1, max=2, reason=\"scanner worker died")
    assert record(gw, "WFC", qid)["scan_attempts"] == 1

    assert gw.stop() == 0
    gw.start()  # the count is in the record: the restart scans it again, as its last try
    kill_holder(stalling_clamd, 2)
    gw.wait_log(rf"{qid}: AV-SCANNED, group=policy, status=\"error\"")
    gw.wait_log(rf"{qid}: BLOCKED, rcpt=x@example.test, .*reason=\"scan failed 2 times \(MaximalScanAttempts=2\)")

    [notice] = sink.wait_for(1)  # the admin's notice; the message itself is never delivered
    assert notice.recipients == ["admin@example.test"]
    assert b"(error)" in notice.data and qid.encode() in notice.data and b"poison" in notice.data
    [item] = Store(os.path.join(gw.folder, "var", "quarantine")).list()
    assert (item.queue_id, item.status) == (qid, "ERR") and "scan failed 2 times" in item.reason
    body, _ = Store(os.path.join(gw.folder, "var", "quarantine")).get(item.id)
    assert STALL_MARKER in body
    wait_until(lambda: not gw.queued(), 10, "the queue emptied")
    assert not os.path.exists(os.path.join(gw.queue, "msg", qid))
    stats = dict(line.split("=", 1) for line in gw.cli("stats").stdout.splitlines())
    assert stats["antiviral_status_error"] == "1"


def test_queue_remove_of_a_message_being_scanned_discards_the_result(make_gateway, sink, stalling_clamd):
    # the disclaimer makes the scan write a new message file: it must not stay behind either
    gw = make_gateway(sink.port, extra=scanning(stalling_clamd, AddDisclaimer="true"))
    qid = send(gw, "poison", STALL_MARKER)
    wait_until(lambda: stalling_clamd.held_pids, 30, "the scan stuck in clamd")
    assert gw.queued("CHK") == [qid]
    result = gw.cli("queue", "remove", qid)
    assert (result.returncode, result.stdout.strip()) == (0, f"{qid}: removed"), result.stderr
    assert gw.queued() == [] and not os.path.exists(os.path.join(gw.queue, "msg", qid))

    stalling_clamd.release()  # the worker gets its verdict and sends its result
    gw.wait_log(rf"{qid}: SCAN DISCARDED, reason=\"removed while being scanned\"")
    send(gw, "after", b"the scanner goes on")
    [got] = sink.wait_for(1)
    assert b"Subject: after" in got.data  # and nothing of the removed message
    wait_until(lambda: not gw.queued(), 10, "the queue emptied")
    assert [n for n in os.listdir(os.path.join(gw.queue, "tmp")) if n.startswith(qid)] == []
    assert f"{qid}: SCAN FAILED" not in gw.log_text()


def test_an_unavailable_scanner_is_no_attempt(make_gateway, sink, tmp_path):
    gw = make_gateway(sink.port, extra={"smtpgw.ave": [("ClamdAddress", f"unix:{tmp_path}/no-clamd.sock")],
                                        "smtpgw.policy": [("Check", "true")],
                                        "smtpgw.limits": [("MaximalScanAttempts", "1")]})
    qid = send(gw, "waits", b"for the scanner")
    gw.wait_log(rf"{qid}: SCAN DEFERRED")
    wait_until(lambda: gw.queued("WFC") == [qid], 10, "the message back in WFC")
    assert record(gw, "WFC", qid)["scan_attempts"] == 0
    assert "SCAN FAILED" not in gw.log_text() and sink.messages == []


@pytest.mark.parametrize("process", ["main", "incoming"])
def test_mail_arriving_faster_than_it_is_scanned_waits_at_mail_from(make_gateway, sink, stalling_clamd, process):
    """InFlowDelay (as Postfix's in_flow_delay): while messages wait for a scan slot, a MAIL FROM
    is answered only when one of them leaves the wait (or after InFlowDelay seconds); in the main
    process or in an incoming process (IncomingProcesses=2), whose MAIL waits for the main one's go."""
    gw = make_gateway(sink.port, extra=scanning(stalling_clamd, {"AntiviralSessions": "10", "InFlowDelay": "10",
                                                                 "IncomingProcesses": "2"}))
    gw.wait_log(r"incoming process 1 started")
    for n in range(10):  # every scan slot taken: the workers stuck in clamd, the rest behind them
        send(gw, f"stuck {n}", STALL_MARKER)
    send(gw, "waiting", b"no scan slot is free for this one")  # its MAIL came while nothing waited
    first = RawClient(gw.port) if process == "incoming" else None  # served by the main process
    client = RawClient(gw.port)
    assert client.reply()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    client.send("MAIL FROM:<a@b.test>\r\n")
    client.sock.settimeout(1.0)
    with pytest.raises(socket.timeout):  # held: one message waits for a scan slot
        client.reply()
    client.sock.settimeout(30)
    started = time.monotonic()
    stalling_clamd.release()
    assert client.reply()[0] == 250  # let go as soon as the scans moved on, not after InFlowDelay
    assert time.monotonic() - started < 8
    assert client.cmd("RCPT TO:<x@example.test>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    code, text = client.cmd("Subject: held\r\n\r\nheld at MAIL FROM\r\n.")
    assert code == 250 and text.rsplit(" ", 1)[1][-1] == ("1" if first else "0")  # the process that served it
    client.cmd("QUIT")
    got = sink.wait_for(12, timeout=60)
    assert sum(b"Subject: held" in m.data for m in got) == 1
    if first is not None:
        first.close()
