"""A site's signed database update, published over HTTP on loopback, reaches a running gateway:
keepup2date verifies and installs it, drops .c_db_reload, and the next message gets the new
verdict without a restart. A set whose signature does not verify changes nothing."""

from __future__ import annotations

import base64
import os

from smtpgw.spam import dbindex
from smtpgw.spam.database import DatabaseInfo, SpamDatabase
from smtpgw.spam.rules import parse_rule
from smtpgw.update import signing
from tests.e2e.test_antispam_gateway import HAM, private_bases, send, spam_gateway
from tests.support.updates import SetServer, publish

UPDATED, CRITICAL = 1, 10


def retrained(bases: str, folder: str, version: str) -> str:
    """A bases folder whose spam database is the installed one plus a site rule that makes the
    meeting minutes spam, as a site's retraining might."""
    database = SpamDatabase.load(os.path.join(bases, "spam", "spam.db"))
    database.rules.append(parse_rule("SITE_MINUTES spam all header:subject minutes of the meeting"))
    database.info = DatabaseInfo(version=version, date="2099-01-01", source="site retraining")
    out = os.path.join(folder, f"retrained-{version}")
    os.makedirs(os.path.join(out, "spam"))
    database.save(os.path.join(out, "spam", "spam.db"))
    return out


def verdict(sink, count: int) -> bytes:
    data = sink.wait_for(count)[-1].data
    return data.split(b"X-SpamTest-Status: ", 1)[1].split(b"\r\n", 1)[0]


def test_a_signed_update_changes_the_verdict_of_a_running_gateway(make_gateway, sink, clamd, tmp_path):
    folder = str(tmp_path)
    bases = private_bases(tmp_path)
    key = os.path.join(folder, "keys", "site")
    signing.generate(key)
    os.makedirs(os.path.join(folder, "www"))
    www = SetServer(os.path.join(folder, "www"))
    try:
        gw = spam_gateway(make_gateway, sink, clamd, path=[("BasesPath", bases)],
                          updater__path=[("BackUpPath", "var/bases.backup"), ("UploadPatchPath", "var/updates")],
                          updater__options=[("PublicKey", key + ".pub"), ("UpdateServerUrl", www.url("site"))])
        send(gw, HAM)
        assert verdict(sink, 1) == b"Not Detected"

        made = gw.cli("keepup2date", "make-bundle", "--key", key, "--db", retrained(bases, folder, "2099.01.01-1"),
                      "--out", os.path.join(folder, "set-1"))
        assert made.returncode == 0, made.stderr
        publish(www, os.path.join(folder, "set-1"), "site")
        done = gw.cli("keepup2date")
        assert done.returncode == UPDATED, done.stdout + done.stderr
        assert "signed by ed25519:" in done.stdout
        assert "bases/spam/spam.db: index built" in done.stdout
        gw.wait_log(r"databases reloaded")
        # keepup2date built the new spam.db's shared index (spam/dbindex.py): the gateway maps it as is
        assert "built again" not in gw.log_text()
        installed = os.path.join(bases, "spam", "spam.db")
        with open(dbindex.index_file(installed), "rb") as index:
            assert dbindex._check(index.fileno(), dbindex._source_of(installed)) is None
        send(gw, HAM)
        assert verdict(sink, 2) == b"Spam"

        installed = open(os.path.join(bases, "spam", "spam.db"), "rb").read()
        made = gw.cli("keepup2date", "make-bundle", "--key", key, "--db", private_bases(tmp_path / "other"),
                      "--version", "2099.01.02-1", "--out", os.path.join(folder, "set-2"))
        assert made.returncode == 0, made.stderr
        signature = os.path.join(folder, "set-2", "index.json.sig")
        public, encoded = open(signature).read().split()
        raw = bytearray(base64.b64decode(encoded))
        raw[40] ^= 0x04
        with open(signature, "w") as handle:
            handle.write(f"{public} {base64.b64encode(bytes(raw)).decode()}\n")
        publish(www, os.path.join(folder, "set-2"), "site-2")
        done = gw.cli("keepup2date", "-s", www.url("site-2"))
        assert done.returncode == CRITICAL, done.stdout + done.stderr
        assert "does not verify" in done.stdout
        assert open(os.path.join(bases, "spam", "spam.db"), "rb").read() == installed
        assert not os.path.exists(os.path.join(gw.control_path, ".c_db_reload"))
    finally:
        www.close()
