"""Service parity with the reference's init script (kmg-spec §4.1, §4.2): exit code 41 before
any port is bound, `-k` saying ``Config OK !``, and the control commands through the CLI."""

from __future__ import annotations

import subprocess
import sys

from tests.support.net import SMTPGW, GatewayProcess, listening


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
