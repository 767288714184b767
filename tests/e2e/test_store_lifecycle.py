"""Quarantine lifecycle in the running gateway: lifetimes purged and logged, spam kept apart from
viruses (SpamQuarantinePath), and the store listing's filters and script formats."""

from __future__ import annotations

import json
import os
import re
import smtplib
import time

from smtpgw.spool.store import Store
from tests.e2e.test_antispam_gateway import SPAM, spam_gateway
from tests.e2e.test_antivirus_gateway import infected_message
from tests.support.net import wait_until

DAY = 86400.0
MESSAGE = b"From: a@example.test\r\nTo: x@example.test\r\nSubject: held\r\n\r\nbody\r\n"


def stored(folder: str, qid: str, status: str, age_days: float) -> str:
    """An item put in ``folder`` as if ``age_days`` ago (its record's stored time and its files' times)."""
    store = Store(folder)
    item_id = store.put(qid, MESSAGE, {"sender": "a@example.test", "recipients": [{"addr": "x@example.test"}],
                                       "received_at": time.time() - age_days * DAY}, status, "test")
    record_path = os.path.join(store.path, item_id + ".json")
    with open(record_path) as f:
        record = json.load(f)
    record["stored_at"] -= age_days * DAY
    with open(record_path, "w") as f:
        json.dump(record, f)
    for ext in (".json", ".eml"):
        os.utime(os.path.join(store.path, item_id + ext), (record["stored_at"],) * 2)
    return item_id


def test_items_past_their_lifetime_are_purged_and_logged(make_gateway, sink):
    gw = make_gateway(sink.port, start=False, extra={
        "smtpgw.policy": [("QuarantineLifetime", "2"), ("BackupLifetime", "0")],
        "smtpgw.path": [("IncomingArchivePath", "var/arch_in"), ("IncomingArchiveLifetime", "1")],
    })
    var = os.path.join(gw.folder, "var")
    old_quarantined = stored(os.path.join(var, "quarantine"), "Qold", "INF", 3)
    young_quarantined = stored(os.path.join(var, "quarantine"), "Qyoung", "SPM", 1)
    old_backup = stored(os.path.join(var, "backup"), "Bold", "BAK", 400)  # BackupLifetime=0: kept for ever
    old_archived = stored(os.path.join(var, "arch_in"), "Aold", "RCV", 1.5)
    gw.start()
    lines = gw.wait_log(r"PURGED, store=\S+, item=\w+, status=\w+", count=2)
    assert any(f"item={old_quarantined}, status=INF" in line and "lifetime=2d" in line for line in lines)
    assert any(f"item={old_archived}, status=RCV" in line and "lifetime=1d" in line for line in lines)
    assert [i.id for i in Store(os.path.join(var, "quarantine")).list()] == [young_quarantined]
    assert [i.id for i in Store(os.path.join(var, "backup")).list()] == [old_backup]
    assert Store(os.path.join(var, "arch_in")).list() == []
    with smtplib.SMTP("127.0.0.1", gw.port) as client:  # a new copy in the archive stays
        client.sendmail("a@example.test", ["x@example.test"], MESSAGE)
    sink.wait_for(1)
    rows = [json.loads(line) for line in gw.cli("store", "--path", "incoming", "list", "--format", "json").stdout.splitlines()]
    assert [(r["status"], r["sender"], r["recipients"]) for r in rows] == [("RCV", "a@example.test", ["x@example.test"])]


def test_spam_is_kept_apart_from_viruses(make_gateway, sink, clamd):
    gw = spam_gateway(make_gateway, sink, clamd, policy=[("ActionSpam", "quarantine"), ("SpamQuarantinePath", "var/spam")])
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("alice@example.test", ["bob@example.test"], SPAM)
        client.sendmail("carol@example.test", ["x@example.test"], infected_message())
    spam = os.path.join(gw.folder, "var", "spam")
    quarantine = os.path.join(gw.folder, "var", "quarantine")
    wait_until(lambda: Store(spam).list() if os.path.isdir(spam) else None, 20, "spam quarantined")
    wait_until(lambda: Store(quarantine).list() if os.path.isdir(quarantine) else None, 20, "virus quarantined")
    assert [i.status for i in Store(spam).list()] == ["SPM"]
    assert [i.status for i in Store(quarantine).list()] == ["INF"]
    tsv = gw.cli("store", "--path", "spam", "list", "--format", "tsv", "--sender", "*@example.test").stdout.splitlines()
    assert tsv[0].split("\t")[:3] == ["id", "queue_id", "status"]
    assert [line.split("\t")[2] for line in tsv[1:]] == ["SPM"]
    listing = gw.cli("store", "list", "--recipient", "x@*", "--status", "INF,SSP").stdout
    assert " INF " in listing and re.search(r"^-- 1 message\(s\), \d+ bytes$", listing, re.M)
    assert gw.cli("store", "list", "--sender", "alice@*").stdout.startswith("QueueID")
    assert "-- 0 message(s)" in gw.cli("store", "list", "--sender", "alice@*").stdout
