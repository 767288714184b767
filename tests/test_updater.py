"""keepup2date (smtpgw/update/updater.py) against real update sets: a local folder, an HTTP
server on 127.0.0.1 (tests/support/updates.py: stdlib http.server in a thread), a real clamd for signature files.
Sets are signed with keys the tests make (smtpgw/update/signing.py); each host trusts the key
``keys/release`` of its test's folder unless a test says otherwise.

Return codes checked as kmg-spec §6.1 gives them: 0 no update needed, 1 updated,
10 critical error, 30 post-update command failed, 75 configuration unreadable/invalid.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Any

import pytest

from smtpgw.scan.clamd import ClamdServer
from smtpgw.spam.bayes import Bayes
from smtpgw.spam.database import SITE_FILE_NAME, DatabaseInfo, SpamDatabase, site_file
from smtpgw.spam.dbindex import index_file, open_database
from smtpgw.spam.spamfilter import SpamFilter
from smtpgw.spam.training import learn_files
from smtpgw.update import signing, updater
from tests.support.components import require
from tests.support.net import BASE_CONFIG, REPO, wait_until
from tests.support.updates import publish, server  # noqa: F401 (server: a fixture)

NO_UPDATE, UPDATED, CRITICAL, POST_FAILED, CONFIG_INVALID = 0, 1, 10, 30, 75


# region update sets and configurations

def spam_db(path: str, version: str) -> bytes:
    """Write a small real spam database of ``version``; its bytes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    info = DatabaseInfo(version=version, date="2024-01-01", source="test")
    SpamDatabase(info, Bayes({f"token{version}": (1, 2)}, 1, 2)).save(path)
    with open(path, "rb") as handle:
        return handle.read()


def key_pair(folder: str, name: str = "release") -> str:
    """The PREFIX of the key pair ``folder``/keys/NAME, made on first use."""
    prefix = os.path.join(folder, "keys", name)
    if not os.path.exists(prefix):
        signing.generate(prefix)
    return prefix


def sign(update_set: str, *prefixes: str) -> None:
    """Write the set's index.json.sig, signed by each secret key file."""
    secrets = [signing.read_secret_key(prefix) for prefix in prefixes]
    write(os.path.join(update_set, "index.json.sig"), signing.sign_index(read(os.path.join(update_set, "index.json")),
                                                                         secrets))


def make_set(folder: str, version: str, extra: dict[str, bytes] | None = None,
             clamd: dict[str, bytes] | None = None, signers: tuple[str, ...] | None = None) -> str:
    """An update set in ``folder``/set-VERSION: spam/spam.db of that version plus ``extra``
    bases files and ``clamd`` signature files, signed by the key files ``signers`` (default:
    the folder's release key; none: unsigned)."""
    bases = os.path.join(folder, f"src-{version}")
    spam_db(os.path.join(bases, "spam", "spam.db"), version)
    for name, data in (extra or {}).items():
        write(os.path.join(bases, name), data)
    clamd_files = []
    for name, data in (clamd or {}).items():
        clamd_files.append(os.path.join(folder, f"clamd-{version}", name))
        write(clamd_files[-1], data)
    out = os.path.join(folder, f"set-{version}")
    updater.build_update_set(bases, out, clamd_files=clamd_files)
    signers = (key_pair(folder),) if signers is None else signers
    if signers:
        sign(out, *signers)
    return out


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@dataclass
class Host:
    """A gateway host's files: configuration, bases, backup, control folder, report."""

    folder: str
    source: str = ""
    extra: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # PublicKey values; default: the release key beside the host

    def __post_init__(self) -> None:
        os.makedirs(self.control, exist_ok=True)
        self.keys = self.keys or [key_pair(os.path.dirname(self.folder)) + ".pub"]
        self.write_config()

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    @property
    def config(self) -> str:
        return self.path("smtpgw.conf")

    @property
    def bases(self) -> str:
        return self.path("bases")

    @property
    def control(self) -> str:
        return self.path("var", "control")

    @property
    def report(self) -> str:
        return self.path("keepup2date.log")

    def write_config(self) -> None:
        sections = {name: list(items) for name, items in BASE_CONFIG.items()}
        sections["path"] = [("BasesPath", "bases")]
        sections["updater.path"] = [("BackUpPath", "bases.backup"), ("PidFile", "var/keepup2date.pid"),
                                    ("UploadPatchPath", "var/updates")]
        sections["updater.options"] = [("ConnectTimeout", "10")] + [("PublicKey", key) for key in self.keys] + (
            [("UpdateServerUrl", self.source)] if self.source else [])
        sections["updater.report"] = [("ReportFileName", "keepup2date.log"), ("Append", "true"), ("ReportLevel", "4")]
        for name, items in self.extra.items():  # an extra key replaces the one set above
            keys = {key for key, _ in items}
            sections[name] = [item for item in sections.get(name, []) if item[0] not in keys] + items
        with open(self.config, "w", encoding="utf-8") as handle:
            for name, items in sections.items():
                handle.write(f"[{name}]\n" + "".join(f"{key}={value}\n" for key, value in items))

    def keepup2date(self, *args: str) -> int:
        return updater.main(list(args), self.config)

    def use(self, source: str, keys: list[str] | None = None) -> None:
        """Take updates from ``source`` from now on (trusting ``keys`` when given)."""
        self.source = source
        self.keys = keys or self.keys
        self.write_config()

    def installed_version(self) -> str | None:
        index = updater.read_index(os.path.join(self.bases, "index.json"))
        return index.version if index else None

    def report_text(self) -> str:
        return read(self.report).decode() if os.path.exists(self.report) else ""

    def take_reload_request(self) -> bool:
        """Whether .c_db_reload was dropped (and take it away, as the gateway does)."""
        marker = os.path.join(self.control, ".c_db_reload")
        if not os.path.exists(marker):
            return False
        os.unlink(marker)
        return True

    def snapshot(self) -> dict[str, bytes]:
        """Every file under the bases folder (lock file and the spam database's index, a cache
        naming its database's modification time, left out)."""
        files = {}
        for folder, _, names in os.walk(self.bases):
            for name in names:
                if name not in (".keepup2date.pid", os.path.basename(index_file("spam.db"))):
                    path = os.path.join(folder, name)
                    files[os.path.relpath(path, self.bases)] = read(path)
        return files


