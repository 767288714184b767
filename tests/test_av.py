"""The clamd client and server pool (smtpgw.av) against a real private clamd."""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from smtpgw.scan.clamd import (
    CHUNK,
    ClamdPool,
    ClamdServer,
    EngineVersion,
    ScannerUnavailable,
    parse_version,
    status_for_name,
)
from tests.support.clamd import (
    CUSTOM_NAME,
    EICAR_NAME,
    SUSPECT_NAME,
    ClamdInstance,
    eicar,
    custom_marker,
    encrypted_zip,
    start_clamd,
    suspect_marker,
)
from tests.support.components import require, which
from tests.support.net import free_port


def dead_unix_address(tmp_path: os.PathLike[str]) -> str:
    return f"unix:{os.path.join(tmp_path, 'nobody-listens.sock')}"


def test_parse_version_with_and_without_databases() -> None:
    full = parse_version("ClamAV 1.4.6/27500/Tue Dec 10 09:35:09 2024")
    assert full == EngineVersion("1.4.6", "27500", "20241210")
    assert str(full) == "1.4.6/27500 20241210"
    assert parse_version("ClamAV 0.103.8/26800/Mon Feb  6 09:20:01 2023").db_date == "20230206"
    assert str(parse_version("ClamAV 1.4.6")) == "1.4.6"


@pytest.mark.parametrize(
    "name, status",
    [
        ("Win.Test.EICAR_HDB-1", "infected"),
        ("Smtpgw.Test.Custom.UNOFFICIAL", "infected"),
        ("Heuristics.Encrypted.Zip", "protected"),
        ("Heuristics.Encrypted.PDF", "protected"),
        ("Heuristics.Phishing.Email.SpoofedDomain", "suspicious"),
        ("PUA.Win.Packer.Upx", "suspicious"),
        ("Win.Trojan.Suspect-1", "suspicious"),
        ("Heuristics.Limits.Exceeded.MaxFileSize", "error"),
    ],
)
def test_status_for_name(name: str, status: str) -> None:
    assert status_for_name(name) == status


@pytest.mark.parametrize("which_address", ["unix_address", "tcp_address"])
def test_ping_version_and_verdicts(clamd: ClamdInstance, which_address: str) -> None:
    server = ClamdServer(getattr(clamd, which_address))
    server.ping()
    assert server.version().engine.count(".") >= 1
    assert server.instream(b"nothing to see", 10).status == "clean"
    verdict = server.instream(eicar(), 10)
    assert (verdict.status, verdict.names) == ("infected", (EICAR_NAME,))
    assert server.instream(b"x" + custom_marker(), 10).names == (CUSTOM_NAME,)
    verdict = server.instream(suspect_marker(), 10)
    assert (verdict.status, verdict.names) == ("suspicious", (SUSPECT_NAME,))
    verdict = server.instream(encrypted_zip("a.txt", b"secret", b"pw"), 10)
    assert (verdict.status, verdict.names) == ("protected", ("Heuristics.Encrypted.Zip",))


def test_instream_chunks_reach_clamd_whole(clamd: ClamdInstance) -> None:
    # the signature straddles a chunk border: only a correctly reassembled stream matches
    data = b"a" * (CHUNK * 3 - 30) + eicar() + b"b" * 1000
    verdict = ClamdServer(clamd.unix_address).instream(data, 30)
    assert verdict.names == (EICAR_NAME,)


def test_streams_of_every_size_keep_one_session_in_step(clamd: ClamdInstance) -> None:
    # up to CHUNK a stream goes in one write with its end mark; an empty one, the end mark alone;
    # a request framed wrong would shift every later reply of the session
    server = ClamdServer(clamd.unix_address)
    sizes = (0, 1, CHUNK - len(eicar()), CHUNK - len(eicar()) + 1, 2 * CHUNK)
    for size in sizes:
        assert server.instream(b"c" * size, 10).status == "clean"
        assert server.instream(b"c" * max(size - len(eicar()), 0) + eicar(), 10).names == (EICAR_NAME,)
    assert (server.sessions_opened, server.requests) == (1, 2 * len(sizes))


