"""Every receiving limit of [smtpgw.limits] and [smtpgw.timeouts], through real SMTP sessions."""

from __future__ import annotations

import os
import smtplib

from tests.support.net import RawClient, wait_until


def session(port: int, source: str | None = None) -> RawClient:
    c = RawClient(port, source=source)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def send_data(c: RawClient, data: bytes) -> tuple[int, str]:
    assert c.cmd("DATA")[0] == 354
    c.send(data + b".\r\n")
    return c.reply()


def stats(gw) -> dict[str, int]:
    import os

    path = os.path.join(gw.folder, "var", "stats")
    gw.control(".c_stats")
    from tests.support.net import wait_until

    wait_until(lambda: os.path.exists(path) and not os.path.exists(os.path.join(gw.control_path, ".c_stats")), 10, "stats dump")
    with open(path) as f:
        return {k: int(v) if v.isdigit() else 0 for k, v in (line.strip().split("=", 1) for line in f if "=" in line)}


def limits_gateway(make_gateway, sink, **limits):
    items = [(k, str(v)) for k, v in limits.items()]
    return make_gateway(sink.port, extra={"smtpgw.limits": items, "smtpgw.options": [("StatFilename", "var/stats")]})


def test_declared_size_too_large_is_refused_at_mail(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalIncomingMessageSize=64)
    c = session(gw.port)
    code, text = c.cmd(f"MAIL FROM:<a@b.test> SIZE={64 * 1024 + 1}")
    assert (code, text.split()[0]) == (552, "5.3.4")
    assert c.cmd(f"MAIL FROM:<a@b.test> SIZE={64 * 1024}")[0] == 250


def test_actual_size_overflow_is_refused_after_end_of_data(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalIncomingMessageSize=64)
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 70
    code, text = send_data(c, big)
    assert (code, text.split()[0]) == (552, "5.3.4")
    # the session goes on: a small message is accepted
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert send_data(c, b"Subject: small\r\n\r\nok\r\n")[0] == 250
    assert len(sink.wait_for(1)) == 1
    assert stats(gw)["mta_receivings_refused_for_message_size_limit"] == 1


def test_session_size_limit(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalIncomingSessionSize=64, MaximalIncomingMessageSize=64)
    c = session(gw.port)
    chunk = b"Subject: part\r\n\r\n" + (b"y" * 998 + b"\r\n") * 40  # 40 KB
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert send_data(c, chunk)[0] == 250
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    code, text = send_data(c, chunk)
    # The message itself fits: refusing it for the session is temporary (RFC 5321 §4.2.1), or the
    # client would bounce mail it can deliver on a new connection.
    assert (code, text.split()[0]) == (452, "4.3.1")
    assert "ession" in text
    code, text = c.cmd(f"MAIL FROM:<a@b.test> SIZE={len(chunk)}")  # declared: refused at MAIL, as temporarily
    assert (code, text.split()[0]) == (452, "4.3.1")
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert send_data(c, chunk)[0] == 250  # the same message in a new session
    assert len(sink.wait_for(2)) == 2
    assert stats(gw)["mta_receivings_refused_for_session_size_limit"] == 2


def test_messages_per_session(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalIncomingMessagesPerSession=2)
    c = session(gw.port)
    for _ in range(2):
        c.cmd("MAIL FROM:<a@b.test>")
        c.cmd("RCPT TO:<x@example.test>")
        assert send_data(c, b"Subject: m\r\n\r\nm\r\n")[0] == 250
    code, text = c.cmd("MAIL FROM:<a@b.test>")
    assert (code, text.split()[0]) == (421, "4.7.0")
    assert c.closed()


def test_recipients_per_message(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalIncomingRcptsPerMessage=2)
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test>")
    assert c.cmd("RCPT TO:<x1@example.test>")[0] == 250
    assert c.cmd("RCPT TO:<x2@example.test>")[0] == 250
    code, text = c.cmd("RCPT TO:<x3@example.test>")
    assert (code, text.split()[0]) == (452, "4.5.3")  # RFC 5321 §4.5.3.1.10
    assert send_data(c, b"Subject: r\r\n\r\nr\r\n")[0] == 250
    [got] = sink.wait_for(1)
    assert got.recipients == ["x1@example.test", "x2@example.test"]