def installed_host(tmp_path, version: str, **contents: dict[str, bytes]) -> Host:
    """A host that installed the set ``version`` (made in tmp_path, with ``extra`` or ``clamd``
    files) and whose reload request was taken."""
    host = Host(str(tmp_path / "host"), source=make_set(str(tmp_path), version, **contents))
    assert host.keepup2date() == UPDATED
    host.take_reload_request()
    return host


# endregion
# region updating


def test_local_folder_installs_then_nothing_to_do(tmp_path) -> None:
    update_set = make_set(str(tmp_path), "2024.01.10-1", extra={"spam/notes.txt": b"notes"})
    host = Host(str(tmp_path / "host"), source=update_set)
    assert host.keepup2date() == UPDATED
    assert read(os.path.join(host.bases, "spam", "spam.db")) == read(os.path.join(update_set, "bases", "spam", "spam.db"))
    assert read(os.path.join(host.bases, "spam", "notes.txt")) == b"notes"
    assert host.installed_version() == "2024.01.10-1"
    assert host.take_reload_request()
    assert not os.path.exists(host.path("var", "keepup2date.pid"))  # the lock is gone after the run
    assert host.keepup2date() == NO_UPDATE
    assert not host.take_reload_request()
    assert "no update needed" in host.report_text()


def test_the_new_spam_database_is_indexed_before_the_gateway_reloads(tmp_path) -> None:
    """keepup2date builds the new database's shared index itself, so that the gateway's reload
    maps it at once rather than building it beside its event loop."""
    host = installed_host(tmp_path, "18.0")
    host.use(make_set(str(tmp_path), "18.1"))
    assert host.keepup2date() == UPDATED and host.take_reload_request()
    database = os.path.join(host.bases, "spam", "spam.db")
    built = os.stat(index_file(database))
    assert "bases/spam/spam.db: index built" in host.report_text()
    assert open_database(database).info.version == "18.1"
    mapped = os.stat(index_file(database))  # opened as it was, not built again (a rebuild renames a new file)
    assert (mapped.st_ino, mapped.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)


def test_an_update_and_a_rollback_keep_what_the_site_learned(tmp_path) -> None:
    """The site layer (``site-spam.db`` beside BasesPath) is not keepup2date's: a new shipped
    database and a rollback leave it as it was, and the filter adds it to whichever is installed."""
    host = installed_host(tmp_path, "18.0")
    message = tmp_path / "released.eml"
    message.write_bytes(b"From: a@example.test\r\nSubject: token18.0 quarterly report\r\n\r\ntoken18.0 figures\r\n")
    assert learn_files(host.bases, [str(message)], is_spam=False) == 1
    site = site_file(host.bases)
    learned = read(site)
    host.use(make_set(str(tmp_path), "18.1"))
    assert host.keepup2date() == UPDATED and host.installed_version() == "18.1"
    assert read(site) == learned
    assert all(SITE_FILE_NAME not in names for _, _, names in os.walk(host.path("bases.backup")))
    layers = SpamFilter(SimpleNamespace(Check=True, SpamDetection="standard"), host.bases)
    assert layers.database.info.version == "18.1"
    layer = layers.site.current()
    assert layer is not None and (layer.bayes.nham, layer.bayes.nspam) == (1, 0)
    assert host.keepup2date("--rollback") == UPDATED and host.installed_version() == "18.0"
    assert read(site) == learned


def test_http_update_keeps_backup_and_asks_the_gateway_to_reload(tmp_path, server) -> None:
    folder = str(tmp_path)
    host = installed_host(tmp_path, "2024.01.10-1", extra={"spam/old.txt": b"old"})
    before = host.snapshot()
    host.use(publish(server, make_set(folder, "2024.02.01-1"), "updates"))
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "2024.02.01-1"
    assert not os.path.exists(os.path.join(host.bases, "spam", "old.txt"))  # dropped by the new set
    assert host.take_reload_request()
    backup = updater.read_index(host.path("bases.backup", "index.json"))
    assert backup is not None and backup.version == "2024.01.10-1"
    assert read(host.path("bases.backup", "bases", "spam", "spam.db")) == before[os.path.join("spam", "spam.db")]
    assert read(host.path("bases.backup", "bases", "spam", "old.txt")) == b"old"
    assert any("GET /updates/bases/spam/spam.db" in line for line in server.requests)
    assert os.listdir(host.path("var", "updates")) == []  # the temporary folder is removed


