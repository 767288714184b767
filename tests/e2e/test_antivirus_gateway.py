"""The anti-virus stage inside the running gateway, with a real private clamd."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import smtplib

import pytest

from tests.support.clamd import EICAR_NAME, eicar, mime_message, zip_bytes
from tests.support.net import GatewayProcess, listening, wait_until
from tests.test_log import fields

CLEAN = b"From: a@b.test\r\nTo: x@example.test\r\nSubject: clean\r\n\r\nnothing to see\r\n"


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")


def infected_message() -> bytes:
    return mime_message([
        ("Content-Type: text/plain", b"see attachment"),
        ("Content-Type: application/zip; name=\"a.zip\"\nContent-Disposition: attachment; filename=\"a.zip\"\n"
         "Content-Transfer-Encoding: base64", b64(zip_bytes({"eicar.com": eicar()}))),
    ])


@pytest.fixture
def av_gateway(make_gateway, sink, clamd):
    def make(**policy: str) -> GatewayProcess:
        items = [("Check", "true")] + list(policy.items())
        return make_gateway(sink.port, extra={"smtpgw.ave": [("ClamdAddress", clamd.unix_address)], "smtpgw.policy": items})
    return make


def send(gw, data: bytes, rcpts=("x@example.test",)) -> None:
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("a@b.test", list(rcpts), data)


def test_the_minimal_configuration_scans_and_relays(tmp_path, sink, clamd):
    """The project's minimal config, verbatim but for ports and the clamd address."""
    from tests.support.net import free_port

    port = free_port()
    folder = tmp_path / "minimal"
    folder.mkdir()
    text = open(os.path.join(os.path.dirname(__file__), "..", "data", "config", "minimal.conf")).read()
    text = text.replace("127.0.0.1:2525", f"127.0.0.1:{port}").replace("127.0.0.1:2526", f"127.0.0.1:{sink.port}")
    text += f"[smtpgw.ave]\nClamdAddress={clamd.unix_address}\n"
    (folder / "smtpgw.conf").write_text(text)
    gw = GatewayProcess.__new__(GatewayProcess)
    gw.folder, gw.port, gw.config = str(folder), port, str(folder / "smtpgw.conf")
    gw.log_path = str(folder / "var" / "log")  # no LogFile: the log goes to stderr
    gw.queue, gw.control_path = str(folder / "var" / "queue"), str(folder / "var" / "control")
    gw.proc, gw.killed, gw._log_offset = None, False, 0
    import subprocess
    import sys

    from tests.support.net import SMTPGW, wait_until as wait

    stderr_path = folder / "stderr.log"
    gw.proc = subprocess.Popen([sys.executable, SMTPGW, "-c", gw.config], cwd=gw.folder,
                               stdout=subprocess.DEVNULL, stderr=open(stderr_path, "wb"))
    try:
        wait(lambda: listening(port) or gw.proc.poll() is not None, 20, "the gateway listening")
        assert gw.proc.poll() is None
        send(gw, CLEAN)
        send(gw, infected_message())
        got = sink.wait_for(3)  # the clean message, and notifications to the admin and the recipient
        [clean] = [m for m in got if b"nothing to see" in m.data]
        assert b"X-SpamTest-Status: " in clean.data  # the spam check ran too (the minimal config keeps it on)
        assert b"X-Anti-Virus: smtpgw" in clean.data
        assert sorted(m.recipients[0] for m in got if m is not clean) == ["admin@example.test", "x@example.test"]
        states = [folder / "var" / "queue" / state for state in ("WFC", "CHK", "QUE", "SND")]
        wait(lambda: len(sink.messages) == 3 and not any(os.listdir(d) for d in states), 20, "all delivered")
    finally:
        gw.proc.terminate()
        assert gw.proc.wait(20) == 0
    log = stderr_path.read_text()
    assert 'AV-SCANNED, group=policy, status="infected"' in log and "BLOCKED" in log
    assert os.listdir(folder / "var" / "quarantine")  # SaveInQB default: infected



def test_a_file_name_cannot_break_the_quoting_of_log_fields(av_gateway, sink):
    """kmg-spec §7.1 quotes free text as ``reason="..."``: a double quote in an attachment's file
    name must not end the field early (the BLOCKED line names the infected object): it is kept, escaped."""
    gw = av_gateway()
    named = 'Content-Type: application/octet-stream; name="ev\\"il.com"\nContent-Disposition: attachment; ' \
            'filename="ev\\"il.com"\nContent-Transfer-Encoding: base64'
    send(gw, mime_message([("Content-Type: text/plain", b"see attachment"), (named, b64(eicar()))]))
    [line] = gw.wait_log(r"BLOCKED, rcpt=x@example.test")
    assert fields(line.split(": ", 1)[1]) == ["BLOCKED", "rcpt", "size", "reason"], line
    assert line.endswith(f' reason="infected 2:ev\\"il.com ({EICAR_NAME})"'), line


