"""DeliveryProcess=yes: the Sender stage in a process of its own, as one gateway.

The main process hands each message in QUE to the delivery process by its queue ID; the
delivery process sends it, logs DELIVERED itself, and reports its counters back. It is the
default, so the other delivery tests run with it too; the key ones also run with
DeliveryProcess=no (``both_delivery_paths``), and SMTPGW_TEST_DELIVERY_PROCESS=no puts all of
them on that path (tests/support/net.py).
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading

from tests.support.net import GatewayProcess, gone, Sink, wait_until

ON = {"smtpgw.limits": [("DeliveryProcess", "yes")]}
STARTED = r"delivery process started, pid=(\d+)"


def delivery_pid(gw: GatewayProcess, count: int = 1) -> int:
    return gw.started_pid(STARTED, count)


def send(gw: GatewayProcess, token: str) -> str:
    """One message; its queue ID from the 250."""
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@b.test")[0] == 250
        assert client.rcpt("x@example.test")[0] == 250
        code, text = client.data(f"Subject: {token}\r\n\r\n{token}\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def subjects(sink: Sink) -> list[str]:
    return [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in sink.messages]


def counters(gw: GatewayProcess) -> dict[str, str]:
    return dict(line.split("=", 1) for line in gw.cli("stats").stdout.splitlines())


def test_messages_go_out_through_the_delivery_process_and_are_counted_by_the_main_process(make_gateway, sink):
    gw = make_gateway(sink.port, extra=ON)
    pid = delivery_pid(gw)
    ids = [send(gw, f"out-{n}") for n in range(3)]
    assert {qid[-1] for qid in ids} == {"0"}  # made by the main process (the delivery process's end in S)
    sink.wait_for(3)
    assert sorted(subjects(sink)) == ["out-0", "out-1", "out-2"]
    for qid in ids:  # logged by the delivery process itself, whole lines in the one log
        gw.wait_log(rf"\] {qid}: DELIVERED, rcpt=<x@example.test>, server=127\.0\.0\.1\[127\.0\.0\.1\].*status=sent")
    wait_until(lambda: not gw.queued(), 10, "every delivered message unlinked")
    wait_until(lambda: counters(gw).get("mta_sent_messages") == "3", 10, "the main process counts what was sent")
    stats = counters(gw)
    assert stats["mta_sent_recipients"] == "3"
    assert stats["mta_outgoing_connections_total"] != "0"
    report = gw.memory_report()  # the sender's registries, as the delivery process reports them
    assert {"sender_schedule", "sender_inflight", "sender_connections"} <= set(report["registries"])
    assert {"kind": "delivery", "pid": pid} in [{"kind": p["kind"], "pid": p["pid"]} for p in report["processes"]]
    assert gw.stop() == 0
    assert re.search(rf"delivery process \(pid {pid}\) stopped: exit status 0", gw.log_text())


def test_a_killed_delivery_process_loses_nothing_and_is_started_again(make_gateway, sink):
    sink.stall = threading.Event()
    gw = make_gateway(sink.port, extra=ON)
    pid = delivery_pid(gw)
    tokens = [f"in-flight-{n}" for n in range(3)]
    for token in tokens:
        send(gw, token)
    sink.wait_stalled(1)  # a message's data sent, the next hop's reply not yet in: SND
    assert gw.queued("SND")
    os.kill(pid, signal.SIGKILL)
    gw.wait_log(rf"delivery process \(pid {pid}\) ended: signal 9; starting it again")
    sink.unstall()
    new_pid = delivery_pid(gw, count=2)
    assert new_pid != pid
    gw.wait_log(r"delivery process started, pid=\d+, \d+ message\(s\) it was sending queued again")
    sink.wait_for(3)
    assert sorted(subjects(sink)) == tokens
    wait_until(lambda: not gw.queued(), 10, "every delivered message unlinked")
    wait_until(lambda: counters(gw).get("mta_outgoing_connections_current") == "0", 10,
               "the connections of the killed process no longer counted")


def test_the_delivery_process_exits_when_the_main_process_is_killed(make_gateway, sink):
    gw = make_gateway(sink.port, extra=ON)
    pid = delivery_pid(gw)
    gw.kill()
    wait_until(lambda: gone(pid), 10, "the delivery process gone with the main process")


def test_a_reload_gives_the_delivery_process_the_new_route(make_gateway, sink):
    gw = make_gateway(sink.port, extra=ON)
    delivery_pid(gw)
    send(gw, "before")
    sink.wait_for(1)
    other = Sink()
    try:
        with open(gw.config) as f:
            text = f.read()
        with open(gw.config, "w") as f:
            f.write(text.replace(f"[127.0.0.1:{sink.port}]", f"[127.0.0.1:{other.port}]"))
        gw.signal(signal.SIGHUP)
        gw.wait_log(r"configuration reloaded from")
        send(gw, "after")
        other.wait_for(1)
        assert subjects(other) == ["after"]
        assert subjects(sink) == ["before"]
    finally:
        other.close()


def test_queue_remove_and_send_reach_the_delivery_process(make_gateway, sink):
    sink.replies["RCPT"] = ["451 4.3.0 try later"]
    gw = make_gateway(sink.port, extra=ON)
    delivery_pid(gw)
    kept, removed = send(gw, "kept"), send(gw, "removed")
    for qid in (kept, removed):
        gw.wait_log(rf"\] {qid}: DELIVERED, .*status=deferred")
    wait_until(lambda: sorted(gw.queued("QUE")) == sorted([kept, removed]), 10, "both deferred back to QUE")
    result = gw.cli("queue", "remove", removed)
    assert result.returncode == 0, result.stdout + result.stderr
    gw.wait_log(rf"\] {removed}: REMOVED, state=QUE, by=admin")
    assert not os.path.exists(os.path.join(gw.queue, "msg", removed))
    sink.replies["RCPT"] = ["250 2.1.5 ok"]
    assert gw.cli("queue", "send", kept).returncode == 0  # ahead of its back-off
    sink.wait_for(1)
    assert subjects(sink) == ["kept"]
    wait_until(lambda: not gw.queued(), 10, "the sent one unlinked")


def test_a_hung_delivery_process_is_killed_and_replaced(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.limits": [("DeliveryProcess", "yes")],
                                        "smtpgw.timeouts": [("DeliveryProcessTimeout", "3")]})
    pid = delivery_pid(gw)
    os.kill(pid, signal.SIGSTOP)  # its loop stops: no packet any more
    try:
        gw.wait_log(rf"delivery process \(pid {pid}\) silent for \d+s \(DeliveryProcessTimeout\): killed")
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGCONT)
    assert delivery_pid(gw, count=2) != pid
    send(gw, "after-hang")
    sink.wait_for(1)
    assert subjects(sink) == ["after-hang"]
