"""Regressions found in review: misbehaving peers and bad requests must not wedge the gateway."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import struct
import threading

from tests.support.net import admits, wait_until


def test_next_hop_resetting_after_ehlo_defers_the_message(make_gateway):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:  # greets, answers EHLO, then resets the connection at once
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"220 reset.test ESMTP\r\n")
            conn.recv(1000)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sendall(b"250-reset.test\r\n250 PIPELINING\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        gw = make_gateway(server.getsockname()[1])
        with smtplib.SMTP("127.0.0.1", gw.port) as client:
            client.sendmail("a@b.test", ["x@example.test"], b"Subject: t\r\n\r\nhello\r\n")
        gw.wait_log(r"rcpt=<x@example.test>.*status=deferred")
        wait_until(lambda: gw.queued("QUE") and not gw.queued("SND"), 20, "the message back in QUE")
        assert "unhandled error" not in gw.log_text()
    finally:
        server.close()


def test_a_failing_control_request_does_not_stop_the_control_directory(gateway):
    os.makedirs(gateway.control_path, exist_ok=True)
    with open(os.path.join(gateway.control_path, ".q_bad"), "w") as f:
        json.dump({"op": "release", "message": ".", "sender": "a@b.test", "recipients": ["x@example.test"]}, f)
    answer = os.path.join(gateway.control_path, ".a_bad")
    wait_until(lambda: os.path.exists(answer), 20, "an answer to the bad request")
    with open(answer) as f:
        assert json.load(f)["code"] != 0
    assert gateway.cli("stats").returncode == 0  # later commands still run


def test_a_client_that_never_reads_loses_its_slot(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("ReadTimeout", "2")],
                                        "smtpgw.limits": [("MaximalIncomingSessionsPerIP", "1")]})
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", gw.port))
    hog.sendall(b"EHLO hog.test\r\n" * 20000)  # megabytes of replies it will never read
    try:
        wait_until(lambda: admits(gw.port), 40, "the slot freed after the timeout and the closing grace")
    finally:
        hog.close()