def test_infected_message_is_blocked_and_notified(av_gateway, sink):
    gw = av_gateway()
    send(gw, infected_message())
    gw.wait_log(r'AV-SCANNED, group=policy, status="infected", names="Smtpgw\.Test\.Eicar')
    gw.wait_log(r"BLOCKED, rcpt=x@example.test")
    # notifications (defaults: NotifyAdmin and NotifyRecipient for infected) go out; the message does not
    got = sink.wait_for(2)
    assert sorted(tuple(m.recipients) for m in got) == [("admin@example.test",), ("x@example.test",)]
    for m in got:
        assert m.sender == "gateway@example.test"
        assert b"eicar.com" in m.data and b"Smtpgw.Test.Eicar" in m.data
    wait_until(lambda: not gw.queued(), 10, "empty queue")


def test_remove_action_delivers_the_rest_byte_exact(av_gateway, sink):
    gw = av_gateway(BlockMessage="none", NotifyAdmin="none", NotifyRecipient="none", ActionInfected="remove")
    message = infected_message()
    send(gw, message)
    [got] = sink.wait_for(1)
    assert got.data.startswith(b"X-Anti-Virus: smtpgw")
    start = message.index(b"--=_b0und4ry\r\nContent-Type: application/zip")
    end = message.index(b"--=_b0und4ry--")
    expected = message[:start] + message[end:]  # every other byte as it was sent
    assert got.data.endswith(expected)
    between = got.data[: -len(expected)]
    assert between.count(b"\r\nReceived: from ") == 1 and b"Content-" not in between
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert [p.get_content_type() for p in parsed.walk()] == ["multipart/mixed", "text/plain"]


def test_clamd_down_keeps_mail_queued_until_it_is_back(make_gateway, sink, clamd_factory):
    private = clamd_factory()
    gw = make_gateway(sink.port, extra={"smtpgw.ave": [("ClamdAddress", private.unix_address)],
                                        "smtpgw.policy": [("Check", "true")]})
    private.kill()
    send(gw, CLEAN)
    gw.wait_log(r"SCAN DEFERRED, reason=\"anti-virus unavailable")
    assert gw.queued("WFC") and sink.messages == []
    private.restart()
    assert gw.cli("queue", "send-all").returncode == 0
    [got] = sink.wait_for(1)
    assert b"Subject: clean" in got.data


def test_group_split_scans_each_group_by_its_policy(make_gateway, sink, clamd):
    gw = make_gateway(sink.port, extra={
        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
        "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none")],
        "smtpgw.group:lab": [("Recipients", "*@lab.example.test"), ("Check", "false")],
    })
    send(gw, infected_message(), rcpts=("x@example.test", "y@lab.example.test"))
    gw.wait_log(r"SPLITTED, group=lab, nrcpt=1")
    [got] = sink.wait_for(1)
    assert got.recipients == ["y@lab.example.test"]  # the lab group is not checked; the other copy is blocked
    gw.wait_log(r"BLOCKED, rcpt=x@example.test")


def test_a_group_by_sender_applies_only_to_mail_from_trusted_clients(make_gateway, sink, clamd):
    """``Senders=*@example.test Check=false``: a client outside GroupSendersTrusted that writes an
    internal sender is scanned by the policy (EICAR blocked); a trusted client's mail is the group's."""
    gw = make_gateway(sink.port, extra={
        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
        "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"), ("NotifyRecipient", "none"),
                          ("GroupSendersTrusted", "127.0.0.1")],
        "smtpgw.group:internal": [("Senders", "*@example.test"), ("Check", "false")],
    })
    with smtplib.SMTP("127.0.0.1", gw.port, source_address=("127.0.0.2", 0)) as outside:  # RelayRule: to us only
        outside.sendmail("ceo@example.test", ["x@example.test"], infected_message())
    gw.wait_log(r'AV-SCANNED, group=policy, status="infected"')
    gw.wait_log(r"BLOCKED, rcpt=x@example.test")
    with smtplib.SMTP("127.0.0.1", gw.port) as inside:
        inside.sendmail("ceo@example.test", ["y@example.test"], infected_message())
    gw.wait_log(r'AV-SCANNED, group=internal, status="not scanned"')
    [got] = sink.wait_for(1)
    assert got.recipients == ["y@example.test"]


