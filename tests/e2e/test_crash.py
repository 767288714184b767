"""Never lose mail: kill -9 the gateway at random moments under load; every 250'd message arrives."""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import threading
import time
from typing import Callable

import pytest

from tests.support.net import wait_until

CLIENTS = 4
PER_CLIENT = 60
KILL_AFTER = (15, 60, 110)  # sink counts after which a kill -9 comes (plus a random delay)


def _client(port: int, index: int, accepted: list[str], stop: threading.Event) -> None:
    for n in range(PER_CLIENT):
        token = f"c{index}-m{n}"
        body = f"Subject: {token}\r\nMessage-ID: <{token}@load.test>\r\n\r\n{token}\r\n".encode() + (b"x" * 76 + b"\r\n") * 26
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail("load@b.test", [f"r{n % 3}@example.test"], body)
                accepted.append(token)  # the gateway said 250
                break
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code >= 500:
                    raise
                time.sleep(0.05)  # 4xx (shutting down): try this message again
            except (OSError, smtplib.SMTPServerDisconnected):
                time.sleep(0.05)  # the gateway is down or restarting: try this message again
        if stop.is_set():
            return


@pytest.mark.parametrize("check, delivery", [(False, "yes"), (True, "yes"), (False, "no")],
                         ids=["relayed", "scanned", "relayed-one-process"])
def test_kill_minus_nine_under_load_loses_nothing(make_gateway, sink, request, check, delivery):
    rng = random.Random(20261128)
    # IncomingProcesses=2: sessions served by the main process and an incoming process, both killed;
    # with the delivery process (DeliveryProcess=yes) it goes too, as its channel closes
    extra = {"smtpgw.options": [("LogLevel", "info")],
             "smtpgw.limits": [("IncomingProcesses", "2"), ("DeliveryProcess", delivery)]}
    if check:  # every message gets X-Anti-Virus: its header written in the QUE record is among the crash points
        clamd = request.getfixturevalue("clamd")
        extra |= {"smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
                  "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none")]}
    gw = make_gateway(sink.port, extra=extra)

    def restart(_n: int) -> None:
        gw.kill()
        gw.start()

    _kill_under_load(gw, sink, rng, restart)
    if check:  # the scanned variant did go through the header change
        assert all(b"\r\nX-Anti-Virus: " in b"\r\n" + m.data for m in sink.messages)


def test_kill_minus_nine_of_an_incoming_process_under_load_loses_nothing(make_gateway, sink):
    """The main process lives on and starts the incoming process again; what it had answered 250 is
    delivered (reported or found in WFC by the main process), what it had not is not queued."""
    rng = random.Random(20261207)
    gw = make_gateway(sink.port, extra={"smtpgw.options": [("LogLevel", "info")],
                                        "smtpgw.limits": [("IncomingProcesses", "2")]})
    started = r"incoming process 1 started, pid=(\d+)"

    def kill_incoming(n: int) -> None:
        found = re.search(started, gw.wait_log(started, count=n)[n - 1])
        assert found is not None
        os.kill(int(found.group(1)), signal.SIGKILL)
        gw.wait_log(started, count=n + 1)

    _kill_under_load(gw, sink, rng, kill_incoming)
    assert len(gw.wait_log(r"incoming process 1 \(pid \d+\) ended: signal 9")) == len(KILL_AFTER)


def _kill_under_load(gw, sink, rng: random.Random, kill: Callable[[int], None]) -> None:
    """CLIENTS clients send PER_CLIENT messages each, again until they get a 250; ``kill(n)`` at
    each of KILL_AFTER; then every message that got a 250 must arrive."""
    accepted: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_client, args=(gw.port, i, accepted, stop), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        for n, threshold in enumerate(KILL_AFTER, start=1):
            wait_until(lambda: len(sink.messages) >= threshold, 60, f"{threshold} messages at the sink")
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment, not a synchronisation
            kill(n)
        for t in threads:
            t.join(120)
    finally:
        stop.set()
    assert len(accepted) == CLIENTS * PER_CLIENT
    wait_until(lambda: not gw.queued(), 60, "an empty queue after the last restart")
    delivered = {m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in sink.messages}
    missing = sorted(set(accepted) - delivered)
    assert not missing, f"accepted but never delivered: {missing}"
    duplicates = len(sink.messages) - len(delivered)
    print(f"{len(accepted)} accepted, {len(sink.messages)} delivered, {duplicates} duplicates")


def test_a_split_interrupted_by_a_crash_is_done_again(make_gateway, sink):
    """A record left in SPL goes back to WFS, and the split is redone with the same copy IDs."""
    from smtpgw.spool.queue import SPL, Envelope, Queue, Recipient, WFC, new_id

    gw = make_gateway(sink.port, start=False, extra={
        "smtpgw.group:lab": [("Recipients", "*@lab.example.test")],
    })
    queue = Queue(gw.queue)
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test"), Recipient("y@lab.example.test")],
                   received_at=time.time(), size=24)
    with open(queue.msg_path(env.id), "wb") as f:
        f.write(b"Subject: split\r\n\r\nbody\r\n")
    half = Envelope.from_dict(env.as_dict())  # the first copy was made before the crash
    half.id, half.srcid, half.recipients = f"{env.id}-1", env.id, half.recipients[:1]
    queue.add_message(half, WFC, link_from=queue.msg_path(env.id))
    queue.write_record(SPL, env)
    gw.start()
    got = sink.wait_for(2)
    assert sorted(m.recipients[0] for m in got) == ["x@example.test", "y@lab.example.test"]
    wait_until(lambda: not gw.queued(), 20, "empty queue")
    assert len(sink.messages) == 2  # the copy made before the crash was not sent twice