def test_recipients_over_the_limit_do_not_end_the_session(make_gateway, sink):
    """RFC 5321 §4.5.3.1.10: the client delivers to the recipients accepted and retries the others;
    the 452s for a pipelined list longer than the limit are not client errors (Postfix:
    smtpd_recipient_overshoot_limit), so they must not spend the error budget and drop the session."""
    gw = limits_gateway(make_gateway, sink, MaximalIncomingRcptsPerMessage=2, MaximalIncomingErrors=3)
    c = session(gw.port)
    c.send("MAIL FROM:<a@b.test>\r\n" + "".join(f"RCPT TO:<x{i}@example.test>\r\n" for i in range(8)) + "DATA\r\n")
    assert c.reply()[0] == 250
    codes = [c.reply()[0] for _ in range(8)]
    assert codes == [250, 250] + [452] * 6
    assert c.reply()[0] == 354
    c.send(b"Subject: many\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    [got] = sink.wait_for(1)
    assert got.recipients == ["x0@example.test", "x1@example.test"]


def test_hop_count_loop_detection(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalIncomingHops=3)
    c = session(gw.port)
    hops = b"".join(b"Received: from h%d.test by h%d.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i) for i in range(4))
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    code, text = send_data(c, hops + b"Subject: loop\r\n\r\nbody\r\n")
    assert (code, text.split()[0]) == (554, "5.4.6")
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    # three trace fields are fine, and "Received:" in the body does not count
    body = hops[: hops.index(b"Received: from h3")] + b"Subject: ok\r\n\r\nReceived: not a header\r\n"
    assert send_data(c, body)[0] == 250
    assert stats(gw)["mta_receivings_refused_for_hops_limit"] == 1


def test_total_and_per_ip_sessions(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, IncomingSessions=3, MaximalIncomingSessionsPerIP=2)
    a, b = RawClient(gw.port), RawClient(gw.port)
    assert a.reply()[0] == 220 and b.reply()[0] == 220
    c = RawClient(gw.port)
    code, text = c.reply()
    assert (code, text.split()[0]) == (421, "4.7.0")  # per-IP limit
    assert c.closed()
    # another loopback address is another client
    d = RawClient(gw.port, source="127.0.0.2")
    assert d.reply()[0] == 220
    e = RawClient(gw.port, source="127.0.0.3")
    code, text = e.reply()
    assert (code, text.split()[0]) == (421, "4.3.2")  # the total limit of 3 is reached
    a.close()




def test_long_command_line_and_long_data_line(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink)
    c = session(gw.port)
    code, text = c.cmd("NOOP " + "x" * 5000)
    assert (code, text.split()[0]) == (500, "5.5.2")
    assert c.cmd("NOOP")[0] == 250  # the rest of the long line was discarded
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    code, text = send_data(c, b"Subject: long\r\n\r\n" + b"z" * 1001 + b"\r\n")
    assert (code, text.split()[0]) == (500, "5.5.6")  # RFC 5321 §4.5.3.1.6
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert send_data(c, b"Subject: fits\r\n\r\n" + b"z" * 998 + b"\r\n")[0] == 250
    # RFC 5321 §4.5.3.1.6: the limit does not count the leading dot duplicated for transparency
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert send_data(c, b"Subject: stuffed\r\n\r\n.." + b"s" * 997 + b"\r\n")[0] == 250
    [stuffed] = [m for m in sink.wait_for(2) if b"Subject: stuffed" in m.data]  # delivery order is free
    assert stuffed.data.endswith(b"\r\n\r\n." + b"s" * 997 + b"\r\n")
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    code, text = send_data(c, b"Subject: stuffed, too long\r\n\r\n.." + b"s" * 998 + b"\r\n")
    assert (code, text.split()[0]) == (500, "5.5.6")


def unread_by_gateway(c: RawClient) -> int:
    """Bytes the client sent that wait in the gateway's receive queue (/proc/net/tcp rx_queue)."""
    local = "%08X:%04X" % (0x0100007F, c.sock.getpeername()[1])  # 127.0.0.1, little-endian as the kernel shows it
    remote = "%08X:%04X" % (0x0100007F, c.sock.getsockname()[1])
    with open("/proc/net/tcp") as f:
        for line in f:
            fields = line.split()
            if fields[1:3] == [local, remote]:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError("no gateway side socket for this client")


def test_long_command_line_arriving_in_pieces_gets_one_reply(make_gateway, sink):
    """RFC 2920 §3.1: one reply per command, however many reads an over-long line takes."""
    gw = limits_gateway(make_gateway, sink)
    c = session(gw.port)
    c.send(b"NOOP " + b"x" * 3000)
    code, text = c.reply()
    assert (code, text.split()[0]) == (500, "5.5.2")
    for piece in (b"y" * 3000, b"z" * 3000):  # read by the gateway one at a time
        c.send(piece)
        wait_until(lambda: unread_by_gateway(c) == 0, 10, "the gateway reading the piece")
    c.send(b"\r\nNOOP\r\n")
    assert c.reply()[0] == 250  # the NOOP's reply, not another 500 for the same line


def test_junk_command_budget(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalJunkCommands=3)
    c = session(gw.port)
    for _ in range(3):
        assert c.cmd("NOOP")[0] == 250
    code, text = c.cmd("NOOP")
    assert (code, text.split()[0]) == (421, "4.7.0") and "junk" in text
    assert c.closed()


def test_error_budget(make_gateway, sink):
    gw = limits_gateway(make_gateway, sink, MaximalIncomingErrors=3)
    c = session(gw.port)
    assert c.cmd("RCPT TO:<x@example.test>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    code, _ = c.cmd("MAIL FROM:<bad")
    assert code == 501
    assert c.reply()[0] == 421
    assert c.closed()


def test_command_timeout(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("ReceivingCommandTimeout", "1")]})
    c = session(gw.port)
    code, text = c.reply()  # nothing sent: the gateway gives up first
    assert (code, text.split()[0]) == (421, "4.4.2")
    assert c.closed()


def test_data_termination_timeout_discards_the_message(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("ReceivingDataTerminationTimeout", "1")]})
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: never finished\r\n\r\npart")
    assert c.reply()[0] == 421
    assert gw.queued() == []
    import os

    from tests.support.net import wait_until

    tmp = os.path.join(gw.queue, "tmp")

    def dropped() -> bool:
        """The partial message's bytes are gone (tmp/ keeps only empty files made ahead of need);
        a file removed between the listing and its size is gone too."""
        for name in os.listdir(tmp):
            try:
                if os.path.getsize(os.path.join(tmp, name)):
                    return False
            except FileNotFoundError:
                pass
        return True

    wait_until(dropped, 10, "partial data dropped")