def test_disclaimer_statistics_and_strict_standards(make_gateway, sink, clamd):
    gw = make_gateway(sink.port, extra={
        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
        "smtpgw.options": [("AVStatistics", "var/avstats.log"), ("StrictStandards", "true")],
        "smtpgw.policy": [("Check", "true"), ("AddDisclaimer", "true")],
    })
    good = (b"From: a@b.test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m\x1b[2J@b.test>\r\n"
            b"Subject: proper\r\n\r\nhello\r\n")
    send(gw, good)
    send(gw, b"From: a@b.test\r\nSubject: no date\r\n\r\nhello\r\n")
    [got] = sink.wait_for(1)
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/mixed"
    parts = [p for p in parsed.walk() if p.get_content_type() == "text/plain"]
    assert parts[0].get_content().strip() == "hello" and len(parts) == 2  # the disclaimer is the last part
    gw.wait_log(r'BLOCKED, rcpt=x@example.test, size=\d+, reason="StrictStandards: no Date field')
    stats_path = os.path.join(gw.folder, "var", "avstats.log")
    escaped_id = r"<m\x1b[2J@b.test>"  # escaped as in the log: no control byte reaches the file
    text = wait_until(lambda: os.path.exists(stats_path) and escaped_id in open(stats_path).read()
                      and open(stats_path).read(), 10, "AV statistics")
    rows = [line.split("\t") for line in text.splitlines()]
    assert all(len(row) == 8 and row[2] == "a@b.test" and row[4] == "clean" and row[6] == "127.0.0.1" for row in rows)
    assert escaped_id in [row[7] for row in rows], rows


def test_recipient_notifications_do_not_disclose_the_other_recipients(av_gateway, sink):
    # a Bcc recipient must not be revealed to the others (nor they to it): one notice each
    gw = av_gateway(NotifyAdmin="none")
    send(gw, infected_message(), rcpts=("x@example.test", "hidden@example.test"))
    gw.wait_log(r"BLOCKED, rcpt=x@example.test,hidden@example.test")
    got = sink.wait_for(2)
    assert sorted(tuple(m.recipients) for m in got) == [("hidden@example.test",), ("x@example.test",)]
    for m in got:
        parsed = email.message_from_bytes(m.data, policy=email.policy.default)
        assert [a.addr_spec for a in parsed["To"].addresses] == m.recipients
    wait_until(lambda: not gw.queued(), 10, "empty queue")


def test_a_group_uses_its_own_templates(make_gateway, sink, clamd, tmp_path):
    """A group's TemplatesPath gives its notices and disclaimer their own words; other groups keep
    [path] TemplatesPath's. A group folder with a broken template stops the start, named."""
    import shutil
    import subprocess
    import sys

    from smtpgw.scan.results import TEMPLATES
    from tests.support.net import SMTPGW

    lab = tmp_path / "lab-templates"
    shutil.copytree(TEMPLATES, lab)
    notice = (lab / "notify.tmpl").read_text()
    (lab / "notify.tmpl").write_text(notice.replace("\nSubject: ", "\nSubject: [lab notice] ", 1))
    (lab / "disclaimer.tmpl").write_text("Scanned for the lab.\n")
    gw = make_gateway(sink.port, extra={
        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
        "smtpgw.policy": [("Check", "true"), ("NotifyRecipient", "none"), ("AddDisclaimer", "true")],
        "smtpgw.group:lab": [("Recipients", "*@lab.example.test"), ("TemplatesPath", str(lab))],
    })
    send(gw, infected_message(), rcpts=("x@example.test", "y@lab.example.test"))
    send(gw, CLEAN, rcpts=("x@example.test", "y@lab.example.test"))
    got = sink.wait_for(4)
    notices = {m.data.count(b"y@lab.example.test") > 0: m for m in got if m.recipients == ["admin@example.test"]}
    subjects = {lab: email.message_from_bytes(m.data, policy=email.policy.default)["Subject"] for lab, m in notices.items()}
    assert subjects[True].startswith("[lab notice] [lab] Blocked message (infected)"), subjects
    assert subjects[False].startswith("[policy] Blocked message (infected)"), subjects
    delivered = {m.recipients[0]: m.data for m in got if m.recipients != ["admin@example.test"]}
    assert b"Scanned for the lab." in delivered["y@lab.example.test"]
    assert b"Scanned for the lab." not in delivered["x@example.test"]
    (lab / "placeholder.tmpl").write_text("%NO_SUCH_MACRO%\n")
    assert gw.stop() == 0
    result = subprocess.run([sys.executable, SMTPGW, "-c", gw.config, "-n"], cwd=gw.folder,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"{lab}/placeholder.tmpl" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
