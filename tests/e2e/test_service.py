"""Service parity with the reference's init script (kmg-spec §4.1, §4.2): exit code 41 before
any port is bound, `-k` saying ``Config OK !``, and the control commands through the CLI."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys

from tests.e2e.test_antispam_gateway import spam_gateway
from tests.support.net import SMTPGW, GatewayProcess, listening, wait_until


def second_start(config: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SMTPGW, "-c", config, *extra], capture_output=True, text=True, timeout=60)


def test_a_second_start_on_the_same_queue_exits_41_before_binding(make_gateway, sink):
    first = make_gateway(sink.port)
    # Same configuration, same port: had it bound first, it would fail on the port (30), not on the queue.
    run = second_start(first.config, "-n")
    assert run.returncode == 41, run.stdout + run.stderr
    assert "another gateway is running on the queue" in run.stderr
    assert "cannot listen" not in run.stderr + first.log_text()
    assert listening(first.port)  # the first one still serves


def test_a_pid_file_naming_a_running_gateway_exits_41_before_binding(make_gateway, sink, tmp_path):
    first = make_gateway(sink.port)
    other = GatewayProcess(str(tmp_path / "other"), sink.port)  # its own queue...
    with open(other.config) as f:
        text = f.read().replace(f"127.0.0.1:{other.port}", f"127.0.0.1:{first.port}")  # ...on the first's port
    with open(other.config, "w") as f:
        f.write(text)
    pid_file = tmp_path / "smtpgw.pid"
    pid_file.write_text(f"{first.proc.pid}\n")
    run = second_start(other.config, "-p", str(pid_file))
    assert run.returncode == 41, run.stdout + run.stderr
    assert f"names a running process {first.proc.pid}" in run.stderr
    assert pid_file.read_text() == f"{first.proc.pid}\n"


def test_check_config_says_config_ok(gateway):
    run = second_start(gateway.config, "-k")
    assert (run.returncode, run.stdout) == (0, "Config OK !\n")


def send(gw, sender: str = "a@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail(sender, ["x@example.test"], b"Subject: t\r\n\r\nbody\r\n")


def test_service_commands_of_the_init_script(gateway, sink):
    def control(action: str) -> None:
        run = gateway.cli("control", action)
        assert (run.returncode, run.stdout) == (0, f"smtpgw: {action} taken by the gateway\n"), run.stderr

    control("recv-off")
    gateway.wait_log(r"receiving off")
    with smtplib.SMTP() as client:
        assert client.connect("127.0.0.1", gateway.port)[0] == 421
    control("recv-on")
    control("send-off")
    gateway.wait_log(r"sending off")
    send(gateway)
    wait_until(lambda: gateway.queued("QUE"), 10, "the message waiting in QUE")
    control("send-on")
    sink.wait_for(1)
    control("avir-off")
    gateway.wait_log(r"scanning off")
    control("avir-on")
    control("reload-bases")
    gateway.wait_log(r"databases reloaded")
    gateway.wait_log(r"bases: anti-spam off \(Check=false\); anti-virus off \(Check=false\)", count=2)
    stats = gateway.cli("control", "stats")
    assert stats.returncode == 0 and "mta_received_messages=1\n" in stats.stdout


def test_a_service_command_without_a_gateway_is_withdrawn(make_gateway, sink):
    gw = make_gateway(sink.port, start=False)
    run = gw.cli("control", "recv-off", "--timeout", "0")
    assert run.returncode == 3 and "is it running?" in run.stderr
    assert not os.path.exists(os.path.join(gw.control_path, ".c_recv_off"))


def test_database_versions_are_logged_at_start_and_at_every_reload(make_gateway, sink, clamd):
    gw = spam_gateway(make_gateway, sink, clamd)
    line = r"bases: anti-spam version=\S+, date=\S+, ham=\d+, spam=\d+ \(site layer: none\); anti-virus ClamAV \d+\.\d+"
    gw.wait_log(line)
    gw.signal(signal.SIGHUP)
    gw.wait_log(r"configuration reloaded")
    gw.wait_log(line, count=2)
    gw.control(".c_db_reload")
    gw.wait_log(line, count=3)


def test_statistics_survive_a_restart_and_a_crash(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.options": [("StatSaveInterval", "1"), ("StatFilename", "var/stats")]})
    stat_file = os.path.join(gw.folder, "var", "stats")
    send(gw)
    sink.wait_for(1)
    # saved on its own (no .c_stats), the history first: a crash after that loses nothing
    wait_until(lambda: os.path.exists(stat_file) and "mta_sent_messages=1\n" in open(stat_file).read(), 10,
               "the periodic save")
    gw.kill()
    gw.start()
    send(gw)
    sink.wait_for(2)
    assert gw.stop() == 0  # a clean stop saves the last counts
    gw.start()
    stats = gw.cli("stats")
    assert stats.returncode == 0
    assert "mta_received_messages=2\n" in stats.stdout and "mta_sent_messages=2\n" in stats.stdout
    history = gw.cli("stats", "--days", "7")
    assert history.returncode == 0
    [line] = history.stdout.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d received=2 delivered=2 viruses=0 blocked=0 refused=0 bytes=\d+", line), line
    assert gw.cli("stats", "--days", "0").returncode == 1
