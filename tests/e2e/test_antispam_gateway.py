"""The spam filter inside the running gateway: verdict headers, Subject tags, actions, lists, DNSBL."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys

import pytest

from smtpgw.spam.database import SpamDatabase, site_file
from smtpgw.spam.formalsigns import GTUBE
from smtpgw.spam.spamfilter import default_bases
from smtpgw.spool.store import Store
from tests.support.components import require
from tests.support.dns import start_dnsmasq
from tests.support.net import SMTPGW, RawClient, wait_until
from tests.test_log import fields

HAM = (b"From: Alice Example <alice@example.test>\r\nTo: bob@example.test\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
       b"Message-ID: <m1@example.test>\r\nSubject: minutes of the meeting\r\n\r\nHi Bob,\r\n\r\n"
       b"attached are the minutes of yesterday's meeting. Let me know if anything is missing.\r\n\r\nThanks,\r\nAlice\r\n")
SPAM = HAM.replace(b"Thanks,", GTUBE.encode("ascii") + b"\r\nThanks,")
# Scored 0.42 (``smtpgw.py spam classify``): Not Detected at soft (Probable Spam from 0.80),
# Probable Spam at hard (from 0.35).
BORDERLINE = HAM.replace(b"Let me know if anything is missing.", b"Free offer, limited time.")


def spam_gateway(make_gateway, sink, clamd, policy=(), antispam=(), start=True, **extra):
    policy_keys = {"Check": "true", "NotifyAdmin": "none", "NotifyRecipient": "none", **dict(policy)}
    sections = {
        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
        "smtpgw.policy": list(policy_keys.items()),
        "smtpgw.antispam": [("Check", "true"), *antispam],
    }
    for name, items in extra.items():
        sections[name.replace("__", ".")] = list(items)
    return make_gateway(sink.port, extra=sections, start=start)


def send(gw, data, sender="alice@example.test", source=None):
    if source is None:
        with smtplib.SMTP("127.0.0.1", gw.port) as client:
            client.sendmail(sender, ["bob@example.test"], data)
        return
    c = RawClient(gw.port, source=source)
    c.reply()
    c.cmd("EHLO client.test")
    c.cmd(f"MAIL FROM:<{sender}>")
    c.cmd("RCPT TO:<bob@example.test>")
    c.cmd("DATA")
    c.send(data + b".\r\n")
    assert c.reply()[0] == 250
    c.cmd("QUIT")


def test_gtube_is_tagged_spam_and_ham_passes(make_gateway, sink, clamd):
    gw = spam_gateway(make_gateway, sink, clamd)
    send(gw, SPAM)
    send(gw, HAM)
    got = {b"GTUBE" in m.data: m.data for m in sink.wait_for(2)}
    assert b"X-SpamTest-Status: Spam\r\n" in got[True]
    assert b"\r\nSubject: [SPAM] minutes of the meeting\r\n" in got[True]
    assert b"X-SpamTest-Status: Not Detected\r\n" in got[False]
    assert b"\r\nSubject: minutes of the meeting\r\n" in got[False]
    gw.wait_log(r'AS-SCANNED, group=policy, nrcpt=1, as-status="Spam", score=1\.0000, method="rules", action=tag')


@pytest.mark.parametrize("action", ["block", "quarantine"])
def test_spam_block_and_quarantine_actions(make_gateway, sink, clamd, action):
    gw = spam_gateway(make_gateway, sink, clamd, policy=[("ActionSpam", action)])
    send(gw, SPAM)
    send(gw, HAM)
    gw.wait_log(r'BLOCKED, rcpt=bob@example.test, size=\d+, reason="Spam, ActionSpam=' + action)
    [got] = sink.wait_for(1)
    assert b"GTUBE" not in got.data
    quarantine = os.path.join(gw.folder, "var", "quarantine")
    stored = wait_until(lambda: os.path.isdir(quarantine) and os.listdir(quarantine), 10, "quarantine") if action == "quarantine" else []
    if action == "quarantine":
        listing = gw.cli("store", "--path", "quarantine", "list").stdout
        assert " SPM " in listing and stored


def test_white_and_black_lists(make_gateway, sink, clamd):
    gw = spam_gateway(make_gateway, sink, clamd, antispam=[("WhiteListSenders", "*@trusted.test"),
                                                           ("BlackListSenders", "*@spammer.test")])
    send(gw, SPAM, sender="boss@trusted.test")
    send(gw, HAM, sender="promo@spammer.test")
    got = {m.sender: m.data for m in sink.wait_for(2)}
    assert b"X-SpamTest-Status: Trusted\r\n" in got["boss@trusted.test"]
    assert b"X-SpamTest-Status: Blacklisted\r\n" in got["promo@spammer.test"]
    assert b"Subject: [SPAM] " in got["promo@spammer.test"]  # a blacklisted sender is acted on as Spam


def sendmail(gw, data, rcpts, sender="alice@example.test"):
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail(sender, list(rcpts), data)


def test_each_group_has_its_own_level_lists_and_prefixes(make_gateway, sink, clamd):
    """One message split between groups: each copy is judged with its group's SpamDetection,
    lists and Subject prefix; omitted keys come from [smtpgw.antispam]."""
    gw = spam_gateway(make_gateway, sink, clamd, antispam=[("SpamDetection", "soft")], **{
        "smtpgw__group:strict": [("Recipients", "*@strict.example.test"), ("SpamDetection", "hard"),
                                 ("ProbableSpamSubjectPrefix", '"[maybe spam] "')],
        "smtpgw__group:lab": [("Recipients", "*@lab.example.test"), ("WhiteListSenders", "*@example.test")]})
    sendmail(gw, BORDERLINE, ["bob@example.test", "carol@strict.example.test"])
    got = {m.recipients[0]: m.data for m in sink.wait_for(2)}
    assert b"X-SpamTest-Status: Not Detected\r\n" in got["bob@example.test"]
    assert b"\r\nSubject: minutes of the meeting\r\n" in got["bob@example.test"]
    assert b"X-SpamTest-Status: Probable Spam\r\n" in got["carol@strict.example.test"]
    assert b"\r\nSubject: [maybe spam] minutes of the meeting\r\n" in got["carol@strict.example.test"]
    gw.wait_log(r'AS-SCANNED, group=strict, nrcpt=1, as-status="Probable Spam", score=0\.\d+, .*action=tag')
    gw.wait_log(r'AS-SCANNED, group=policy, nrcpt=1, as-status="Not Detected", score=0\.\d+')
    sendmail(gw, SPAM, ["bob@example.test", "dave@lab.example.test"])
    got = {m.recipients[0]: m.data for m in sink.wait_for(4)[2:]}
    assert b"X-SpamTest-Status: Spam\r\n" in got["bob@example.test"]  # the lab's white list is its own
    assert b"X-SpamTest-Status: Trusted\r\n" in got["dave@lab.example.test"]
    assert b"\r\nSubject: minutes of the meeting\r\n" in got["dave@lab.example.test"]


def test_a_quarantined_spam_is_noticed_to_the_admin_of_its_group(make_gateway, sink, clamd):
    """NotifyAdmin=spam: the admin learns of each spam its ActionSpam stopped; a group that
    leaves spam out of its NotifyAdmin stops its copy without a notice."""
    gw = spam_gateway(make_gateway, sink, clamd, policy=[("ActionSpam", "quarantine"), ("NotifyAdmin", "infected, spam")],
                      **{"smtpgw__group:quiet": [("Recipients", "*@quiet.example.test"), ("NotifyAdmin", "infected")]})
    sendmail(gw, SPAM, ["bob@example.test", "dave@quiet.example.test"])
    gw.wait_log(r'BLOCKED, rcpt=bob@example.test, size=\d+, reason="Spam, ActionSpam=quarantine')
    gw.wait_log(r'BLOCKED, rcpt=dave@quiet.example.test, size=\d+, reason="Spam, ActionSpam=quarantine')
    [notice] = sink.wait_for(1)
    wait_until(lambda: not gw.queued(), 10, "empty queue")  # every notice the scan asked for has been sent
    assert len(sink.messages) == 1
    assert (notice.sender, notice.recipients) == ("gateway@example.test", ["admin@example.test"])
    parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert parsed["Subject"] == "[policy] Blocked message (Spam): minutes of the meeting"
    assert [a.addr_spec for a in parsed["To"].addresses] == ["admin@example.test"]
    body = parsed.get_body(("plain",)).get_content()
    assert "Status:       Spam" in body and "Spam filter verdict: Spam (method: rules)" in body
    assert "Recipients:   bob@example.test" in body and "dave@" not in body
    listing = gw.cli("store", "--path", "quarantine", "list").stdout
    assert listing.count(" SPM ") == 2, listing  # both copies held


def test_a_quoted_sender_cannot_break_the_quoting_of_log_fields(make_gateway, sink, clamd):
    """The AS-SCANNED ``reasons="..."`` field names a listed sender; a quoted local part (RFC 5321
    §4.1.2) holding a double quote must not end the field early and fake the fields after it."""
    gw = spam_gateway(make_gateway, sink, clamd, antispam=[("BlackListSenders", "*@spammer.test")])
    send(gw, HAM, sender='"x\\", action=pass, y"@spammer.test')
    sink.wait_for(1)
    [line] = gw.wait_log(r"AS-SCANNED")
    assert fields(line.split(": ", 1)[1]) == ["AS-SCANNED", "group", "nrcpt", "as-status", "score", "method",
                                              "action", "reasons"], line
    assert 'reasons="sender \\"x\\\\\\", action=pass, y\\"@spammer.test in BlackListSenders' in line, line


def test_dnsbl_listing_adds_to_the_score(make_gateway, sink, clamd, tmp_path):
    require("dnsmasq")
    (tmp_path / "dns").mkdir()
    server = start_dnsmasq(str(tmp_path / "dns"))
    try:
        ip, port = server.address
        gw = spam_gateway(make_gateway, sink, clamd,
                          smtpgw__resolve=[("Nameserver", f"{ip}:{port}"), ("IONetworkTimeout", "2")],
                          smtpgw__access=[("DNSBlackList", "dnsbl.test"), ("RelayRule", "allow from any to *")])
        send(gw, HAM, source="127.0.0.2")  # RFC 5782 §5: 127.0.0.2 is listed by every DNSBL
        sink.wait_for(1)
        [line] = gw.wait_log(r"AS-SCANNED")
        assert "dnsbl dnsbl.test +" in line
    finally:
        server.stop()


def private_bases(tmp_path) -> str:
    """A BasesPath holding a copy of the shipped spam database, for tests that damage it."""
    bases = tmp_path / "bases"
    (bases / "spam").mkdir(parents=True)
    shutil.copy(os.path.join(default_bases(), "spam", "spam.db"), bases / "spam" / "spam.db")
    return str(bases)


def damage(bases: str) -> None:
    path = os.path.join(bases, "spam", "spam.db")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # a half-copied file: no end line, checksum lost


def test_a_damaged_database_at_reload_keeps_the_loaded_one(make_gateway, sink, clamd, tmp_path):
    """A damaged spam.db seen at .c_db_reload or HUP must not replace the loaded one (spam.spamfilter):
    mail goes on being scanned by the workers that hold the good database, and the log says why."""
    bases = private_bases(tmp_path)
    gw = spam_gateway(make_gateway, sink, clamd, path=[("BasesPath", bases)])
    send(gw, HAM)
    sink.wait_for(1)
    damage(bases)
    gw.control(".c_db_reload")
    gw.wait_log(r"scanner workers not restarted.*spam database unusable: .*truncated")
    gw.signal(signal.SIGHUP)
    gw.wait_log(r"scanner workers not restarted.*spam database unusable", count=2)
    send(gw, SPAM)
    got = sink.wait_for(2)
    assert b"X-SpamTest-Status: Spam\r\n" in got[1].data
    assert "databases reloaded" not in gw.log_text()


CONTENT_SPAM = (b"From: Best Deals <deals@promo-offers.biz>\r\nTo: bob@example.test\r\n"
                b"Subject: Cheap meds online - no prescription needed\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
                b"Message-ID: <x1@promo-offers.biz>\r\n\r\nBuy viagra cialis cheap, no prescription needed! Lowest "
                b"prices guaranteed, order now and save 80%.\r\nClick here to order: http://promo-offers.biz/buy\r\n"
                b"To be removed from our mailing list click here.\r\n")
# A spam far beyond the Spam threshold: its content alone scores over AutoLearnSpamScore's default.
AUTOLEARN_SPAM = CONTENT_SPAM.replace(b"To be removed", (
    b"Act now, this limited time offer expires soon! 100% satisfaction guaranteed or your money back.\r\n"
    b"FREE shipping worldwide, discreet packaging, no doctor visit, no questions asked.\r\n"
    b"Thousands of satisfied customers. Best online pharmacy, brand and generic medications at the lowest prices.\r\n"
    b"Earn extra cash from home, make money fast, work from home opportunity, be your own boss!\r\n"
    b"You are receiving this email because you opted in. To be removed"))


def test_a_released_spam_is_learned_as_ham_and_rescanned_as_ham(make_gateway, sink, clamd, tmp_path):
    """LearnOnRelease=yes: ``store release`` of a quarantined spam learns it into the site layer
    first, and the running workers' scan of the released copy already counts it."""
    bases = private_bases(tmp_path)
    gw = spam_gateway(make_gateway, sink, clamd, path=[("BasesPath", bases)],
                      policy=[("ActionSpam", "quarantine")], antispam=[("LearnOnRelease", "yes")])
    send(gw, CONTENT_SPAM)
    gw.wait_log(r'AS-SCANNED, .*as-status="Spam", score=\S+, method="content", action=quarantine')
    quarantine = Store(os.path.join(gw.folder, "var", "quarantine"))
    [item] = wait_until(lambda: quarantine.list() if os.path.isdir(quarantine.path) else None, 10, "quarantined")
    site = site_file(bases)
    assert not os.path.exists(site)
    released = gw.cli("store", "--path", "quarantine", "release", item.id)
    assert f"{item.id} learned as ham into {site}" in released.stdout, released.stderr
    layer = SpamDatabase.load(site)
    assert (layer.bayes.nham, layer.bayes.nspam) == (1, 0)
    [got] = sink.wait_for(1)
    assert b"X-SpamTest-Status: Not Detected\r\n" in got.data and b"Buy viagra" in got.data
    gw.wait_log(r"site spam database .*site-spam\.db loaded \(version=site, date=\S+, ham=1, spam=0\)")


