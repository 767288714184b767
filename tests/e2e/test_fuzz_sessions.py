"""Seeded garbage on SMTP sessions: every input gets an SMTP reply or a closed connection, never a
traceback in the log, and the gateway keeps serving."""

from __future__ import annotations

import random
import smtplib
import socket

VERBS = [b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"HELP",
         b"STARTTLS", b"BDAT", b"AUTH", b"\x00", b"\xff\xfe", b"."]


def garbage(rng: random.Random) -> bytes:
    pieces = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.4:
            pieces.append(rng.choice(VERBS) + b" " + bytes(rng.randrange(256) for _ in range(rng.randint(0, 60))))
        elif kind < 0.6:
            pieces.append(b"<" + bytes(rng.randrange(33, 127) for _ in range(rng.randint(0, 300))) + b">")
        elif kind < 0.8:
            pieces.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))))
        else:
            pieces.append(rng.choice([b"\r\n", b"\n", b"\r", b"\r\n.\r\n", b".\r\n", b"\r\r\n"]))
        pieces.append(rng.choice([b"\r\n", b"\n", b""]))
    return b"".join(pieces)


def test_garbage_sessions_never_break_the_gateway(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("ReadTimeout", "2")],
                                        "smtpgw.limits": [("MaximalIncomingSessionsPerIP", "64")]})
    rng = random.Random(20261129)
    for _ in range(150):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
            conn.recv(512)
            try:
                conn.sendall(garbage(rng))
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # read replies until the gateway closes (bounded by ReadTimeout)
                    pass
            except OSError:
                pass  # the gateway may close first (junk or error budget)
    with smtplib.SMTP("127.0.0.1", gw.port) as client:  # still serving
        client.sendmail("a@b.test", ["x@example.test"], b"Subject: after the storm\r\n\r\nok\r\n")
    sink.wait_for(1)
    log = gw.log_text()
    assert "Traceback" not in log and "unhandled error" not in log and "session with" not in log