def test_stream_over_stream_max_length_is_an_error(clamd: ClamdInstance) -> None:
    pool = ClamdPool([clamd.tcp_address], scan_timeout=30)
    verdict = pool.scan(os.urandom(5 << 20))  # the fixture's StreamMaxLength is 4M
    assert verdict.status == "error" and "size limit" in verdict.detail
    assert pool.scan(eicar()).status == "infected"  # the server is not marked down


def test_scans_share_one_session(clamd: ClamdInstance) -> None:
    # without IDSESSION clamd closes the connection after each reply: a second scan would need a new one
    server = ClamdServer(clamd.unix_address)
    verdicts = [server.instream(data, 10) for data in (b"clean", eicar(), b"x" + custom_marker(), b"clean too")]
    assert [v.status for v in verdicts] == ["clean", "infected", "infected", "clean"]
    assert verdicts[2].names == (CUSTOM_NAME,)
    assert (server.sessions_opened, server.requests) == (1, 4)


def test_threads_sharing_a_server_scan_side_by_side(clamd: ClamdInstance) -> None:
    # the kept session serves one thread at a time; the others each use a connection of their own
    server = ClamdServer(clamd.unix_address)
    samples = [b"clean", eicar(), b"x" + custom_marker(), b"clean too"] * 10
    with ThreadPoolExecutor(4) as threads:
        statuses = list(threads.map(lambda data: server.instream(data, 30).status, samples))
    assert statuses == ["clean", "infected", "infected", "clean"] * 10
    assert server.session is not None and not server.session_lock.locked()


def test_a_clamd_restart_between_scans_reconnects(clamd_factory: Callable[..., ClamdInstance]) -> None:
    instance = clamd_factory()
    for address in (instance.unix_address, instance.tcp_address):
        pool = ClamdPool([address], retry_after=3600)
        assert pool.scan(eicar()).status == "infected"
        instance.restart()
        assert pool.scan(eicar()).status == "infected"
        assert pool.scan(b"clean").status == "clean"
        server = pool.servers[0]
        assert (server.sessions_opened, server.down_until, server.failure) == (2, 0.0, "")


def test_a_session_clamd_timed_out_is_reopened(clamd_factory: Callable[..., ClamdInstance]) -> None:
    instance = clamd_factory(extra=["ReadTimeout 1"])  # clamd's limit on a session's wait for a command
    pool = ClamdPool([instance.unix_address])
    assert pool.scan(b"clean").status == "clean"
    server = pool.servers[0]
    assert server.session is not None
    ready, _, _ = select.select([server.session], [], [], 30)  # clamd says so, then closes it
    assert ready and server.session.recv(100, socket.MSG_PEEK).startswith(b"COMMAND READ TIMED OUT")
    assert pool.scan(eicar()).status == "infected"
    assert (server.sessions_opened, server.down_until) == (2, 0.0)


def test_a_dropped_session_is_sent_again_once(clamd: ClamdInstance) -> None:
    # the session looks alive when the scan starts and dies while it is sent (clamd ended it at
    # that moment): the stream got no reply, and goes once more over a fresh connection
    server = ClamdServer(clamd.tcp_address)
    assert server.instream(b"clean", 10).status == "clean"
    assert server.session is not None
    server.session.close()
    server.session, peer = socket.socketpair()

    def end_on_first_bytes() -> None:
        peer.recv(16)
        peer.close()

    closer = threading.Thread(target=end_on_first_bytes)
    closer.start()
    assert server.instream(eicar(), 10).status == "infected"
    closer.join(10)
    assert (server.sessions_opened, server.requests) == (2, 1)


def test_a_scan_failing_on_a_fresh_session_fails_the_server(clamd_factory: Callable[..., ClamdInstance]) -> None:
    instance = clamd_factory()
    pool = ClamdPool([instance.unix_address], retry_after=3600)
    assert pool.scan(b"clean").status == "clean"
    instance.kill()
    with pytest.raises(ScannerUnavailable):
        pool.scan(eicar())  # never clean: the caller keeps the message queued
    assert pool.servers[0].session is None and pool.servers[0].down_until > 0


