"""Usage quotas through SMTP: thresholds logged and mailed to the admin once a day, counts that
survive a restart, and temporary refusals only with QuotaAction=defer."""

from __future__ import annotations

import email
import re
import smtplib

import pytest

from tests.support.net import Sink, wait_until

ADMIN = "admin@example.test"


def message(size: int = 0) -> bytes:
    return b"From: a@example.test\r\nSubject: quota\r\n\r\n" + b"x" * 76 + b"\r\n" + (b"y" * 998 + b"\r\n") * (size // 1000)


def notices(sink: Sink) -> list[email.message.Message]:
    return [email.message_from_bytes(m.data) for m in sink.messages if m.recipients == [ADMIN]]


def send(port: int, recipients: list[str], size: int = 0) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@example.test", recipients, message(size))


def test_thresholds_are_mailed_once_and_never_block(make_gateway, sink):
    gw = make_gateway(sink.port, extra={"smtpgw.quota": [("MaximalProtectedRecipients", "5"), ("WarningThreshold", "60")]})
    send(gw.port, ["u1@example.test", "u2@example.test", "out@elsewhere.test"])  # not protected: not counted
    send(gw.port, ["U1@example.test", "u3@example.test"])  # case does not make a new recipient
    gw.wait_log(r": QUOTA, quota=recipients, day=\S+, threshold=60%, used=3, limit=5, action=notify, notice=\w+")
    wait_until(lambda: len(notices(sink)) == 1, 20, "the warning notice")
    warning = notices(sink)[0]
    assert warning["Subject"] == "Quota warning: protected recipients at 60% of the daily limit"
    assert warning["Auto-Submitted"] == "auto-generated" and warning["From"] == "gateway@example.test"
    assert "Used:       3 of 5" in warning.get_payload()
    send(gw.port, ["u1@example.test", "u2@example.test"])  # nothing new: no second warning
    gw.stop()
    gw.start()  # the day's counts and the notices already sent survive a restart
    send(gw.port, ["u4@example.test"])
    send(gw.port, ["u5@example.test", "u6@example.test", "u7@example.test"])  # over: still accepted
    gw.wait_log(r": QUOTA, quota=recipients, day=\S+, threshold=100%, used=6, limit=5, action=notify")
    wait_until(lambda: len(notices(sink)) == 2, 20, "the notice at 100%")
    reached = notices(sink)[1]
    assert reached["Subject"] == "Quota reached: protected recipients at 100% of the daily limit"
    assert "more than 5 of 5" in reached.get_payload() and "mail is still accepted" in reached.get_payload()
    send(gw.port, ["u8@example.test"])
    delivered = sink.wait_for(8)
    assert sorted(r for m in delivered for r in m.recipients if r != ADMIN)[-3:] == [
        "u6@example.test", "u7@example.test", "u8@example.test"]
    assert len(gw.wait_log(r": QUOTA, quota=")) == 2
    assert gw.memory_report()["registries"]["quota_recipients"] == 5  # bounded by the limit
    assert len(notices(sink)) == 2 and "action=defer" not in gw.log_text()


@pytest.mark.parametrize("process", ["main", "incoming"])
def test_defer_refuses_temporarily_over_the_limits(make_gateway, sink, process):
    """In the main process, or in an incoming process (IncomingProcesses=2) that refuses by the
    counts the main process sends it after each message."""
    gw = make_gateway(sink.port, extra={"smtpgw.quota": [
        ("MaximalProtectedRecipients", "2"), ("MaximalDailyTraffic", "1"), ("QuotaAction", "defer")],
        "smtpgw.limits": [("IncomingProcesses", "2")]})
    gw.wait_log(r"incoming process 1 started")
    idle = smtplib.SMTP("127.0.0.1", gw.port) if process == "incoming" else None  # the main process serves it
    with smtplib.SMTP("127.0.0.1", gw.port) as client:  # the limit holds within one transaction too
        refused = client.sendmail("a@example.test", ["u1@example.test", "u2@example.test", "u9@example.test"],
                                  message(600_000))
    assert refused == {"u9@example.test": (452, b"4.5.3 <u9@example.test>: daily quota of protected recipients"
                                                 b" reached, try again later")}
    gw.wait_log(r"QUOTA, quota=recipients, day=\S+, threshold=100%, used=2, limit=2, action=defer, notice=\w+")
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.ehlo()
        client.mail("a@example.test")
        assert client.rcpt("u3@example.test") == (452, b"4.5.3 <u3@example.test>: daily quota of protected"
                                                      b" recipients reached, try again later")
        assert client.rcpt("u1@example.test")[0] == 250  # seen today
        assert client.rcpt("out@elsewhere.test")[0] == 250  # not protected
        assert client.data(message(600_000))[0] == 250  # crosses the traffic limit: accepted
    gw.wait_log(r"QUOTA, quota=traffic, day=\S+, threshold=100%, used=\d+, limit=1048576, action=defer")
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@example.test", ["u2@example.test"], message())
        assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (451, b"4.7.1")
    gw.wait_log(r": QUOTA, quota=recipients, action=defer, client=\[127.0.0.1\], rcpt=<(u3|u9)@example.test>, used=2, limit=2", count=2)
    gw.wait_log(r": QUOTA, quota=traffic, action=defer, client=\[127.0.0.1\], size=\d+, used=\d+, limit=1048576")
    received = re.findall(r"\] (\S+): RECEIVED, from=<a@example.test>", gw.log_text())
    assert len(received) == 2 and {qid[-1] for qid in received} == {"1" if idle else "0"}  # who served them
    if idle is not None:
        idle.quit()
    wait_until(lambda: len(notices(sink)) == 2, 20, "the two notices at 100%")
    texts = {n["Subject"]: n.get_payload() for n in notices(sink)}
    assert "new messages are refused temporarily (451 4.7.1)" in texts[
        "Quota reached: mail traffic at 100% of the daily limit"]
    assert "(452 4.5.3) until midnight" in texts["Quota reached: protected recipients at 100% of the daily limit"]
    gw.wait_log(r"refused message from \[127.0.0.1\] <a@example.test>: Daily quota of mail traffic reached")
