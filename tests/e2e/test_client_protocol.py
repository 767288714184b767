"""The SMTP client against next hops that misbehave in ways a real MTA meets: scripted peers on loopback.

Each test writes the peer's side of the conversation (``ScriptedPeer``), so it can say what
``Sink`` cannot: a DATA answered without 354, a 421 that closes the session, a STARTTLS whose
handshake fails, a peer that reads the message slowly.
"""

from __future__ import annotations

import smtplib
import socket
import threading
from typing import Callable

from tests.support.net import wait_until


class PeerIO:
    """One accepted connection, line by line."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.file = conn.makefile("rb")
        self.commands: list[str] = []

    def send(self, text: str) -> None:
        self.conn.sendall(text.encode())

    def line(self) -> str | None:
        raw = self.file.readline(65536)
        if not raw:
            return None
        line = raw.decode("latin-1").rstrip("\r\n")
        self.commands.append(line)
        return line

    def body(self) -> bytes:
        """The message up to the lone dot, unstuffed."""
        lines = []
        for raw in self.file:
            if raw == b".\r\n":
                break
            lines.append(raw[1:] if raw.startswith(b".") else raw)
        return b"".join(lines)

    def greet(self, extensions: tuple[str, ...]) -> None:
        """220, then the EHLO reply offering ``extensions``."""
        self.send("220 peer.test ESMTP\r\n")
        assert (self.line() or "").upper().startswith("EHLO")
        lines = ["peer.test", *extensions]
        self.send("".join(f"250{'-' if i < len(lines) - 1 else ' '}{l}\r\n" for i, l in enumerate(lines)))

    def close(self) -> None:
        try:
            self.file.close()  # the socket stays open while its file does
            self.conn.close()
        except OSError:
            pass


class ScriptedPeer:
    """A next hop whose sessions the test writes: ``session(io, index)`` for the index-th connection."""

    def __init__(self, session: Callable[[PeerIO, int], None], rcvbuf: int | None = None) -> None:
        self.session = session
        self.sessions: list[PeerIO] = []
        self.errors: list[BaseException] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # set before listen: accepted sockets inherit it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        index = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            io = PeerIO(conn)
            self.sessions.append(io)
            threading.Thread(target=self._run, args=(io, index), daemon=True).start()
            index += 1

    def _run(self, io: PeerIO, index: int) -> None:
        try:
            self.session(io, index)
        except OSError:
            pass
        except BaseException as exc:  # an assertion in the script: reported by the test
            self.errors.append(exc)
        finally:
            io.close()

    def close(self) -> None:
        try:
            # wakes the thread blocked in accept(): on Linux close() alone leaves the port listening
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def serve_rest(io: PeerIO, received: list[bytes] | None = None) -> None:
    """A plain, well-behaved peer from here on (one command at a time)."""
    while (line := io.line()) is not None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "DATA":
            io.send("354 go ahead\r\n")
            data = io.body()
            if received is not None:
                received.append(data)
            io.send("250 2.0.0 queued\r\n")
        elif verb == "QUIT":
            io.send("221 2.0.0 bye\r\n")
            return
        else:
            io.send("250 2.0.0 ok\r\n")


def send(gw, rcpts, body=b"Subject: t\r\n\r\nbody\r\n", sender="a@b.test"):
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail(sender, rcpts, body)


def test_data_answered_without_354_is_not_a_delivery(make_gateway):
    """RFC 5321 §4.1.1.4 / §4.3.2: DATA's positive reply is 354; a 250 in its place means the
    message was never transferred, so the recipients stay pending (never "sent")."""
    bodies: list[bytes] = []

    def session(io: PeerIO, index: int) -> None:
        io.greet(("8BITMIME",))
        if index == 0:
            assert (io.line() or "").startswith("MAIL")
            io.send("250 2.1.0 ok\r\n")
            assert (io.line() or "").startswith("RCPT")
            io.send("250 2.1.5 ok\r\n")
            assert io.line() == "DATA"
            io.send("250 2.0.0 ok\r\n")  # no 354: the body was never asked for
        serve_rest(io, bodies)

    peer = ScriptedPeer(session)
    try:
        gw = make_gateway(peer.port)
        send(gw, ["x@example.test"])
        [line] = gw.wait_log(r"DELIVERED, rcpt=<x@example.test>")
        assert "status=deferred" in line, line
        assert not bodies
        assert not peer.errors
    finally:
        peer.close()


def test_421_closes_the_session_and_the_next_message_gets_a_new_one(make_gateway):
    """RFC 5321 §3.8: a 421 says the server closes the channel. The connection is not reused:
    a message waiting for it goes over a new connection instead of failing on the dead one."""
    release = threading.Event()
    received: list[bytes] = []

    def session(io: PeerIO, index: int) -> None:
        io.greet(("PIPELINING", "8BITMIME"))
        if index == 0:
            for expected in ("MAIL", "RCPT", "DATA"):
                assert (io.line() or "").startswith(expected)
            io.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
            io.body()
            assert release.wait(30)
            io.send("421 4.3.2 peer.test shutting down\r\n")
            return  # and closes, as §3.8 allows after a 421
        serve_rest(io, received)

    peer = ScriptedPeer(session)
    try:
        gw = make_gateway(peer.port, extra={"smtpgw.limits": [("MaximalOutgoingSessionsPerHost", "1")]})
        send(gw, ["first@example.test"], body=b"Subject: first\r\n\r\nx\r\n")
        send(gw, ["second@example.test"], body=b"Subject: second\r\n\r\nx\r\n")
        # both in flight: the second waits for the only connection the first is using
        wait_until(lambda: len(gw.queued("SND")) == 2, 20, "both messages in SND")
        release.set()
        [first] = gw.wait_log(r"DELIVERED, rcpt=<first@example.test>")
        assert "status=deferred" in first and "421 4.3.2" in first, first
        [second] = gw.wait_log(r"DELIVERED, rcpt=<second@example.test>")
        assert "status=sent" in second, second
        assert len(received) == 1 and b"Subject: second" in received[0]
        assert not peer.errors
    finally:
        release.set()
        peer.close()


def test_failed_starttls_handshake_falls_back_to_plaintext(make_gateway):
    """Opportunistic TLS (RFC 7435 §1.3, Postfix's smtp_tls_security_level=may): a peer that offers
    STARTTLS but cannot complete the handshake still gets the mail, over a new plaintext session."""
    received: list[bytes] = []

    def session(io: PeerIO, index: int) -> None:
        io.greet(("STARTTLS", "8BITMIME"))
        if index == 0:
            assert io.line() == "STARTTLS"
            io.send("220 2.0.0 ready to start TLS\r\n")
            assert io.file.read1(4096)  # the client hello
            io.send("this is not a TLS server hello\r\n")  # the handshake fails
            return
        serve_rest(io, received)

    peer = ScriptedPeer(session)
    try:
        gw = make_gateway(peer.port)
        send(gw, ["x@example.test"])
        [line] = gw.wait_log(r"DELIVERED, rcpt=<x@example.test>")
        assert "status=sent" in line, line
        assert len(received) == 1
        assert len(peer.sessions) == 2 and "STARTTLS" not in peer.sessions[1].commands
        assert not peer.errors
    finally:
        peer.close()


def test_slow_transfer_is_not_cut_by_the_end_of_data_timeout(make_gateway):
    """SendingDataTerminationTimeout is the wait for the reply after the end of data (kmg-spec
    §3.10, Postfix's smtp_data_done_timeout); a transfer that keeps moving is bounded by
    WriteTimeout per write, not by it. The peer here stops reading for a while mid-message, as a
    slow link does; the message still goes through."""
    import time

    received: list[bytes] = []

    def session(io: PeerIO, index: int) -> None:
        io.greet(("8BITMIME",))
        for expected in ("MAIL", "RCPT", "DATA"):
            assert (io.line() or "").startswith(expected)
            io.send("354 go ahead\r\n" if expected == "DATA" else "250 ok\r\n")
        io.file.read(256 * 1024)
        time.sleep(2.5)  # a slow link, not a synchronisation: the gateway's buffers are full meanwhile
        received.append(io.body())
        io.send("250 2.0.0 queued\r\n")
        serve_rest(io)

    peer = ScriptedPeer(session, rcvbuf=4096)
    try:
        gw = make_gateway(peer.port, extra={"smtpgw.timeouts": [("SendingDataTerminationTimeout", "1")]})
        body = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 100_000  # 8 MB: more than the socket buffers
        send(gw, ["x@example.test"], body=body)
        [line] = gw.wait_log(r"DELIVERED, rcpt=<x@example.test>", timeout=60)
        assert "status=sent" in line, line
        assert received and received[0].endswith(b"z" * 78 + b"\r\n")
        assert not peer.errors
    finally:
        peer.close()


def test_no_remote_mta_in_a_dsn_when_no_next_hop_was_reached(make_gateway, sink):
    """RFC 3464 §2.3.5: Remote-MTA names the MTA that reported the status. When no next hop
    could be reached there is none, and the DSN says nothing rather than "dns; none"."""
    from tests.support.net import free_port

    down = free_port()
    gw = make_gateway(None, extra={"smtpgw.forward": [
        ("ForwardRoute", f"*@example.test [127.0.0.1:{down}]"),
        ("ForwardRoute", f"* [127.0.0.1:{sink.port}]"),
    ]})
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.ehlo()
        client.sendmail("a@b.test", ["x@example.test"], b"Subject: t\r\n\r\nbody\r\n",
                        rcpt_options=["NOTIFY=DELAY,FAILURE"])
    [report] = sink.wait_for(1)  # the delay DSN
    assert report.sender == "" and b"Action: delayed" in report.data
    assert b"Remote-MTA" not in report.data, report.data.decode()
