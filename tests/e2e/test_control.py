"""Operating the running gateway: control files, signals, statistics, the queue and store commands."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys

import pytest

from tests.support.hostile import oversized_request, peak_rss
from tests.support.net import SMTPGW, RawClient, free_port, wait_until

MSG = b"Subject: control\r\n\r\nbody\r\n"


def send(gw, rcpts=("x@example.test",)):
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", list(rcpts), MSG)


@pytest.mark.usefixtures("both_delivery_paths")
def test_stats_command_and_control_file(gateway, sink):
    send(gateway)
    sink.wait_for(1)
    gateway.wait_log(r"status=sent")
    result = gateway.cli("stats")
    assert result.returncode == 0, result.stderr
    counters = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert counters["mta_received_messages"] == "1"
    assert counters["mta_sent_messages"] == "1"
    assert counters["mta_incoming_connections_total"] == "1"
    assert "time_initialized" in counters


def test_receiver_off_and_on(gateway):
    gateway.control(".c_recv_off")
    gateway.wait_log(r"receiving off")
    c = RawClient(gateway.port)
    code, text = c.reply()
    assert (code, text.split()[0]) == (421, "4.3.2")
    gateway.control(".c_recv_on")
    gateway.wait_log(r"receiving on")
    assert RawClient(gateway.port).reply()[0] == 220


@pytest.mark.usefixtures("both_delivery_paths")
def test_sender_off_keeps_mail_queued_until_on(gateway, sink):
    gateway.control(".c_send_off")
    gateway.wait_log(r"sending off")
    send(gateway)
    wait_until(lambda: gateway.queued("QUE"), 10, "message waiting in QUE")
    assert sink.messages == []
    gateway.control(".c_send_on")
    sink.wait_for(1)


@pytest.mark.usefixtures("both_delivery_paths")
def test_hup_reloads_the_configuration_and_keeps_the_old_one_when_broken(gateway, sink):
    with open(gateway.config) as f:
        original = f.read()
    with open(gateway.config, "w") as f:
        f.write(original.replace("RelayRule=allow from 127.0.0.0/8 to *\n", "RelayRule=deny from any to *@blocked.test\n"
                                                                           "RelayRule=allow from 127.0.0.0/8 to *\n"))
    gateway.signal(signal.SIGHUP)
    gateway.wait_log(r"configuration reloaded")
    assert rcpt_code(gateway, "x@blocked.test") == 550
    with open(gateway.config, "w") as f:
        f.write(original + "[smtpgw.bogus]\n")
    gateway.signal(signal.SIGHUP)
    gateway.wait_log(r"reload refused: .*smtpgw.conf:\d+: unknown section")
    assert rcpt_code(gateway, "x@blocked.test") == 550  # the previous configuration is still in force


def rcpt_code(gw, rcpt: str) -> int:
    c = RawClient(gw.port)
    c.reply()
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@b.test>")
    return c.cmd(f"RCPT TO:<{rcpt}>")[0]


def test_check_config_reports_file_and_line(gateway):
    ok = gateway.cli("-k")
    assert ok.returncode == 0 and "Config OK" in ok.stdout
    with open(gateway.config, "a") as f:
        f.write("[smtpgw.limits]\nMaximalIncomingHops=1000\n")
    bad = gateway.cli("-k")
    assert bad.returncode == 1
    lines = (bad.stdout + bad.stderr).strip().splitlines()
    assert any(line.startswith(gateway.config + ":") and "MaximalIncomingHops" in line for line in lines), lines


def test_store_release_from_quarantine(make_gateway, sink, clamd):
    from tests.e2e.test_antivirus_gateway import infected_message

    gw = make_gateway(sink.port, extra={"smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
                                        "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"),
                                                          ("NotifyRecipient", "none")]})
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", ["x@example.test"], infected_message())
    gw.wait_log(r"BLOCKED")
    listing = gw.cli("store", "--path", "quarantine", "list")
    assert listing.returncode == 0, listing.stderr
    [item] = [line.split()[0] for line in listing.stdout.splitlines() if " INF " in line]
    released = gw.cli("store", "--path", "quarantine", "release", item, "--without-check")
    assert released.returncode == 0, released.stdout + released.stderr
    [got] = sink.wait_for(1)
    assert got.recipients == ["x@example.test"] and b'filename="a.zip"' in got.data
    gw.wait_log(r"RELEASED, from=<a@b.test>, nrcpt=1.*check=no")
    assert os.listdir(os.path.join(gw.folder, "var", "quarantine"))  # the stored copy is kept


def test_a_directory_or_link_in_the_control_folder_does_not_stop_requests(gateway, sink, tmp_path):
    # A directory named like a request sorts first: it must not keep the later ones from running,
    # and neither a directory nor a symlink is acted on as a command or a request.
    os.makedirs(os.path.join(gateway.control_path, ".q_0"))
    os.makedirs(os.path.join(gateway.control_path, ".c_stats"))
    outside = tmp_path / "outside.json"
    outside.write_text('{"op": "remove-all"}')
    os.symlink(outside, os.path.join(gateway.control_path, ".q_1link"))
    result = gateway.cli("queue", "send-all")
    assert result.returncode == 0, result.stdout + result.stderr
    gateway.wait_log(r"control entry \.q_0 ignored: not a regular file")
    gateway.wait_log(r"control entry \.q_1link ignored: not a regular file")
    assert os.path.islink(os.path.join(gateway.control_path, ".q_1link"))
    assert not os.path.exists(os.path.join(gateway.control_path, ".a_1link"))
    assert "control file .q_0 failed" not in gateway.log_text()


def test_an_oversized_request_file_is_refused_unread(gateway, sink):
    """A 400 MB file named like a request is neither read nor kept: refused with a log line and an
    answer, while the gateway keeps greeting and the next request is carried out."""
    big = oversized_request(gateway, "big")
    gateway.wait_log(r"control request \.q_big refused and removed: 419430400 bytes, more than 1048576")
    answer = os.path.join(gateway.control_path, ".a_big")
    wait_until(lambda: os.path.exists(answer), 10, "the answer to .q_big")  # written after the log line
    assert not os.path.exists(big)
    with open(answer, "rb") as f:
        assert json.load(f)["code"] == 1
    assert peak_rss(gateway.proc.pid) < 200 << 20  # never anywhere near the file's size
    assert RawClient(gateway.port).reply()[0] == 220
    result = gateway.cli("queue", "send-all")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hup_with_a_listen_address_that_cannot_be_bound_keeps_the_old_listener(gateway):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with open(gateway.config) as f:
            original = f.read()
        taken = f"ListenOn=127.0.0.1:{busy.getsockname()[1]}"
        with open(gateway.config, "w") as f:
            f.write(original.replace(f"ListenOn=127.0.0.1:{gateway.port}", taken))
        gateway.signal(signal.SIGHUP)
        gateway.wait_log(r"cannot listen on 127\.0\.0\.1:\d+")
    finally:
        busy.close()
    assert RawClient(gateway.port).reply()[0] == 220  # still served where it was
    gateway.wait_log(r"reload refused: cannot listen on")
    assert "configuration reloaded" not in gateway.log_text()


def test_hup_adding_a_listen_address_keeps_the_first_one(gateway):
    added = free_port()
    with open(gateway.config) as f:
        original = f.read()
    with open(gateway.config, "w") as f:
        f.write(original.replace(f"ListenOn=127.0.0.1:{gateway.port}\n",
                                 f"ListenOn=127.0.0.1:{gateway.port}\nListenOn=127.0.0.1:{added}\n"))
    gateway.signal(signal.SIGHUP)
    gateway.wait_log(r"configuration reloaded")
    assert RawClient(gateway.port).reply()[0] == 220
    assert RawClient(added).reply()[0] == 220


def test_hup_during_start_up_reloads_after_it_instead_of_killing(make_gateway, sink):
    gw = make_gateway(sink.port, start=False)
    # The PID file is a FIFO: the gateway blocks opening it, after taking the queue lock and
    # before its start-up is done, until this test opens the other end.
    fifo = os.path.join(gw.folder, "smtpgw.pid")
    os.mkfifo(fifo)
    gw.proc = subprocess.Popen([sys.executable, SMTPGW, "-c", gw.config, "-p", fifo], cwd=gw.folder,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(lambda: queue_locked(gw.queue) or gw.proc.poll() is not None, 20, "the queue lock taken")
    gw.signal(signal.SIGHUP)
    writer = wait_until(lambda: open_writer(fifo), 20, "the gateway reading its PID file")
    os.close(writer)
    gw.wait_log(r"smtpgw started")
    gw.wait_log(r"configuration reloaded")
    assert RawClient(gw.port).reply()[0] == 220


def queue_locked(queue: str) -> bool:
    try:
        fd = os.open(os.path.join(queue, ".lock"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def open_writer(fifo: str) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails (ENXIO) while no one reads
    except OSError:
        return None


def test_hup_with_a_log_file_that_cannot_be_opened_keeps_the_old_log(gateway):
    with open(gateway.config) as f:
        original = f.read()
    blocker = os.path.join(gateway.folder, "not-a-folder")
    with open(blocker, "w") as f:
        f.write("a file where the log's folder should be\n")
    with open(gateway.config, "w") as f:
        f.write(original.replace("LogFile=var/smtpgw.log", "LogFile=not-a-folder/smtpgw.log"))
    gateway.signal(signal.SIGHUP)
    gateway.control(".c_recv_off")
    gateway.wait_log(r"receiving off")  # the log in force goes on
    gateway.wait_log(r"reload refused: cannot open the log file .*not-a-folder/smtpgw\.log")