def test_auto_learn_learns_a_confident_spam_and_the_workers_count_it(make_gateway, sink, clamd, tmp_path):
    """AutoLearn=yes: a spam far beyond the Spam threshold, sent over SMTP, is learned into the site
    layer by the worker that scanned it; GTUBE (a forced rule) is not; the next message is scanned
    with the site layer read again, without a restart."""
    bases = private_bases(tmp_path)
    gw = spam_gateway(make_gateway, sink, clamd, path=[("BasesPath", bases)], antispam=[("AutoLearn", "yes")])
    send(gw, SPAM)
    send(gw, AUTOLEARN_SPAM)
    gw.wait_log(r": auto-learned as spam into " + re.escape(site_file(bases)))
    sink.wait_for(2)
    layer = SpamDatabase.load(site_file(bases))
    assert (layer.bayes.nham, layer.bayes.nspam) == (0, 1)
    send(gw, HAM)
    sink.wait_for(3)
    gw.wait_log(r"site spam database .*site-spam\.db loaded \(version=site, date=\S+, ham=0, spam=1\)")
    assert len(gw.wait_log(r"auto-learned as")) == 1


def test_a_learning_file_in_the_control_folder_is_learned_into_the_site_layer(make_gateway, sink, clamd, tmp_path):
    bases = private_bases(tmp_path)
    gw = spam_gateway(make_gateway, sink, clamd, path=[("BasesPath", bases)])
    os.makedirs(gw.control_path, exist_ok=True)
    with open(os.path.join(gw.control_path, ".l_spam_report1"), "wb") as drop:
        drop.write(HAM)
    gw.wait_log(r"control learning file \.l_spam_report1: learned 1 spam message\(s\) into " + re.escape(site_file(bases)))
    layer = SpamDatabase.load(site_file(bases))
    assert (layer.bayes.nham, layer.bayes.nspam) == (0, 1)
    assert not os.path.exists(os.path.join(gw.control_path, ".l_spam_report1"))
    with open(os.path.join(gw.control_path, ".l_ham_empty"), "wb"):
        pass  # no message in it: learned as nothing, removed all the same
    gw.wait_log(r"control learning file \.l_ham_empty: learned 0 ham message\(s\)")
    assert not os.path.exists(os.path.join(gw.control_path, ".l_ham_empty"))