def test_reload(clamd: ClamdInstance) -> None:
    pool = ClamdPool([clamd.unix_address])
    assert pool.reload() == {clamd.unix_address: "RELOADING"}
    assert pool.scan(eicar()).status == "infected"


def test_failover_to_the_next_server(clamd: ClamdInstance, tmp_path: os.PathLike[str]) -> None:
    now = [1000.0]
    dead_tcp = f"127.0.0.1:{free_port()}"
    addresses = [dead_unix_address(tmp_path), dead_tcp, clamd.unix_address]
    pool = ClamdPool(addresses, retry_after=30, clock=lambda: now[0])
    verdict = pool.scan(eicar())
    assert verdict.status == "infected" and verdict.server == clamd.unix_address
    assert [s.down_until for s in pool.servers] == [1030.0, 1030.0, 0.0]
    assert pool.check_health() == {pool.servers[0].address: False, dead_tcp: False, clamd.unix_address: True}


def test_no_server_answers(tmp_path: os.PathLike[str]) -> None:
    pool = ClamdPool([dead_unix_address(tmp_path), f"127.0.0.1:{free_port()}"])
    with pytest.raises(ScannerUnavailable, match="cannot connect"):
        pool.scan(b"data")
    with pytest.raises(ScannerUnavailable):
        pool.engine()


def test_clamd_killed_then_back(clamd_factory: Callable[..., ClamdInstance]) -> None:
    instance = clamd_factory()
    pool = ClamdPool([instance.unix_address, instance.tcp_address], retry_after=3600)
    assert pool.scan(eicar()).status == "infected"
    instance.kill()
    with pytest.raises(ScannerUnavailable):
        pool.scan(eicar())
    instance.start()
    # every server is marked down for an hour: the pool tries them anyway
    assert pool.scan(eicar()).status == "infected"


class SilentListener:
    """A TCP listener that accepts and never answers: a hung server.

    ``pong`` makes it answer PING (a clamd that is alive but stuck on one scan).
    """

    def __init__(self, pong: bool) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.pong = pong
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            conn.settimeout(10)
            try:
                if self.pong and conn.recv(16).startswith(b"zPING"):
                    conn.sendall(b"PONG\0")
            except OSError:
                continue

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def hung_server() -> Iterator[SilentListener]:
    listener = SilentListener(pong=False)
    yield listener
    listener.close()


@pytest.fixture
def stuck_server() -> Iterator[SilentListener]:
    listener = SilentListener(pong=True)
    yield listener
    listener.close()


def test_a_hung_server_is_skipped(clamd: ClamdInstance, hung_server: SilentListener) -> None:
    pool = ClamdPool([hung_server.address, clamd.unix_address], scan_timeout=0.5)
    verdict = pool.scan(eicar())
    assert verdict.server == clamd.unix_address and verdict.status == "infected"
    assert pool.servers[0].down_until > 0 and "no answer" in pool.servers[0].failure


def test_a_scan_that_times_out_on_a_live_server_is_an_error(stuck_server: SilentListener) -> None:
    pool = ClamdPool([stuck_server.address], scan_timeout=0.5)
    verdict = pool.scan(b"slow")
    assert verdict.status == "error" and "ScanTimeout" in verdict.detail
    assert pool.servers[0].down_until == 0.0


def test_private_clamd_runs_as_an_unprivileged_user(clamd: ClamdInstance) -> None:
    assert clamd.process is not None
    if os.geteuid() != 0:
        # the session's clamd was started by this unprivileged user
        with open(f"/proc/{clamd.process.pid}/status") as status:
            uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
        assert int(uid) == os.geteuid() != 0
        return
    require("setpriv", "util-linux")
    instance = start_clamd(which("clamd"), user="nobody")
    try:
        assert instance.process is not None
        with open(f"/proc/{instance.process.pid}/status") as status:
            uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
        assert uid == "65534"
        assert ClamdPool([instance.unix_address]).scan(eicar()).status == "infected"
    finally:
        instance.remove()
