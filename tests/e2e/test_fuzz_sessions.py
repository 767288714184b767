"""Seeded hostile SMTP sessions (tests/support/fuzz.py): unstructured garbage, and plausible transactions
mutated in their verbs, arguments, ESMTP parameters, pipelining, line lengths and line ends, with
torture-set messages as DATA. Every byte the gateway sends is an SMTP reply line, every session ends,
nothing reaches the log as a traceback, and the gateway keeps serving."""

from __future__ import annotations

import random
import smtplib
import socket

from tests.support import fuzz
from tests.support.net import wait_until


def test_garbage_sessions_never_break_the_gateway(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("ReadTimeout", "2")],
                                        "smtpgw.limits": [("MaximalIncomingSessionsPerIP", "64")]})
    rng = random.Random(20261129)
    for _ in range(150):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
            conn.recv(512)
            try:
                conn.sendall(fuzz.garbage(rng))
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


def test_mutated_transactions_get_only_smtp_replies(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("ReadTimeout", "2")],
                                        "smtpgw.limits": [("MaximalIncomingSessionsPerIP", "64")]})
    rng = random.Random(20261207)
    messages = fuzz.load_seeds(fuzz.CORPUS + "/mime-torture")
    outcomes = set()
    for _ in range(40):
        stream, took, ended = fuzz.run_session(gw.port, fuzz.session_script(rng, messages), timeout=15)
        assert ended, f"session still open after {took:.1f} s"
        assert fuzz.check_replies(stream) is None, stream[-500:]
        outcomes.add(fuzz.reply_codes(stream))
    assert len(outcomes) > 15, outcomes  # the mutations reach many different dialogues
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", ["x@example.test"], b"Subject: still serving\r\n\r\nok\r\n")
    wait_until(lambda: any(b"still serving" in m.data for m in sink.messages), 20, "the last message at the sink")
    log = gw.log_text()
    assert "Traceback" not in log and "unhandled error" not in log