def test_files_of_the_administrator_stay_and_odd_names_stay_out_of_the_backup(tmp_path) -> None:
    host = installed_host(tmp_path, "18.0")
    local = os.path.join(host.bases, "spam", "our list.txt")  # a space: never a name of a set
    write(local, b"local")
    host.use(make_set(str(tmp_path), "18.1"))
    assert host.keepup2date() == UPDATED
    assert read(local) == b"local"
    assert "backup: " in host.report_text() and "our list.txt: left out" in host.report_text()
    assert host.keepup2date("--rollback") == UPDATED
    assert read(local) == b"local"


def test_only_changed_files_are_downloaded(tmp_path, server) -> None:
    folder = str(tmp_path)
    host = installed_host(tmp_path, "1.0", extra={"spam/same.txt": b"same"})
    host.use(publish(server, make_set(folder, "1.1", extra={"spam/same.txt": b"same"}), "u"))
    assert host.keepup2date() == UPDATED
    fetched = [line.split()[1] for line in server.requests]
    assert fetched == ["/u/index.json", "/u/index.json.sig", "/u/bases/spam/spam.db"]


def test_post_update_command_runs_and_its_failure_is_30(tmp_path) -> None:
    folder = str(tmp_path)
    seen = tmp_path / "seen"
    host = Host(str(tmp_path / "host"), source=make_set(folder, "3.0"),
                extra={"updater.options": [("PostUpdateCmd", f'echo "$SMTPGW_BASES_VERSION" > {seen}')]})
    assert host.keepup2date() == UPDATED
    assert seen.read_text() == "3.0\n"
    assert not host.take_reload_request()  # PostUpdateCmd replaces the default action
    host.source = make_set(folder, "3.1")
    host.extra = {"updater.options": [("PostUpdateCmd", "echo cannot reload >&2; exit 3")]}
    host.write_config()
    assert host.keepup2date() == POST_FAILED
    assert host.installed_version() == "3.1"  # the bases are installed all the same
    assert "exited with 3: cannot reload" in host.report_text()


@pytest.mark.parametrize("damage", ["flipped byte", "longer", "shorter"])
def test_damaged_download_leaves_the_installed_bases_untouched(tmp_path, server, damage) -> None:
    folder = str(tmp_path)
    host = installed_host(tmp_path, "5.0")
    before = host.snapshot()
    url = publish(server, make_set(folder, "5.1"), "u")
    target = os.path.join(server.root, "u", "bases", "spam", "spam.db")
    data = bytearray(read(target))
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    elif damage == "longer":
        data += b"x"
    else:
        del data[-1]
    write(target, bytes(data))
    host.use(url)
    assert host.keepup2date() == CRITICAL
    assert host.snapshot() == before
    assert not host.take_reload_request()
    assert not os.path.exists(host.path("bases.backup"))  # no backup before the download checked out
    assert os.listdir(host.path("var", "updates")) == []
    expected = {"flipped byte": "SHA-256 differs", "longer": "longer than", "shorter": "bytes, the index gives"}
    assert expected[damage] in host.report_text()


def test_a_database_that_does_not_load_is_refused(tmp_path) -> None:
    host = installed_host(tmp_path, "6.0")
    before = host.snapshot()
    bases = tmp_path / "broken"
    write(str(bases / "spam" / "spam.db"), b"smtpgw-spam-db\t1\nversion\t6.1\n")  # truncated
    updater.build_update_set(str(bases), str(tmp_path / "broken-set"), version="6.1")
    sign(str(tmp_path / "broken-set"), key_pair(str(tmp_path)))
    host.use(str(tmp_path / "broken-set"))
    assert host.keepup2date() == CRITICAL
    assert host.snapshot() == before
    assert "not a usable spam database" in host.report_text()


def test_an_older_signed_set_is_refused(tmp_path, server) -> None:
    folder = str(tmp_path)
    host = installed_host(tmp_path, "2024.03.01-2")
    before = host.snapshot()
    host.use(publish(server, make_set(folder, "2024.03.01-1"), "u"))
    assert host.keepup2date() == CRITICAL
    assert host.snapshot() == before
    assert not host.take_reload_request()
    assert "version 2024.03.01-1 is older than the installed 2024.03.01-2" in host.report_text()
    assert not any("spam.db" in line for line in server.requests)  # refused before any download


def test_missing_files_of_the_installed_version_are_restored(tmp_path) -> None:
    host = installed_host(tmp_path, "7.0", extra={"spam/a.txt": b"a"})
    os.unlink(os.path.join(host.bases, "spam", "a.txt"))
    assert host.keepup2date() == UPDATED
    assert read(os.path.join(host.bases, "spam", "a.txt")) == b"a"


def test_after_an_interrupted_update_the_backup_from_before_is_kept(tmp_path) -> None:
    host = installed_host(tmp_path, "20.0")
    host.use(make_set(str(tmp_path), "20.1"))
    assert host.keepup2date() == UPDATED
    kept = read(host.path("bases.backup", "bases", "spam", "spam.db"))
    newest = make_set(str(tmp_path), "20.2")
    # as a crash while 20.2 was being installed leaves it: one new file, the journal, the old index
    write(os.path.join(host.bases, "spam", "spam.db"), read(os.path.join(newest, "bases", "spam", "spam.db")))
    write(os.path.join(host.bases, ".keepup2date.installing"), b"20.2")
    host.use(newest)
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "20.2"
    assert read(host.path("bases.backup", "bases", "spam", "spam.db")) == kept
    assert "the previous update was interrupted" in host.report_text()
    assert not os.path.exists(os.path.join(host.bases, ".keepup2date.installing"))