def test_a_damaged_site_layer_never_stops_mail(make_gateway, sink, clamd, tmp_path):
    bases = private_bases(tmp_path)
    with open(site_file(bases), "wb") as damaged:
        damaged.write(b"smtpgw-spam-db\t2\nversion\tsite\n")  # a half-written copy
    gw = spam_gateway(make_gateway, sink, clamd, path=[("BasesPath", bases)])
    gw.wait_log(r"bases: anti-spam version=\S+, date=\S+, ham=\d+, spam=\d+ \(site layer: ignored, .*truncated")
    send(gw, SPAM)
    send(gw, HAM)
    got = {b"GTUBE" in m.data: m.data for m in sink.wait_for(2)}
    assert b"X-SpamTest-Status: Spam\r\n" in got[True]
    assert b"X-SpamTest-Status: Not Detected\r\n" in got[False]
    gw.wait_log(r"site spam database ignored, the shipped one alone is used: .*truncated")


def test_a_damaged_database_at_start_is_named(make_gateway, sink, clamd, tmp_path):
    bases = private_bases(tmp_path)
    damage(bases)
    gw = spam_gateway(make_gateway, sink, clamd, path=[("BasesPath", bases)], start=False)
    result = subprocess.run([sys.executable, SMTPGW, "-c", gw.config, "-n"], cwd=gw.folder,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "spam database unusable" in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_antispam_off_does_not_need_the_database(make_gateway, sink, clamd, tmp_path):
    """With [smtpgw.antispam] Check=false the workers never read spam.db: a missing one stops nothing."""
    bases = tmp_path / "empty-bases"
    bases.mkdir()
    gw = make_gateway(sink.port, extra={"path": [("BasesPath", str(bases))],
                                        "smtpgw.ave": [("ClamdAddress", clamd.unix_address)],
                                        "smtpgw.policy": [("Check", "true"), ("NotifyAdmin", "none"),
                                                          ("NotifyRecipient", "none")]})
    send(gw, HAM)
    [got] = sink.wait_for(1)
    assert b"X-SpamTest" not in got.data


def scanner_workers(gw) -> list[int]:
    """The gateway's live child processes (not the retired ones not yet reaped) that are its scanner
    workers (not its incoming processes, IncomingProcesses)."""
    with open(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]

    def worker(pid: int) -> bool:
        with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return stat.read().rpartition(")")[2].split()[0] != "Z" and b"smtpgw.scan.job" in cmdline.read()

    return [pid for pid in children if worker(pid)]


def test_a_replaced_worker_keeps_the_configuration_the_gateway_accepted(make_gateway, sink, clamd, tmp_path):
    """A file: list gone at HUP is a refused reload (the old lists stay); a worker started after that
    (on demand, or replacing one that died) must scan with the accepted lists, not read the broken
    configuration itself and exit."""
    white = tmp_path / "white.txt"
    white.write_text("*@trusted.test\n")
    gw = spam_gateway(make_gateway, sink, clamd, antispam=[("WhiteListSenders", f"file:{white}")])
    send(gw, HAM, sender="boss@trusted.test")
    sink.wait_for(1)
    white.write_text("*@other.test\n")  # re-read at reload
    gw.signal(signal.SIGHUP)
    gw.wait_log(r"configuration reloaded")
    send(gw, HAM, sender="boss@trusted.test")
    assert b"X-SpamTest-Status: Not Detected\r\n" in sink.wait_for(2)[1].data
    white.unlink()
    gw.signal(signal.SIGHUP)
    gw.wait_log(r"reload refused: .*white\.txt")
    workers = scanner_workers(gw)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    gw.wait_log(r"scanner worker \d+: worker exited", count=len(workers))
    send(gw, HAM, sender="boss@other.test")
    got = sink.wait_for(3)[2]
    assert got.sender == "boss@other.test" and b"X-SpamTest-Status: Trusted\r\n" in got.data


def test_a_tagged_message_is_sent_archived_and_returned_with_its_new_header(make_gateway, sink, clamd):
    """A scan that changed only the header (X-SpamTest-*, the Subject tag) leaves msg/ID as received
    and puts the header in the queue record: every reader gets the message with it — the next hop
    (with SIZE= its size), the outgoing archive, the DSN that returns it."""
    gw = spam_gateway(make_gateway, sink, clamd, smtpgw__path=[("OutgoingArchivePath", "var/arch_out")])
    sink.rcpt_reply = lambda addr: "550 5.1.1 no such user" if addr.startswith("gone@") else None
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail("alice@example.test", ["bob@example.test", "gone@example.test"], SPAM)
    got = sink.wait_for(2)
    [sent] = [m for m in got if m.sender]
    [dsn] = [m for m in got if not m.sender]
    assert b"\r\nSubject: [SPAM] minutes of the meeting\r\n" in sent.data and sent.data.endswith(b"\r\nAlice\r\n")
    assert f" SIZE={len(sent.data)}" in sent.mail_line
    assert b"\r\nSubject: [SPAM] minutes of the meeting\r\n" in dsn.data and b"X-SpamTest-Status: Spam" in dsn.data
    folder = os.path.join(gw.folder, "var", "arch_out")

    def archived() -> list[bytes]:
        names = [n for n in os.listdir(folder) if n.endswith(".eml")] if os.path.isdir(folder) else []
        return [open(os.path.join(folder, n), "rb").read() for n in names]
    copies = wait_until(lambda: [c for c in archived() if b"GTUBE" in c] or None, 20, "the archived copy")
    assert copies == [sent.data]
