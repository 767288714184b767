"""Forwarding: retries on 4xx and connection failure, no retry on 5xx, one transaction per destination."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from tests.support.net import Sink, free_port, wait_until


def send(gw, rcpts, body=b"Subject: t\r\n\r\nbody\r\n", sender="a@b.test", **kw):
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        return client.sendmail(sender, rcpts, body, **kw)


def test_temporary_failure_is_retried(gateway, sink):
    sink.replies["RCPT"] = ["451 4.3.0 try again later", "250 2.1.5 ok"]
    send(gateway, ["x@example.test"])
    gateway.wait_log(r"DELIVERED, rcpt=<x@example.test>.*status=deferred.*451 4.3.0")
    [qid] = wait_until(lambda: gateway.queued("QUE"), 10, "deferred message back in QUE")
    listing = gateway.cli("queue", "list")
    assert listing.returncode == 0 and qid in listing.stdout and "QUE" in listing.stdout
    result = gateway.cli("queue", "send-all")
    assert result.returncode == 0, result.stderr
    [got] = sink.wait_for(1)
    assert got.recipients == ["x@example.test"]
    wait_until(lambda: not gateway.queued(), 10, "empty queue")


@pytest.mark.usefixtures("both_delivery_paths")
def test_permanent_failure_is_not_retried_and_bounces_once(gateway, sink):
    sink.replies["RCPT"] = ["550 5.1.1 no such user", "250 2.1.5 ok"]
    send(gateway, ["gone@example.test"])
    gateway.wait_log(r"DELIVERED, rcpt=<gone@example.test>.*status=failed.*550 5.1.1")
    [bounce] = sink.wait_for(1)  # the DSN to the sender, through the same route
    wait_until(lambda: not gateway.queued(), 10, "empty queue")
    assert gateway.cli("queue", "send-all").returncode == 0
    assert bounce.sender == "" and bounce.recipients == ["a@b.test"]
    report = email.message_from_bytes(bounce.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    fields = status.as_bytes().decode()
    assert "Final-Recipient: rfc822; gone@example.test" in fields
    assert "Action: failed" in fields and "Status: 5.1.1" in fields
    assert [c for c in sink.commands if c.startswith("RCPT")] == ["RCPT TO:<gone@example.test>", "RCPT TO:<a@b.test>"]
    assert len(sink.messages) == 1


def test_partial_failure_keeps_only_the_deferred_recipient(gateway, sink):
    sink.replies["RCPT"] = ["250 2.1.5 ok", "550 5.1.1 unknown", "452 4.2.2 mailbox full", "250 2.1.5 ok"]
    send(gateway, ["a1@example.test", "a2@example.test", "a3@example.test"])
    got = sink.wait_for(2)  # the message for a1, and the DSN about a2
    [first] = [m for m in got if m.sender]
    assert first.recipients == ["a1@example.test"]
    [bounce] = [m for m in got if not m.sender]
    assert b"a2@example.test" in bounce.data and b"a3@example.test" not in bounce.data.split(b"\r\n\r\n", 1)[1][:2000]
    wait_until(lambda: gateway.queued("QUE"), 10, "deferred recipient in QUE")
    gateway.cli("queue", "send-all")
    second = sink.wait_for(3)[2]
    assert second.recipients == ["a3@example.test"]  # never a1 again, never a2


@pytest.mark.usefixtures("both_delivery_paths")
def test_next_hop_down_then_up(make_gateway):
    port = free_port()
    gw = make_gateway(port)
    send(gw, ["x@example.test"])
    gw.wait_log(r"DELIVERED, rcpt=<x@example.test>.*status=deferred.*(refused|connect)")
    wait_until(lambda: gw.queued("QUE"), 10, "message waiting in QUE")
    up = Sink()
    try:
        up.sock.close()  # re-bind the sink on the port the gateway forwards to
        import socket, threading

        up.sock = socket.socket()
        up.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        up.sock.bind(("127.0.0.1", port))
        up.sock.listen(16)
        up.port = port
        up.thread = threading.Thread(target=up._serve, daemon=True)
        up.thread.start()
        gw.cli("queue", "send-all")
        [got] = up.wait_for(1)
        assert got.recipients == ["x@example.test"]
    finally:
        up.close()


def test_one_transaction_per_destination(make_gateway):
    one, two = Sink(), Sink()
    try:
        gw = make_gateway(None, extra={"smtpgw.forward": [
            ("ForwardRoute", f"*@one.test [127.0.0.1:{one.port}]"),
            ("ForwardRoute", f"* [127.0.0.1:{two.port}]"),
        ]})
        send(gw, ["a@one.test", "b@two.test", "c@one.test", "d@three.test"])
        [m1] = one.wait_for(1)
        [m2] = two.wait_for(1)
        assert m1.recipients == ["a@one.test", "c@one.test"]
        assert m2.recipients == ["b@two.test", "d@three.test"]
    finally:
        one.close()
        two.close()


def test_peer_without_pipelining_gets_one_command_at_a_time(make_gateway):
    plain = Sink(extensions=("8BITMIME",))
    try:
        gw = make_gateway(plain.port)
        plain.replies["RCPT"] = ["250 2.1.5 ok", "550 5.1.1 unknown", "250 2.1.5 ok"]
        send(gw, ["a@example.test", "b@example.test", "c@example.test"])
        [got] = plain.wait_for(1)
        assert got.recipients == ["a@example.test", "c@example.test"]
        verbs = [c.split()[0].upper() for c in plain.commands]
        assert verbs[:6] == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
        assert "SIZE=" not in got.mail_line  # SIZE not offered, not sent
    finally:
        plain.close()


def test_peer_refusing_helo_style_ehlo_gets_helo(make_gateway):
    old = Sink()
    old.replies["EHLO"] = ["502 5.5.1 EHLO not implemented"]
    try:
        gw = make_gateway(old.port)
        send(gw, ["a@example.test"])
        [got] = old.wait_for(1)
        assert [c.split()[0] for c in old.commands[:2]] == ["EHLO", "HELO"]
        assert got.mail_line == "MAIL FROM:<a@b.test>"
    finally:
        old.close()


@pytest.mark.usefixtures("both_delivery_paths")
def test_eight_bit_to_a_peer_without_8bitmime_is_converted_or_fails_cleanly(make_gateway):
    seven = Sink(extensions=("PIPELINING",))
    try:
        gw = make_gateway(seven.port)
        body = "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncafé ½\r\n"
        send(gw, ["a@example.test"], body=body.encode(), mail_options=["BODY=8BITMIME"])
        [got] = seven.wait_for(1)
        assert got.data.isascii() and "BODY=8BITMIME" not in got.mail_line
        parsed = email.message_from_bytes(got.data, policy=email.policy.default)
        assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
        assert parsed.get_content().replace("\r\n", "\n") == "café ½\n"  # RFC 6152 §3: converted, same content
        send(gw, ["b@example.test"], body="Subject: naïve header\r\n\r\nx\r\n".encode(), mail_options=["BODY=8BITMIME"])
        gw.wait_log(r"rcpt=<b@example.test>.*status=failed, dsn=5\.6\.3")
        bounce = seven.wait_for(2)[1]
        assert bounce.sender == ""  # the unconvertible message itself never got there
    finally:
        seven.close()


@pytest.mark.usefixtures("both_delivery_paths")
def test_queue_remove_while_running(gateway, sink):
    sink.replies["RCPT"] = ["451 4.3.0 later"]
    send(gateway, ["x@example.test"])
    gateway.wait_log(r"status=deferred")  # before its first attempt it sits in QUE too
    [qid] = wait_until(lambda: gateway.queued("QUE"), 10, "deferred message")
    assert gateway.cli("queue", "remove", "nosuchid").returncode == 4
    result = gateway.cli("queue", "remove", qid)
    assert result.returncode == 0, result.stderr
    assert gateway.queued() == []
    gateway.wait_log(rf"{qid}: REMOVED")


@pytest.mark.usefixtures("both_delivery_paths")
def test_queue_send_id_delivers_that_message_now(gateway, sink):
    sink.replies["RCPT"] = ["451 4.3.0 later", "451 4.3.0 later", "250 2.1.5 ok"]
    send(gateway, ["first@example.test"])
    send(gateway, ["second@example.test"])
    gateway.wait_log(r"status=deferred", count=2)
    wait_until(lambda: len(gateway.queued("QUE")) == 2, 20, "two deferred messages")
    second = next(q for q in gateway.queued("QUE") if "second@example.test" in open(f"{gateway.queue}/QUE/{q}").read())
    assert gateway.cli("queue", "send", second).returncode == 0
    [got] = sink.wait_for(1)
    assert got.recipients == ["second@example.test"]
    assert len(gateway.queued("QUE")) == 1  # the other one keeps its back-off


def test_eight_bit_converted_for_two_destinations_at_once(make_gateway):
    """Each delivery's 7-bit copy is its own: one destination finishing first must not remove
    (or rewrite) the copy another is about to stream."""
    import time

    fast, slow = Sink(extensions=("PIPELINING",)), Sink(extensions=())

    def hold_rcpt(addr: str) -> None:
        time.sleep(1.5)  # the other delivery ends meanwhile
        return None

    slow.rcpt_reply = hold_rcpt
    try:
        gw = make_gateway(None, extra={"smtpgw.forward": [
            ("ForwardRoute", f"*@one.test [127.0.0.1:{fast.port}]"),
            ("ForwardRoute", f"* [127.0.0.1:{slow.port}]"),
        ]})
        body = "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncafé\r\n"
        send(gw, ["a@one.test", "b@two.test"], body=body.encode(), mail_options=["BODY=8BITMIME"])
        [m1] = fast.wait_for(1)
        [m2] = slow.wait_for(1)
        assert m1.data == m2.data and m1.data.isascii()
        assert "status=deferred" not in gw.log_text()
        wait_until(lambda: not gw.queued(), 10, "empty queue")
    finally:
        fast.close()
        slow.close()


def test_next_hop_down_without_unreachable_cache_is_deferred(make_gateway):
    """UnreachableTTL=0 caches nothing: each hop is still tried once per attempt, then the
    recipients are deferred (never a connect loop that keeps the message in SND)."""
    port = free_port()
    gw = make_gateway(port, extra={"smtpgw.resolve": [("UnreachableTTL", "0")]})
    send(gw, ["x@example.test"])
    gw.wait_log(r"DELIVERED, rcpt=<x@example.test>.*status=deferred", timeout=10)
    wait_until(lambda: gw.queued("QUE"), 10, "message back in QUE")