def test_a_damaged_installed_index_does_not_block_updates(tmp_path) -> None:
    host = Host(str(tmp_path / "host"), source=make_set(str(tmp_path), "8.0"))
    write(os.path.join(host.bases, "index.json"), b"{not json")
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "8.0"
    assert "taken as no installed version" in host.report_text()


def test_a_concurrent_run_is_refused_by_the_pid_file(tmp_path, server) -> None:
    host = Host(str(tmp_path / "host"), source=publish(server, make_set(str(tmp_path), "9.0"), "u"))
    server.hold = "spam.db"
    first = subprocess.Popen([sys.executable, "-m", "smtpgw.update.updater", "-c", host.config], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.holding.wait(30), "the first keepup2date never asked for spam.db"
        assert host.keepup2date() == CRITICAL
        assert f"another keepup2date (pid {first.pid}) is running" in host.report_text()
        assert host.installed_version() is None
    finally:
        server.release.set()
        first.wait(60)
    assert first.returncode == UPDATED
    assert host.installed_version() == "9.0"


def test_proxy_is_used_when_configured(tmp_path, server) -> None:
    publish(server, make_set(str(tmp_path), "10.0"), "u")
    proxy = server.url("").removeprefix("http://").rstrip("/")
    host = Host(str(tmp_path / "host"), source="http://updates.example.test/u",
                extra={"updater.options": [("UseProxy", "true"), ("ProxyAddress", proxy)]})
    assert host.keepup2date() == UPDATED
    assert "GET http://updates.example.test/u/index.json HTTP/1.1" in server.requests


def test_a_trickling_server_is_given_up(tmp_path, server) -> None:
    host = Host(str(tmp_path / "host"), source=publish(server, make_set(str(tmp_path), "19.0"), "u"),
                extra={"updater.options": [("ConnectTimeout", "1")]})
    server.trickle = "spam.db"
    assert host.keepup2date() == CRITICAL
    assert "KB/s, given up" in host.report_text()
    assert host.installed_version() is None


def test_unreachable_server_is_a_critical_error(tmp_path, server) -> None:
    url = server.url("u")
    server.close()
    host = Host(str(tmp_path / "host"), source=url)
    assert host.keepup2date() == CRITICAL
    assert "index.json" in host.report_text()

# endregion
# region mirror, rollback, configuration


def test_mirror_mode_copies_the_checked_set_for_other_hosts(tmp_path, server) -> None:
    folder = str(tmp_path)
    host = Host(str(tmp_path / "mirror-host"), source=publish(server, make_set(folder, "11.0"), "u"))
    mirror = str(tmp_path / "mirror")
    assert host.keepup2date("-u", mirror) == UPDATED
    assert host.installed_version() is None  # the mirror host's own bases are not touched
    assert host.keepup2date("-u", mirror) == NO_UPDATE
    other = Host(str(tmp_path / "other"), source=mirror)
    assert other.keepup2date() == UPDATED
    assert other.installed_version() == "11.0"


def test_rollback_restores_the_backup_and_holds_that_version_back(tmp_path) -> None:
    folder = str(tmp_path)
    host = installed_host(tmp_path, "12.0")
    first = host.snapshot()
    host.use(make_set(folder, "12.1"))
    assert host.keepup2date() == UPDATED
    host.take_reload_request()
    assert host.keepup2date("--rollback") == UPDATED
    assert host.take_reload_request()
    restored = host.snapshot()
    assert restored.pop("index.json") != first.pop("index.json")  # it now names 12.1 as rejected
    assert restored == first
    index = updater.read_index(os.path.join(host.bases, "index.json"))
    assert index is not None and (index.version, index.rejected) == ("12.0", ("12.1",))
    assert host.keepup2date() == NO_UPDATE  # 12.1 is not installed again
    host.use(make_set(folder, "12.2"))
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "12.2"


def test_command_line_overrides_backup_temp_and_report(tmp_path) -> None:
    host = installed_host(tmp_path, "16.0")
    host.use(make_set(str(tmp_path), "16.1"))
    backup, temp, report = tmp_path / "other-backup", tmp_path / "other-temp", tmp_path / "other.log"
    assert host.keepup2date("-b", str(backup), "-t", str(temp), "-l", str(report)) == UPDATED
    index = updater.read_index(str(backup / "index.json"))
    assert index is not None and index.version == "16.0"
    assert not os.path.exists(host.path("bases.backup"))
    assert os.listdir(temp) == []
    assert "bases updated to version 16.1" in report.read_text()
    assert "16.1" not in host.report_text()


def test_keep_silent_prints_only_errors(tmp_path, capsys) -> None:
    host = Host(str(tmp_path / "host"), source=make_set(str(tmp_path), "17.0"),
                extra={"updater.options": [("KeepSilent", "true")]})
    with open(host.config, encoding="utf-8") as handle:
        text = handle.read()
    with open(host.config, "w", encoding="utf-8") as handle:  # the report goes to standard output
        handle.write(text.replace("ReportFileName=keepup2date.log\n", ""))
    assert host.keepup2date() == UPDATED
    assert capsys.readouterr().out == ""
    assert host.keepup2date("-s", str(tmp_path / "nowhere")) == CRITICAL
    out = capsys.readouterr().out
    assert "nowhere/index.json" in out and " E]: " in out and " I]: " not in out


def test_rollback_without_a_backup_fails(tmp_path) -> None:
    host = Host(str(tmp_path / "host"))
    assert host.keepup2date("--rollback") == CRITICAL
    assert "no backup to roll back to" in host.report_text()


def test_rollback_refuses_a_damaged_backup(tmp_path) -> None:
    folder = str(tmp_path)
    host = installed_host(tmp_path, "13.0")
    host.use(make_set(folder, "13.1"))
    assert host.keepup2date() == UPDATED
    before = host.snapshot()
    with open(host.path("bases.backup", "bases", "spam", "spam.db"), "ab") as handle:
        handle.write(b"junk")
    assert host.keepup2date("--rollback") == CRITICAL
    assert host.snapshot() == before


def test_configuration_problems_are_75(tmp_path) -> None:
    host = Host(str(tmp_path / "host"))
    assert updater.main([], str(tmp_path / "missing.conf")) == CONFIG_INVALID
    assert host.keepup2date() == CONFIG_INVALID  # no UpdateServerUrl
    host.use("ftp://updates.example.test/set")
    assert host.keepup2date() == CONFIG_INVALID
    with open(host.config, "a", encoding="utf-8") as handle:
        handle.write("[updater.options]\nNoSuchKey=1\n")
    assert host.keepup2date("-s", str(tmp_path)) == CONFIG_INVALID
    assert updater.main(["--no-such-option"], host.config) == CONFIG_INVALID


def test_a_malformed_source_url_is_75_not_a_traceback(tmp_path, capsys) -> None:
    host = Host(str(tmp_path / "host"))
    assert host.keepup2date("-s", "http://[::1/set") == CONFIG_INVALID
    assert "Invalid IPv6 URL" in capsys.readouterr().err
    host.use("http://[::1/set")
    assert host.keepup2date() == CONFIG_INVALID
    assert re.search(r"smtpgw\.conf:\d+: UpdateServerUrl: Invalid IPv6 URL", capsys.readouterr().err)


def test_unreadable_configuration_is_75(tmp_path) -> None:
    host = Host(str(tmp_path / "host"), source=str(tmp_path))
    os.chmod(host.config, 0)
    try:
        if os.geteuid() == 0:  # root reads it anyway: make it unreadable by making it a folder
            os.unlink(host.config)
            os.mkdir(host.config)
        assert host.keepup2date() == CONFIG_INVALID
    finally:
        if os.path.isfile(host.config):
            os.chmod(host.config, 0o644)

# endregion
# region clamd signatures


def test_clamd_signatures_are_checked_installed_and_reloaded(tmp_path, clamd_factory) -> None:
    require("clamscan", "clamav")
    instance = clamd_factory()
    marker = b"SMTPGW-UPDATE-" + b"TEST-SIGNATURE-31d5"
    signature = f"Smtpgw.Test.Update:0:*:{marker.hex()}\n".encode()
    folder = str(tmp_path)
    host = Host(str(tmp_path / "host"), source=make_set(folder, "14.0", clamd={"smtpgw-update.ndb": signature}),
                extra={"smtpgw.ave": [("ClamdAddress", instance.unix_address)]})
    database = os.path.join(instance.workdir, "db")
    scanner = ClamdServer(instance.unix_address)
    assert scanner.instream(marker, 10).status == "clean"
    assert host.keepup2date("--clamd-dir", database) == UPDATED
    assert read(os.path.join(database, "smtpgw-update.ndb")) == signature
    assert "RELOADING" in host.report_text()
    verdict = wait_until(lambda: (v := scanner.instream(marker, 10)).status == "infected" and v, 30,
                         "clamd to detect the new signature")
    assert "Smtpgw.Test.Update.UNOFFICIAL" in verdict.names  # type: ignore[attr-defined]

    broken = make_set(folder, "14.1", clamd={"smtpgw-update.ndb": b"Not:a:valid:signature:zz\n"})
    host.use(broken)
    assert host.keepup2date("--clamd-dir", database) == CRITICAL
    assert read(os.path.join(database, "smtpgw-update.ndb")) == signature
    assert "clamd signature files do not load" in host.report_text()


def test_clamd_files_are_skipped_without_a_clamd_folder(tmp_path) -> None:
    host = Host(str(tmp_path / "host"), source=make_set(str(tmp_path), "15.0", clamd={"x.ndb": b"X:0:*:41424344\n"}))
    assert host.keepup2date() == UPDATED
    assert "1 clamd signature file(s) skipped" in host.report_text()

# endregion
# region the index format


def index_bytes(files: object, **fields: object) -> bytes:
    document = {"format": "smtpgw-update-set", "format_version": 1, "version": "1.0", "files": files, **fields}
    return json.dumps(document).encode()


GOOD: dict[str, Any] = {"name": "bases/spam/spam.db", "size": 3, "sha256": "0" * 64}


HOSTILE = {
    "empty": b"", "a list": b"[]", "not UTF-8": b"\xff\xfe", "deep nesting": b"[" * 100000,
    "boolean format_version": index_bytes([GOOD], format_version=True),
    "version with letters": index_bytes([GOOD], version="2024.01.x"),
    "path traversal": index_bytes([dict(GOOD, name="bases/../../etc/passwd")]),
    "absolute path": index_bytes([dict(GOOD, name="/etc/passwd")]),
    "hidden file": index_bytes([dict(GOOD, name="bases/.hidden")]),
    "the installed index": index_bytes([dict(GOOD, name="bases/index.json")]),
    "clamd non-signature": index_bytes([dict(GOOD, name="clamd/evil.so")]),
    "clamd sub-folder": index_bytes([dict(GOOD, name="clamd/sub/x.ndb")]),
    "unknown area": index_bytes([dict(GOOD, name="other/x")]),
    "negative size": index_bytes([dict(GOOD, size=-1)]),
    "boolean size": index_bytes([dict(GOOD, size=True)]),
    "huge size": index_bytes([dict(GOOD, size=1 << 40)]),
    "bad sha256": index_bytes([dict(GOOD, sha256="ABC")]),
    "duplicate": index_bytes([GOOD, GOOD]),
    "rejected not a list": index_bytes([GOOD], rejected="1.0"),
    "files not a list": index_bytes("files"),
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_indexes_are_refused_cleanly(data: bytes) -> None:
    with pytest.raises(updater.UpdateError):
        updater.Index.parse(data, "index.json")


def test_index_round_trip_and_version_order() -> None:
    index = updater.Index("2005.03.11-1", "2005-03-11", (updater.Entry(**GOOD),), ("2005.03.12-1",))
    assert updater.Index.parse(index.to_bytes(), "index.json") == index
    assert updater.version_key("2005.03.11-1") < updater.version_key("2005.03.11-2") < updater.version_key("2005.4")

# endregion
# region signatures


def assert_refused(host: Host, before: dict[str, bytes], reason: str) -> None:
    """keepup2date refuses the set: code 10, the bases as they were, no reload asked, ``reason`` reported."""
    assert host.keepup2date() == CRITICAL
    assert host.snapshot() == before
    assert not host.take_reload_request()
    assert reason in host.report_text()
    assert "keepup2date finished: 10" in host.report_text()


def flip_signature_bit(update_set: str, bit: int) -> None:
    path = os.path.join(update_set, "index.json.sig")
    key, signature = read(path).decode().split()
    raw = bytearray(base64.b64decode(signature))
    raw[bit // 8] ^= 1 << (bit % 8)
    write(path, f"{key} {base64.b64encode(bytes(raw)).decode()}\n".encode())


def test_a_set_signed_by_an_unknown_key_is_refused(tmp_path, server) -> None:
    host = installed_host(tmp_path, "30.0")
    before = host.snapshot()
    host.use(publish(server, make_set(str(tmp_path), "30.1", signers=(key_pair(str(tmp_path), "stranger"),)), "u"))
    assert_refused(host, before, "signed only by keys not trusted here")
    assert not any("spam.db" in line for line in server.requests)  # nothing downloaded past the index


@pytest.mark.parametrize("bit", [0, 300, 511])
def test_a_flipped_signature_bit_is_refused(tmp_path, server, bit) -> None:
    host = installed_host(tmp_path, "31.0")
    before = host.snapshot()
    url = publish(server, make_set(str(tmp_path), "31.1"), "u")
    flip_signature_bit(os.path.join(server.root, "u"), bit)
    host.use(url)
    assert_refused(host, before, "does not verify: the index was changed after signing")


def test_an_index_changed_after_signing_is_refused(tmp_path, server) -> None:
    """Whoever can change what the server holds can point the index at their own spam.db: the
    signature no longer verifies."""
    host = installed_host(tmp_path, "32.0")
    before = host.snapshot()
    url = publish(server, make_set(str(tmp_path), "32.1"), "u")
    theirs = make_set(str(tmp_path), "32.2", signers=())
    write(os.path.join(server.root, "u", "index.json"), read(os.path.join(theirs, "index.json")))
    spam = os.path.join("bases", "spam", "spam.db")
    write(os.path.join(server.root, "u", spam), read(os.path.join(theirs, spam)))
    host.use(url)
    assert_refused(host, before, "does not verify")


def test_a_file_changed_after_signing_is_refused(tmp_path, server) -> None:
    host = installed_host(tmp_path, "33.0")
    before = host.snapshot()
    url = publish(server, make_set(str(tmp_path), "33.1"), "u")
    served = os.path.join(server.root, "u", "bases", "spam", "spam.db")
    data = bytearray(read(served))
    data[-70] ^= 0x01  # same size, one bit of the checksum line: only the SHA-256 tells
    write(served, bytes(data))
    host.use(url)
    assert_refused(host, before, "SHA-256 differs from the index")


def test_a_truncated_download_is_refused(tmp_path, server) -> None:
    host = installed_host(tmp_path, "34.0")
    before = host.snapshot()
    host.use(publish(server, make_set(str(tmp_path), "34.1"), "u"))
    server.cut = "spam.db"
    assert_refused(host, before, "bytes, the index gives")
    assert not os.path.exists(host.path("bases.backup"))


def test_a_replayed_older_signed_index_is_refused(tmp_path, server) -> None:
    """A validly signed index of an earlier version, served again (alone or with the new files),
    must not take a host back."""
    folder = str(tmp_path)
    host = Host(str(tmp_path / "host"))
    old = publish(server, make_set(folder, "35.0"), "old")
    new = publish(server, make_set(folder, "35.1"), "new")
    for url in (old, new):
        host.use(url)
        assert host.keepup2date() == UPDATED
    host.take_reload_request()
    before = host.snapshot()
    host.use(old)
    assert_refused(host, before, "version 35.0 is older than the installed 35.1")
    replay = os.path.join(server.root, "new")
    for name in ("index.json", "index.json.sig"):
        shutil.copy(os.path.join(server.root, "old", name), os.path.join(replay, name))
    host.use(new)
    assert_refused(host, before, "version 35.0 is older than the installed 35.1")


def test_key_rotation_with_two_keys(tmp_path, server) -> None:
    folder = str(tmp_path)
    old_key, new_key = key_pair(folder, "old"), key_pair(folder, "new")
    host = Host(str(tmp_path / "host"), keys=[old_key + ".pub", new_key + ".pub"])
    host.use(publish(server, make_set(folder, "36.0", signers=(old_key,)), "a"))
    assert host.keepup2date() == UPDATED
    host.use(publish(server, make_set(folder, "36.1", signers=(old_key, new_key)), "b"))  # the change-over
    assert host.keepup2date() == UPDATED
    assert "signed by ed25519:" in host.report_text()
    host.use(publish(server, make_set(folder, "36.2", signers=(new_key,)), "c"), keys=[new_key + ".pub"])
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "36.2"
    host.take_reload_request()
    before = host.snapshot()
    host.use(publish(server, make_set(folder, "36.3", signers=(old_key,)), "d"))  # the retired key
    assert_refused(host, before, "signed only by keys not trusted here")


def test_unsigned_sets_are_refused_unless_allowed_for_a_local_folder(tmp_path, server) -> None:
    folder = str(tmp_path)
    host = installed_host(tmp_path, "37.0")
    before = host.snapshot()
    unsigned = make_set(folder, "37.1", signers=())
    url = publish(server, unsigned, "u")
    host.use(url)
    assert_refused(host, before, "is not signed (")
    host.extra = {"updater.options": [("AllowUnsigned", "yes")]}
    host.write_config()
    assert_refused(host, before, "AllowUnsigned=yes applies to local folders only")
    badly_signed = make_set(folder, "37.2")
    flip_signature_bit(badly_signed, 9)
    host.use(badly_signed)
    assert_refused(host, before, "does not verify")  # a signature present must verify, allowed or not
    host.use(unsigned)
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "37.1"
    text = host.report_text()
    assert f"UNSIGNED update set accepted from the local folder {unsigned}" in text
    assert "bases updated to version 37.1 (1 file(s) installed, UNSIGNED (AllowUnsigned))" in text


def test_the_shipped_key_is_trusted_when_none_is_configured(tmp_path) -> None:
    host = installed_host(tmp_path, "38.0")
    before = host.snapshot()
    with open(host.config, encoding="utf-8") as handle:
        text = handle.read()
    with open(host.config, "w", encoding="utf-8") as handle:
        handle.write(re.sub(r"PublicKey=.*\n", "", text))
    args = updater.build_parser().parse_args([])
    settings = updater.Settings.from_config(updater.load_config(host.config), args)
    assert settings.keys == signing.shipped_keys()
    assert settings.keys[0].text == read(os.path.join(REPO, "smtpgw", "keys", "smtpgw-release.pub")).decode().split()[0]
    host.use(make_set(str(tmp_path), "38.1"))  # signed by the test's key, not the project's
    text = read(host.config).decode()
    with open(host.config, "w", encoding="utf-8") as handle:
        handle.write(re.sub(r"PublicKey=.*\n", "", text))
    assert_refused(host, before, "signed only by keys not trusted here")


def test_public_keys_are_checked_when_the_configuration_loads(tmp_path, capsys) -> None:
    folder = str(tmp_path)
    inline = read(key_pair(folder) + ".pub").decode().strip()
    host = Host(str(tmp_path / "host"), source=make_set(folder, "39.0"), keys=[inline])
    assert host.keepup2date() == UPDATED
    off_curve = "ed25519:" + base64.b64encode((2).to_bytes(32, "little")).decode()
    for bad, problem in (("ed25519:not-a-key", "not base64 of the right length"),
                         ("keys/missing.pub", "No such file or directory"),
                         (off_curve, "not a point of Ed25519")):
        host.use(host.source, keys=[bad])
        assert host.keepup2date() == CONFIG_INVALID
        assert re.search(r"smtpgw\.conf:\d+: PublicKey: .*" + re.escape(problem), capsys.readouterr().err)


def test_mirror_mode_keeps_the_signature_for_downstream_gateways(tmp_path, server) -> None:
    folder = str(tmp_path)
    served = make_set(folder, "41.0")
    host = Host(str(tmp_path / "mirror-host"), source=publish(server, served, "u"))
    mirror = str(tmp_path / "mirror")
    assert host.keepup2date("-u", mirror) == UPDATED
    for name in ("index.json", "index.json.sig"):  # byte for byte as published
        assert read(os.path.join(mirror, name)) == read(os.path.join(served, name))
    os.unlink(os.path.join(mirror, "index.json.sig"))
    assert host.keepup2date("-u", mirror) == UPDATED  # a mirror missing its signature is repaired
    assert read(os.path.join(mirror, "index.json.sig")) == read(os.path.join(served, "index.json.sig"))
    assert host.keepup2date("-u", mirror) == NO_UPDATE
    other = Host(str(tmp_path / "other"), source=mirror)
    assert other.keepup2date() == UPDATED  # verified downstream against the same trusted key
    flip_signature_bit(mirror, 3)
    assert other.keepup2date("--force") == CRITICAL  # downstream checks the mirror's copy itself
    assert "does not verify" in other.report_text()


def test_a_mirror_host_refuses_to_copy_a_set_it_does_not_trust(tmp_path, server) -> None:
    folder = str(tmp_path)
    host = Host(str(tmp_path / "mirror-host"),
                source=publish(server, make_set(folder, "42.0", signers=(key_pair(folder, "stranger"),)), "u"))
    mirror = str(tmp_path / "mirror")
    assert host.keepup2date("-u", mirror) == CRITICAL
    assert not os.path.exists(os.path.join(mirror, "index.json"))


def test_force_downloads_and_verifies_the_same_version_again(tmp_path, server) -> None:
    folder = str(tmp_path)
    host = Host(str(tmp_path / "host"), source=publish(server, make_set(folder, "43.0"), "u"))
    assert host.keepup2date() == UPDATED
    installed = os.path.join(host.bases, "spam", "spam.db")
    good = read(installed)
    write(installed, good[:-10])  # damaged in place: same version, file present
    assert host.keepup2date() == NO_UPDATE
    server.requests.clear()
    assert host.keepup2date("--force") == UPDATED
    assert read(installed) == good
    assert [line.split()[1] for line in server.requests] == ["/u/index.json", "/u/index.json.sig",
                                                             "/u/bases/spam/spam.db"]
    host.use(publish(server, make_set(folder, "42.9"), "older"))
    assert host.keepup2date("--force") == CRITICAL  # --force never goes down
    assert host.installed_version() == "43.0"


def test_rollback_from_a_signed_older_set(tmp_path, server) -> None:
    folder = str(tmp_path)
    old = publish(server, make_set(folder, "44.0"), "old")
    host = Host(str(tmp_path / "host"), source=publish(server, make_set(folder, "44.1"), "new"))
    assert host.keepup2date() == UPDATED
    assert host.keepup2date("--rollback", "-s", old) == UPDATED
    index = updater.read_index(os.path.join(host.bases, "index.json"))
    assert index is not None and (index.version, index.rejected) == ("44.0", ("44.1",))
    assert host.keepup2date() == NO_UPDATE  # 44.1 is held back
    unsigned = publish(server, make_set(folder, "43.0", signers=()), "unsigned")
    assert host.keepup2date("--rollback", "-s", unsigned) == CRITICAL  # a downgrade is verified too
    assert host.installed_version() == "44.0"


def test_every_file_is_read_once_and_the_verified_copy_is_installed(tmp_path, server) -> None:
    """Time of check = time of use: the index, its signature and each file are fetched once, and
    what is installed is the copy that was checked (the server changing afterwards changes nothing)."""
    folder = str(tmp_path)
    served = make_set(folder, "45.0", extra={"spam/notes.txt": b"notes"})
    host = Host(str(tmp_path / "host"), source=publish(server, served, "u"))
    server.hold = "spam.db"  # hold the last file; meanwhile the one already fetched is replaced
    run = threading.Thread(target=lambda: results.append(host.keepup2date()))
    results: list[int] = []
    run.start()
    try:
        assert server.holding.wait(30), "keepup2date never asked for spam.db"
        write(os.path.join(server.root, "u", "bases", "spam", "notes.txt"), b"tampered")
    finally:
        server.release.set()
        run.join(60)
    assert results == [UPDATED]
    assert read(os.path.join(host.bases, "spam", "notes.txt")) == b"notes"
    paths = [line.split()[1] for line in server.requests]
    assert sorted(paths) == sorted(set(paths)) and len(paths) == 4

# endregion
# region keys and signed sets from the command line


def smtpgw(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "smtpgw.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_keygen_and_make_bundle_through_the_command_line(tmp_path) -> None:
    folder = str(tmp_path)
    done = smtpgw("keepup2date", "keygen", "--out", "site-keys/site", cwd=folder)
    assert done.returncode == 0, done.stderr
    prefix = os.path.join(folder, "site-keys", "site")
    assert os.stat(prefix).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(prefix)).st_mode & 0o777 == 0o700
    public = read(prefix + ".pub").decode()
    assert public.startswith("ed25519:") and public.endswith(" site\n") and public.split()[0] in done.stdout
    secret = read(prefix)
    again = smtpgw("keepup2date", "keygen", "--out", "site-keys/site", cwd=folder)
    assert again.returncode == CRITICAL and "never overwritten" in again.stderr
    assert read(prefix) == secret

    bases = os.path.join(folder, "trained")
    spam_db(os.path.join(bases, "spam", "spam.db"), "46.0")
    done = smtpgw("keepup2date", "make-bundle", "--key", prefix, "--db", bases, "--out", "bundle", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "version 46.0, 1 file(s)" in done.stdout and "signed by 1 key(s)" in done.stdout
    host = Host(str(tmp_path / "host"), source=os.path.join(folder, "bundle"), keys=[prefix + ".pub"])
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "46.0"

    os.chmod(prefix, 0o640)
    done = smtpgw("keepup2date", "make-bundle", "--key", prefix, "--db", bases, "--out", "bundle2", cwd=folder)
    assert done.returncode == CRITICAL and "readable by its owner only" in done.stderr
    assert not os.path.exists(os.path.join(folder, "bundle2"))
    assert smtpgw("keepup2date", "make-bundle", "--db", bases, "--out", "x", cwd=folder).returncode == CONFIG_INVALID


def test_make_update_set_signs_with_the_release_key_it_is_given(tmp_path) -> None:
    folder = str(tmp_path)
    release, site = key_pair(folder), key_pair(folder, "site")
    out = os.path.join(folder, "published")
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_update_set.py"),
                           os.path.join(REPO, "smtpgw", "bases"), out, "--key", release, "--key", site,
                           "--version", "47.0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(read(os.path.join(out, "index.json.sig")).splitlines()) == 2
    host = Host(str(tmp_path / "host"), source=out, keys=[site + ".pub"])
    assert host.keepup2date() == UPDATED
    assert host.installed_version() == "47.0"

# endregion
