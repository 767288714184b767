"""The quarantine digest through SMTP: a quarantined spam is listed in its protected recipient's
digest (``.c_digest``), with ID, sender, subject and release instruction; nobody else gets one."""

from __future__ import annotations

import email
import json
import os
import smtplib

from smtpgw.spool.store import Store
from tests.e2e.test_antispam_gateway import SPAM, spam_gateway
from tests.support.net import wait_until


def digests(sink) -> list[email.message.Message]:
    return [email.message_from_bytes(m.data) for m in sink.messages
            if b"Quarantine digest" in m.data.partition(b"\r\n\r\n")[0]]


def test_digest_lists_what_is_held_for_protected_recipients_only(make_gateway, sink, clamd):
    gw = spam_gateway(make_gateway, sink, clamd, policy=[("ActionSpam", "quarantine")],
                      smtpgw__digest=[("Schedule", "24")])  # the first one a day after the first start
    state = os.path.join(gw.queue, "digest.state")
    with open(state) as f:
        started = json.load(f)["last"]
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("alice@example.test", ["bob@example.test", "out@elsewhere.test"], SPAM)
    quarantine = os.path.join(gw.folder, "var", "quarantine")
    items = wait_until(lambda: Store(quarantine).list() if os.path.isdir(quarantine) else None, 20, "spam quarantined")
    assert [(i.status, sorted(i.recipients)) for i in items] == [("SPM", ["bob@example.test", "out@elsewhere.test"])]
    gw.control(".c_digest")
    gw.wait_log(r": NOTIFICATION, kind=digest, to=bob@example.test, items=1")
    gw.wait_log(r": DIGEST, recipients=1")
    wait_until(lambda: digests(sink), 20, "the digest at the sink")
    (digest,) = digests(sink)
    (delivered,) = [m for m in sink.messages if b"Quarantine digest" in m.data]
    assert delivered.recipients == ["bob@example.test"] and delivered.sender == "gateway@example.test"
    assert digest["To"] == "bob@example.test" and digest["Auto-Submitted"] == "auto-generated"
    assert digest["Subject"] == "Quarantine digest: 1 message(s) held for bob@example.test"
    body = digest.get_payload(decode=True).decode()
    item = items[0]
    assert f"ID:       {item.id}" in body and "From:     alice@example.test" in body
    subject = email.message_from_bytes(SPAM)["Subject"]
    assert f"Subject:  {subject}" in body
    assert f"Release:  smtpgw.py store release {item.id}" in body and "Console:" not in body
    with open(state) as f:
        assert json.load(f)["last"] > started  # remembered: a restart does not send it again