def test_bounded_memory_for_fifty_mib(make_gateway, sink):
    """A 50 MiB message streams to disk: the gateway's peak RSS does not grow with it."""
    gw = limits_gateway(make_gateway, sink, MaximalIncomingMessageSize=60000, MaximalIncomingSessionSize=60000)
    pid = gw.proc.pid

    def peak_rss_kib() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", ["x@example.test"], b"Subject: warm up\r\n\r\nsmall\r\n")
    sink.wait_for(1)
    before = peak_rss_kib()
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test> SIZE=52428800")
    c.cmd("RCPT TO:<x@example.test>")
    assert c.cmd("DATA")[0] == 354
    line = b"0123456789" * 7 + b"abcdef\r\n"  # 78 octets
    block = line * 13443  # about 1 MiB
    c.send(b"Subject: fifty\r\n\r\n")
    for _ in range(50):
        c.send(block)
    c.send(b".\r\n")
    assert c.reply()[0] == 250
    got = sink.wait_for(2, timeout=120)
    assert len(got[1].data) > 50 * len(block)
    grown = peak_rss_kib() - before
    assert grown < 20 * 1024, f"peak RSS grew by {grown} KiB for a 50 MiB message"


def test_queue_disk_space_limit_answers_452(make_gateway, sink):
    free_mib = os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize // (1 << 20)
    gw = limits_gateway(make_gateway, sink, MinimalQueueFreeSpaceSize=min(1000000, free_mib + 1000))
    c = session(gw.port)
    code, text = c.cmd("MAIL FROM:<a@b.test>")
    assert (code, text.split()[0]) == (452, "4.3.1")  # RFC 5321 §4.5.3.1.10-style: try later


def test_data_initiation_timeout(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.timeouts": [("ReceivingDataInitiationTimeout", "1")]})
    c = session(gw.port)
    c.cmd("MAIL FROM:<a@b.test>")
    c.cmd("RCPT TO:<x@example.test>")
    code, text = c.reply()  # no DATA within a second
    assert (code, text.split()[0]) == (421, "4.4.2")


def test_malformed_messages_are_counted(make_gateway, sink):
    """kmg-spec §7.2 ``mta_malformed_messages``: incoming messages refused for their form
    (bare CR or LF, RFC 5321 §2.3.8; a line over 1000 octets, §4.5.3.1.6; NUL, RFC 2045 §2.8) count there."""
    gw = limits_gateway(make_gateway, sink)
    c = session(gw.port)
    for body, code in ((b"bare\rreturn\r\n", 550), (b"x" * 1200 + b"\r\n", 500), (b"nul\0\r\n", 550)):
        assert c.cmd("MAIL FROM:<a@b.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.test>")[0] == 250
        assert send_data(c, b"Subject: malformed\r\n\r\n" + body)[0] == code
    counters = stats(gw)
    assert counters["mta_malformed_messages"] == 3
    assert counters["mta_receivings_refused_for_bare_newline"] == 1
    assert counters["mta_receivings_refused_for_line_length"] == 1
    assert counters["mta_receivings_refused_for_nul_character"] == 1
