"""The delivery engine: back-off, queue lifetime, DSN kinds, archives, opportunistic TLS, accounting."""

from __future__ import annotations

import pytest

import email
import email.policy
import json
import os
import smtplib
import subprocess

from tests.support.components import require
from tests.support.net import wait_until


def send(gw, rcpts, body=b"Subject: t\r\n\r\nbody\r\n", sender="a@b.test", **kw):
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        return client.sendmail(sender, rcpts, body, **kw)


def record(gw, state: str, qid: str) -> dict:
    """A queue record; an empty one when it has just moved on to another state."""
    try:
        with open(os.path.join(gw.queue, state, qid)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"recipients": [{"attempts": -1}]}


def test_back_off_grows_between_attempts(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("MinimalBackoffTime", "100"), ("MaximalBackoffTime", "1000")],
                                        "smtpgw.resolve": [("UnreachableTTL", "60")]})
    sink.replies["RCPT"] = ["451 4.3.0 later"]
    send(gw, ["x@example.test"])
    delays = []
    for attempt in range(1, 4):
        if attempt > 1:
            gw.cli("queue", "send-all")
        [qid] = wait_until(lambda: [q for q in gw.queued("QUE") if record(gw, "QUE", q)["recipients"][0]["attempts"] == attempt],
                           20, f"attempt {attempt} recorded")
        data = record(gw, "QUE", qid)
        delays.append(data["next_attempt"] - data["recipients"][0]["last_attempt"])
    assert [round(d) for d in delays] == [100, 200, 400]  # MinimalBackoffTime doubling, up to the maximum


def test_queue_lifetime_expiry_bounces_with_4_4_7(make_gateway, sink):
    gw = make_gateway(sink.port)
    sink.replies["RCPT"] = ["451 4.3.0 later", "250 2.1.5 ok"]
    send(gw, ["x@example.test"])
    gw.wait_log(r"status=deferred")  # the first attempt is over (before it, the record also sits in QUE)
    [qid] = wait_until(lambda: gw.queued("QUE"), 20, "deferred message")
    assert gw.stop() == 0
    path = os.path.join(gw.queue, "QUE", qid)
    with open(path) as f:
        data = json.load(f)
    data["received_at"] -= 6 * 86400  # older than MaximalQueueLifetime (5 days by default)
    with open(path, "w") as f:
        json.dump(data, f)
    gw.start()
    gw.cli("queue", "send-all")
    [bounce] = sink.wait_for(1)
    assert bounce.sender == "" and bounce.recipients == ["a@b.test"]
    assert b"Status: 4.4.7" in bounce.data and b"Action: failed" in bounce.data
    wait_until(lambda: not gw.queued(), 20, "empty queue")


def test_notify_never_and_null_sender_get_no_dsn(gateway, sink):
    sink.rcpt_reply = lambda addr: "550 5.1.1 unknown" if addr.startswith("gone") else None
    c = smtplib.SMTP("127.0.0.1", gateway.port)
    c.ehlo()
    c.sendmail("a@b.test", ["gone1@example.test"], b"Subject: never\r\n\r\nx\r\n", rcpt_options=["NOTIFY=NEVER"])
    c.sendmail("", ["gone2@example.test"], b"Subject: from null sender\r\n\r\nx\r\n")
    c.sendmail("a@b.test", ["ok@example.test"], b"Subject: marker\r\n\r\nx\r\n")
    c.quit()
    gateway.wait_log(r"rcpt=<gone2@example.test>.*status=failed")
    gateway.wait_log(r"rcpt=<ok@example.test>.*status=sent")
    wait_until(lambda: not gateway.queued(), 20, "empty queue")
    assert [m.recipients for m in sink.messages] == [["ok@example.test"]]  # no DSN at all
    assert "DSN, kind" not in gateway.log_text()


def test_delay_and_relayed_success_dsns(make_gateway):
    from tests.support.net import Sink

    plain = Sink(extensions=("PIPELINING", "8BITMIME"))  # no DSN: we report "relayed"
    try:
        gw = make_gateway(plain.port)
        plain.rcpt_reply = lambda addr: "451 4.2.0 busy" if addr.startswith("slow") else None
        c = smtplib.SMTP("127.0.0.1", gw.port)
        c.ehlo()
        c.sendmail("a@b.test", ["slow@example.test"], b"Subject: slow\r\n\r\nx\r\n", rcpt_options=["NOTIFY=DELAY,FAILURE"])
        c.sendmail("a@b.test", ["fast@example.test"], b"Subject: fast\r\n\r\nx\r\n", rcpt_options=["NOTIFY=SUCCESS"])
        c.quit()
        got = plain.wait_for(3)  # fast, its success DSN, the delay DSN about slow
        reports = {}
        for m in got:
            if m.sender == "":
                parsed = email.message_from_bytes(m.data, policy=email.policy.compat32)
                status = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"][0]
                text = status.as_string()
                reports["delayed" if "Action: delayed" in text else "relayed"] = text
        assert "Final-Recipient: rfc822; slow@example.test" in reports["delayed"]
        assert "Will-Retry-Until:" in reports["delayed"]
        assert "Final-Recipient: rfc822; fast@example.test" in reports["relayed"]
        assert "NOTIFY" not in "".join(plain.commands)  # not passed to a peer without DSN
    finally:
        plain.close()


