"""IncomingProcesses=2: sessions served by the main process and an incoming process, as one gateway.

Which process served a message shows in its queue ID (the last character: 0 the main process,
1 the incoming process; spool/queue.set_process), which the 250 reply and the log carry.
"""

from __future__ import annotations

import os
import signal
import smtplib

import pytest

from tests.support.net import GatewayProcess, gone, RawClient, admits, wait_until

TWO = {"smtpgw.limits": [("IncomingProcesses", "2")]}
STARTED = r"incoming process 1 started, pid=(\d+)"


def child_pid(gw: GatewayProcess, count: int = 1) -> int:
    return gw.started_pid(STARTED, count)


def open_sessions(gw: GatewayProcess, count: int) -> list[smtplib.SMTP]:
    """``count`` sessions, each greeted (so admitted and placed) before the next connects."""
    clients = []
    for _ in range(count):
        client = smtplib.SMTP("127.0.0.1", gw.port, timeout=10)
        client.ehlo("client.test")
        clients.append(client)
    return clients


def send_on(client: smtplib.SMTP, token: str) -> str:
    """A message on an open session; its queue ID from the 250."""
    body = f"Subject: {token}\r\n\r\n{token}\r\n".encode()
    code, _ = client.mail("a@b.test")
    assert code == 250
    code, _ = client.rcpt("x@example.test")
    assert code == 250
    code, text = client.data(body)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def edit_config(gw: GatewayProcess, hostname_line: str) -> None:
    with open(gw.config) as f:
        text = f.read()
    with open(gw.config, "w") as f:
        f.write(text.replace("Hostname=gw.example.test", hostname_line))


def delivered_subjects(sink) -> set[str]:
    return {m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in sink.messages}


def both_serve_again(gw: GatewayProcess, sink, main_session: smtplib.SMTP, token: str) -> None:
    """After an incoming process was replaced: a message on a session of the main process and on
    two new sessions, one of which the new incoming process serves; all three delivered."""
    ids = [send_on(main_session, f"{token}-0")]
    clients = open_sessions(gw, 2)
    ids += [send_on(client, f"{token}-{n + 1}") for n, client in enumerate(clients)]
    for client in (main_session, *clients):
        client.quit()
    assert {qid[-1] for qid in ids} == {"0", "1"}  # the new incoming process serves sessions
    sink.wait_for(3)
    assert delivered_subjects(sink) == {f"{token}-0", f"{token}-1", f"{token}-2"}


def test_sessions_spread_over_both_processes_and_every_message_is_delivered(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.limits": [("IncomingProcesses", "2"),
                                                          ("MaximalIncomingSessionsPerIP", "10")]})
    child_pid(gw)
    clients = open_sessions(gw, 6)
    ids = [send_on(client, f"spread-{n}") for n, client in enumerate(clients)]
    assert clients[1].mail("a@b.test", ["SIZE=999999999"])[0] == 552  # refused by the incoming process
    for client in clients:
        client.quit()
    # the fewest sessions first, the main process on a tie: served alternately
    assert [qid[-1] for qid in ids] == ["0", "1"] * 3
    sink.wait_for(6)
    assert delivered_subjects(sink) == {f"spread-{n}" for n in range(6)}
    for qid in ids:  # the incoming process logged its own RECEIVED lines
        gw.wait_log(rf"\] {qid}: RECEIVED, from=<a@b.test>")
    result = gw.cli("stats")  # the main process counts what the incoming process received
    counters = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert counters["mta_received_messages"] == "6"
    assert counters["mta_incoming_connections_total"] == "6"

    def counted() -> bool:
        counters = dict(line.split("=", 1) for line in gw.cli("stats").stdout.splitlines())
        return (counters["mta_incoming_connections_current"] == "0"
                and counters["mta_receivings_refused_for_message_size_limit"] == "1")

    wait_until(counted, 10, "every session counted closed, the refusal in the incoming process counted")


def test_sessions_per_ip_are_counted_over_both_processes(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.limits": [("IncomingProcesses", "2"),
                                                          ("MaximalIncomingSessionsPerIP", "3")]})
    child_pid(gw)
    clients = open_sessions(gw, 3)  # main, incoming, main
    extra = RawClient(gw.port)
    code, text = extra.reply()
    assert code == 421, text
    extra.close()
    clients[1].quit()  # the one the incoming process served: the main process learns it ended
    wait_until(lambda: admits(gw.port), 10, "a session admitted again once the incoming process's one ended")
    for client in (clients[0], clients[2]):
        client.quit()


def test_a_killed_incoming_process_loses_no_accepted_mail_and_is_started_again(make_gateway, sink):
    gw = make_gateway(sink.port, extra=TWO)
    pid = child_pid(gw)
    main_session, child_session = open_sessions(gw, 2)
    assert child_session.mail("a@b.test")[0] == 250
    assert child_session.rcpt("x@example.test")[0] == 250
    assert child_session.docmd("DATA")[0] == 354
    child_session.send(b"Subject: killed-in-data\r\n\r\nhalf a message\r\n")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
        child_session.send(b".\r\n")
        child_session.getreply()  # no 250 for a message cut short
    gw.wait_log(r"incoming process 1 \(pid \d+\) ended: signal 9; starting it again")
    new_pid = child_pid(gw, count=2)
    assert new_pid != pid
    both_serve_again(gw, sink, main_session, "after-kill")


def test_a_hung_incoming_process_is_killed_and_started_again(make_gateway, sink):
    """The watchdog (IncomingProcessTimeout): an incoming process whose loop stopped (here SIGSTOP)
    sends nothing more; the main process kills it, its session is dropped, and a new one serves."""
    gw = make_gateway(sink.port, extra={"smtpgw.limits": [("IncomingProcesses", "2")],
                                        "smtpgw.timeouts": [("IncomingProcessTimeout", "3")]})
    pid = child_pid(gw)
    main_session, child_session = open_sessions(gw, 2)
    os.kill(pid, signal.SIGSTOP)
    gw.wait_log(rf"incoming process 1 \(pid {pid}\) silent for \d+s \(IncomingProcessTimeout\): killed")
    gw.wait_log(rf"incoming process 1 \(pid {pid}\) ended: signal 9; starting it again")
    with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
        child_session.mail("a@b.test")  # its session went with it
    new_pid = child_pid(gw, count=2)
    assert new_pid != pid and gone(pid)
    both_serve_again(gw, sink, main_session, "after-hang")


def test_hup_reloads_both_processes_and_they_write_the_new_log(make_gateway, sink):
    gw = make_gateway(sink.port, extra=TWO)
    child_pid(gw)
    edit_config(gw, "Hostname=reloaded.example.test")
    os.rename(gw.log_path, gw.log_path + ".1")  # as logrotate does before its HUP
    gw.signal(signal.SIGHUP)
    gw.wait_log(r"configuration reloaded")
    clients = open_sessions(gw, 2)
    banners = [client.ehlo_resp.decode().splitlines()[0] for client in clients]
    assert banners == ["reloaded.example.test"] * 2
    ids = [send_on(client, f"reloaded-{n}") for n, client in enumerate(clients)]
    for client in clients:
        client.quit()
    assert [qid[-1] for qid in ids] == ["0", "1"]
    for qid in ids:  # both append to the reopened log
        gw.wait_log(rf"\] {qid}: RECEIVED")


def test_a_bad_configuration_at_hup_is_applied_by_neither_process(make_gateway, sink):
    gw = make_gateway(sink.port, extra=TWO)
    child_pid(gw)
    edit_config(gw, "Hostname=other.example.test\nNoSuchKey=1")
    gw.signal(signal.SIGHUP)
    gw.wait_log(r"reload refused")
    clients = open_sessions(gw, 2)
    assert [client.ehlo_resp.decode().splitlines()[0] for client in clients] == ["gw.example.test"] * 2
    for client in clients:
        client.quit()


def test_the_memory_report_names_every_other_process(make_gateway, sink):
    gw = make_gateway(sink.port, extra=TWO)
    pid = child_pid(gw)
    [incoming] = [p for p in gw.memory_report()["processes"] if p["kind"] == "incoming"]
    assert incoming["pid"] == pid and incoming["rss_kib"] > 1024


def test_sigterm_stops_every_process_and_a_killed_main_process_leaves_none(make_gateway, sink):
    gw = make_gateway(sink.port, extra=TWO)
    pid = child_pid(gw)
    idle = open_sessions(gw, 2)
    assert gw.stop() == 0
    assert gone(pid)
    for client in idle:  # both sessions were closed with a 421, by each process
        assert client.getreply()[0] == 421
    gw.start()
    pid = child_pid(gw)
    gw.kill()  # kill -9 of the main process: its incoming process exits by itself
    wait_until(lambda: gone(pid), 10, "the incoming process gone with the main process")