def test_every_accepted_message_is_delivered_or_bounced(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.limits": [("MaximalIncomingMessagesPerSession", "1024")]})
    sink.rcpt_reply = lambda addr: "550 5.1.1 unknown" if addr.startswith("bad") else None
    total = 60
    with smtplib.SMTP("127.0.0.1", gw.port) as c:
        for n in range(total):
            rcpt = f"{'bad' if n % 3 == 0 else 'good'}{n}@example.test"
            c.sendmail(f"s{n}@src.test", [rcpt], f"Subject: m{n}\r\n\r\nx\r\n".encode())
    got = sink.wait_for(total)
    wait_until(lambda: not gw.queued(), 30, "empty queue")
    delivered = {m.recipients[0] for m in got if m.sender}
    bounced_to = {m.recipients[0] for m in got if not m.sender}
    assert len(delivered) == 40 and len(bounced_to) == 20
    assert bounced_to == {f"s{n}@src.test" for n in range(0, total, 3)}


def test_archives_keep_every_message_in_and_out(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.path": [("IncomingArchivePath", "var/arch_in"),
                                                        ("OutgoingArchivePath", "var/arch_out")]})
    send(gw, ["x@example.test"], body=b"Subject: archived\r\n\r\nkeep me\r\n")
    sink.wait_for(1)
    for store, status in (("incoming", "RCV"), ("outgoing", "SNT")):
        def listed() -> str | None:
            out = gw.cli("store", "--path", store, "list").stdout
            return out if f" {status} " in out else None
        assert "a@b.test" in wait_until(listed, 20, f"{store} archive item")


@pytest.mark.usefixtures("both_delivery_paths")
def test_opportunistic_starttls_to_the_next_hop(make_gateway, tls_files):
    """Gateway A relays to gateway B, which offers STARTTLS: A's transaction runs over TLS."""
    from tests.support.net import Sink

    final = Sink()
    try:
        cert, key = tls_files
        b = make_gateway(final.port, name="b", extra={"smtpgw.network": [("TLSCertificateFile", cert), ("TLSKeyFile", key)]})
        a = make_gateway(b.port, name="a")
        send(a, ["x@example.test"])
        [got] = final.wait_for(1)
        assert b"by gw.example.test (smtpgw) with ESMTPS" in got.data
    finally:
        final.close()


def test_queue_manager_under_load(make_gateway, sink):
    source = require("smtp-source", "postfix")
    gw = make_gateway(sink.port, extra={"smtpgw.limits": [("MaximalIncomingSessionsPerIP", "64")]})
    sink.replies["RCPT"] = ["451 4.3.0 hold everything"]
    load = subprocess.Popen([source, "-s", "10", "-m", "200", "-l", "1024", "-f", "load@src.test",
                             "-t", "x@example.test", f"127.0.0.1:{gw.port}"], stdout=subprocess.DEVNULL)
    try:
        listed = gw.cli("queue", "list")
        assert listed.returncode == 0
        wait_until(lambda: len(gw.queued("QUE")) >= 20, 60, "deferred messages")
        victims = gw.queued("QUE")[:10]
        for qid in victims:
            result = gw.cli("queue", "remove", qid)
            assert result.returncode in (0, 4), result.stderr  # 4: it was being sent at that moment
        assert load.wait(120) == 0
    finally:
        if load.poll() is None:
            load.kill()
    listing = gw.cli("queue", "list").stdout
    removed = [q for q in victims if q not in listing]
    assert removed and all(q not in gw.queued() for q in removed)
    assert gw.cli("queue", "remove-all").returncode == 0
    wait_until(lambda: not gw.queued("QUE"), 20, "remove-all done")
    assert "-- 0 message(s)" in gw.cli("queue", "list").stdout or gw.queued("SND")


def test_a_next_hop_that_stops_reading_meets_the_write_timeout(make_gateway):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    release = threading.Event()

    def stall() -> None:  # answers until DATA, then never reads again
        conn, _ = server.accept()
        f = conn.makefile("rb")
        conn.sendall(b"220 stall.test\r\n")
        for line in f:
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-stall.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go\r\n")
                release.wait(60)  # hold the connection open, reading nothing
                conn.close()
                return
            else:
                conn.sendall(b"250 ok\r\n")

    threading.Thread(target=stall, daemon=True).start()
    try:
        gw = make_gateway(server.getsockname()[1], extra={
            "smtpgw.timeouts": [("WriteTimeout", "1")],
            "smtpgw.limits": [("MaximalIncomingMessageSize", "60000"), ("MaximalIncomingSessionSize", "60000")]})
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 30000  # 30 MB: more than the socket buffers
        send(gw, ["x@example.test"], body=big)
        gw.wait_log(r"rcpt=<x@example.test>.*status=deferred.*timeout writing to", timeout=60)
    finally:
        release.set()
        server.close()
