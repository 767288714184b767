"""The release: tools/make_tarball.py, install.sh (POSIX sh, run with /bin/sh) into a
staging root (--root), postinstall.py, and the dist/ files driving a real gateway.

The tarball is built from a copy of this checkout, unpacked, and installed from there,
as an administrator would. Staged installs never touch this host's /etc, /opt or /var.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator

import pytest

import postinstall
from smtpgw import __version__
from smtpgw.config import load_config
from smtpgw.spam.bayes import Bayes
from smtpgw.spam.database import DatabaseInfo, SpamDatabase
from smtpgw.update import updater
from tests.support.components import require
from tests.support.net import REPO, free_port, wait_until

TOP = f"smtpgw-{__version__}"
SHELL = "/bin/sh"
DOCS = ("LICENSE", "README.md", "ARCHITECTURE.md")
PLANTED_JUNK = ("smtpgw/__pycache__/junk.cpython-311.pyc", "smtpgw/bases/spam/.spam.db.lock",
                "smtpgw/templates/notify.tmpl~", "smtpgw/.coverage", "dist/.smtpgw.init.swp")


# region the release


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the checkout's release files, with junk a working tree collects planted in it."""
    folder = str(tmp_path_factory.mktemp("source"))
    for item in ("smtpgw", "dist"):
        shutil.copytree(os.path.join(REPO, item), os.path.join(folder, item),
                        ignore=shutil.ignore_patterns("__pycache__", ".*"))
    for name in ("smtpgw.py", "smtpgw.conf.sample", "install.sh", "postinstall.py", *DOCS):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy2(os.path.join(REPO, name), folder)
        else:  # documents still being written in this checkout
            with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
                handle.write(f"{name} of the test release\n")
    for junk in PLANTED_JUNK:
        os.makedirs(os.path.dirname(os.path.join(folder, junk)), exist_ok=True)
        with open(os.path.join(folder, junk), "wb") as handle:
            handle.write(b"junk")
    return folder


def make_tarball(source: str, output: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_tarball.py"), "--source", source,
                           "--output", output], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def tarball(source: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    done = make_tarball(source, str(tmp_path_factory.mktemp("out")))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def release(tarball: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The unpacked release folder."""
    folder = str(tmp_path_factory.mktemp("unpacked"))
    with tarfile.open(tarball) as archive:
        archive.extractall(folder, filter="data")
    return os.path.join(folder, TOP)


def install(release: str, root: str, *options: str) -> subprocess.CompletedProcess[str]:
    command = [SHELL, os.path.join(release, "install.sh"), "--root", root, "--init", "sysv", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def installed(root: str, *options: str, release: str) -> str:
    done = install(release, root, *options)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def test_tarball_holds_the_release_and_nothing_else(tarball: str) -> None:
    assert os.path.basename(tarball) == f"{TOP}.tar.gz"
    with tarfile.open(tarball) as archive:
        infos = {info.name: info for info in archive.getmembers()}
    names = set(infos)
    tops = {name.split("/")[1] for name in names if name.count("/") >= 1}
    assert tops == {"smtpgw.py", "smtpgw", "smtpgw.conf.sample", "install.sh", "postinstall.py", "dist", *DOCS}
    for junk in PLANTED_JUNK:
        assert f"{TOP}/{junk}" not in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/." in n]
    for required in ("smtpgw/bases/spam/spam.db", "smtpgw/templates/notify.tmpl", "smtpgw/update/updater.py",
                     "dist/smtpgw.service.in", "dist/smtpgw.init", "dist/logrotate.smtpgw", "dist/cron.smtpgw"):
        assert f"{TOP}/{required}" in names
    assert infos[f"{TOP}/install.sh"].mode == 0o755 and infos[f"{TOP}/smtpgw/config.py"].mode == 0o644
    assert {(info.uid, info.gid) for info in infos.values()} == {(0, 0)}


def test_tarball_is_reproducible(source: str, tarball: str, tmp_path) -> None:
    again = make_tarball(source, str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert read(again.stdout.strip()) == read(tarball)


def test_tarball_needs_every_release_file(source: str, tmp_path) -> None:
    incomplete = str(tmp_path / "incomplete")
    shutil.copytree(source, incomplete)
    os.unlink(os.path.join(incomplete, "LICENSE"))
    done = make_tarball(incomplete, str(tmp_path / "out"))
    assert done.returncode == 1
    assert "missing LICENSE" in done.stderr
    assert not os.path.exists(tmp_path / "out" / f"{TOP}.tar.gz")

# endregion
# region install.sh --root


def test_staged_install_is_complete_and_its_configuration_checks(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    output = installed(root, release=release)
    assert "Next steps" in output and "ProtectedDomains" in output
    prefix = os.path.join(root, "opt", "smtpgw")
    for name in ("smtpgw.py", "postinstall.py", "install.sh", "smtpgw.conf.sample", "smtpgw/config.py",
                 "smtpgw/update/updater.py", "dist/smtpgw.init", *DOCS):
        assert os.path.isfile(os.path.join(prefix, name)), name
    config = os.path.join(root, "etc", "smtpgw", "smtpgw.conf")
    assert os.stat(config).st_mode & 0o777 == 0o640
    assert os.path.isfile(config + ".sample")
    # the staged code checks the staged configuration
    check = subprocess.run([sys.executable, os.path.join(prefix, "smtpgw.py"), "-c", config, "-k"],
                           capture_output=True, text=True, cwd=str(tmp_path), timeout=60, check=False)
    assert (check.returncode, check.stdout.strip()) == (0, "Config OK !"), check.stderr
    cfg = load_config(config)
    assert cfg.path.QueuePath == "/var/spool/smtpgw/queue" and cfg.path.ControlPath == "/var/spool/smtpgw/control"
    assert cfg.base.BasesPath == "/var/lib/smtpgw/bases" and cfg.base.TemplatesPath == "/etc/smtpgw/templates"
    assert cfg.options.LogFile == "/var/log/smtpgw/smtpgw.log" and cfg.options.PidFile == "/run/smtpgw/smtpgw.pid"
    assert cfg.policy.QuarantinePath == "/var/lib/smtpgw/quarantine"
    assert cfg.updater_path.BackUpPath == "/var/lib/smtpgw/bases.backup"
    assert cfg.updater_report.ReportFileName == "/var/log/smtpgw/keepup2date.log"
    assert cfg.options.User is None  # no account smtpgw on this host: left commented out
    for folder in ("var/lib/smtpgw/bases.backup", "var/lib/smtpgw/quarantine", "var/lib/smtpgw/backup",
                   "var/lib/smtpgw/arch_in", "var/lib/smtpgw/arch_out", "var/spool/smtpgw/queue",
                   "var/spool/smtpgw/control", "var/log/smtpgw", "etc/smtpgw/templates"):
        assert os.path.isdir(os.path.join(root, folder)), folder
    assert os.listdir(os.path.join(root, "etc", "smtpgw", "templates")) == os.listdir(
        os.path.join(release, "smtpgw", "templates"))
    # the shipped spam database, installed through keepup2date
    shipped = os.path.join(release, "smtpgw", "bases")
    index = updater.read_index(os.path.join(root, "var", "lib", "smtpgw", "bases", "index.json"))
    assert index is not None and index.version == updater.database_version(shipped)[0]
    assert read(os.path.join(root, "var/lib/smtpgw/bases/spam/spam.db")) == read(os.path.join(shipped, "spam", "spam.db"))
    for path, mode in (("etc/init.d/smtpgw", 0o755), ("etc/logrotate.d/smtpgw", 0o644), ("etc/cron.d/smtpgw", 0o644)):
        text = read(os.path.join(root, path)).decode()
        assert os.stat(os.path.join(root, path)).st_mode & 0o777 == mode
        assert "/etc/smtpgw/smtpgw.conf" in text or "/var/log/smtpgw" in text
        assert not re.search(r"@[A-Z_]+@", text), path
    manifest = read(os.path.join(prefix, "installed-files")).decode()
    assert "service sysv\n" in manifest and "file /etc/init.d/smtpgw\n" in manifest
    assert not os.path.exists(os.path.join(root, "etc", "systemd"))


def test_second_run_upgrades_the_code_and_keeps_configuration_and_data(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    installed(root, release=release)
    config = os.path.join(root, "etc", "smtpgw", "smtpgw.conf")
    with open(config, "a", encoding="utf-8") as handle:
        handle.write("# the administrator's edit\n")
    edited = read(config)
    template = os.path.join(root, "etc", "smtpgw", "templates", "notify.tmpl")
    with open(template, "w", encoding="utf-8") as handle:
        handle.write("our own notification\n")
    kept = os.path.join(root, "var", "lib", "smtpgw", "quarantine", "message")
    with open(kept, "w", encoding="utf-8") as handle:
        handle.write("quarantined")
    stale = os.path.join(root, "opt", "smtpgw", "smtpgw", "stale_module.py")
    with open(stale, "w", encoding="utf-8") as handle:
        handle.write("# from the previous version\n")
    output = installed(root, release=release)
    assert read(config) == edited
    assert read(template) == b"our own notification\n"
    assert read(kept) == b"quarantined"
    assert not os.path.exists(stale)  # the package folder is replaced as a whole
    assert "configuration /etc/smtpgw/smtpgw.conf kept" in output and "no update needed" in output
    assert not [n for n in os.listdir(os.path.join(root, "opt", "smtpgw")) if n.startswith(".install")]


def test_a_newer_shipped_database_is_installed_and_an_older_one_refused(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    installed(root, release=release)
    shipped_version = updater.database_version(os.path.join(release, "smtpgw", "bases"))[0]
    newer = str(tmp_path / "newer")
    shutil.copytree(release, newer)
    database = SpamDatabase(DatabaseInfo(version="9999.1", date="2099-01-01"), Bayes({"word": (1, 1)}, 1, 1))
    database.save(os.path.join(newer, "smtpgw", "bases", "spam", "spam.db"))
    bases = os.path.join(root, "var", "lib", "smtpgw", "bases")
    assert "bases updated to version 9999.1" in installed(root, release=newer)
    assert updater.database_version(bases)[0] == "9999.1"
    backup = updater.read_index(os.path.join(root, "var", "lib", "smtpgw", "bases.backup", "index.json"))
    assert backup is not None and backup.version == shipped_version
    output = installed(root, release=release)  # a reinstall of the older release
    assert f"{shipped_version} is older than the installed 9999.1: refused" in output
    assert updater.database_version(bases)[0] == "9999.1"


def test_systemd_unit_and_an_existing_account(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    installed(root, "--init", "systemd", "--user", "nobody", "--group", "nogroup", release=release)
    cfg = load_config(os.path.join(root, "etc", "smtpgw", "smtpgw.conf"))
    assert (cfg.options.User, cfg.options.Group) == ("nobody", "nogroup")
    assert "su nobody nogroup" in read(os.path.join(root, "etc", "logrotate.d", "smtpgw")).decode()
    unit = read(os.path.join(root, "etc", "systemd", "system", "smtpgw.service")).decode()
    assert "\nUser=nobody\nGroup=nogroup\n" in unit
    assert "ExecStart=" + sys.executable in unit and "-c /etc/smtpgw/smtpgw.conf -o -p /run/smtpgw/smtpgw.pid" in unit
    assert "ExecReload=" + sys.executable + " /opt/smtpgw/smtpgw.py -c /etc/smtpgw/smtpgw.conf -k\n" in unit
    helper = os.path.join(root, "usr", "sbin", "smtpgwctl")
    assert os.stat(helper).st_mode & 0o777 == 0o755
    assert "file /usr/sbin/smtpgwctl\n" in read(os.path.join(root, "opt", "smtpgw", "installed-files")).decode()
    assert not os.path.exists(os.path.join(root, "etc", "init.d", "smtpgw"))
    installed(root, "--no-service", release=release)
    assert "service " not in read(os.path.join(root, "opt", "smtpgw", "installed-files")).decode()
    assert not os.path.exists(helper)


def test_a_rerun_with_another_service_removes_the_old_one(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    unit = os.path.join(root, "etc", "systemd", "system", "smtpgw.service")
    script = os.path.join(root, "etc", "init.d", "smtpgw")
    installed(root, "--init", "systemd", release=release)
    assert os.path.exists(unit)
    assert "removed /etc/systemd/system/smtpgw.service" in installed(root, release=release)  # now sysv
    assert not os.path.exists(unit) and os.path.exists(script)
    installed(root, "--no-service", release=release)
    assert not os.path.exists(script)
    installed(root, "--uninstall", release=release)
    etc = os.path.join(root, "etc")
    left = [os.path.relpath(os.path.join(folder, name), etc) for folder, _, names in os.walk(etc) for name in names]
    assert [path for path in left if not path.startswith("smtpgw/")] == []


def test_uninstall_keeps_configuration_and_data_unless_purged(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    installed(root, release=release)
    output = installed(root, "--uninstall", release=release)
    assert "removed /etc/init.d/smtpgw" in output
    for gone in ("opt/smtpgw", "etc/init.d/smtpgw", "etc/logrotate.d/smtpgw", "etc/cron.d/smtpgw"):
        assert not os.path.exists(os.path.join(root, gone)), gone
    for kept in ("etc/smtpgw/smtpgw.conf", "var/lib/smtpgw/bases/spam/spam.db", "var/spool/smtpgw/queue"):
        assert os.path.exists(os.path.join(root, kept)), kept
    again = install(release, root, "--uninstall")
    assert again.returncode == 1 and "no smtpgw installed" in again.stderr
    installed(root, release=release)
    installed(root, "--uninstall", "--purge", release=release)
    assert sorted(os.listdir(os.path.join(root, "var", "lib"))) == []
    assert not os.path.exists(os.path.join(root, "etc", "smtpgw"))


@pytest.mark.parametrize("options, message", [
    (["--prefix", "opt/smtpgw"], "absolute path"),
    (["--confdir", "/etc/smtp gw"], "letters, digits"),
    (["--datadir", "/var/lib/../../etc"], "absolute path"),
    (["--datadir", "/../etc"], "absolute path"),
    (["--user"], "--user needs a value"),
    (["--init", "upstart"], "systemd, sysv or auto"),
    (["--purge"], "--purge goes with --uninstall"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--python", "/nonexistent/python3"], "not found"),
])
def test_bad_options_are_refused_with_a_reason(release: str, tmp_path, options: list[str], message: str) -> None:
    root = str(tmp_path / "root")
    done = install(release, root, *options)
    assert done.returncode == 1
    assert message in done.stderr
    assert not os.path.exists(os.path.join(root, "opt"))


def test_postinstall_usage_errors_are_failures_not_configuration_problems(tmp_path) -> None:
    # install.sh reads exit 2 as "installed, but the configuration fails the check"
    done = subprocess.run([sys.executable, os.path.join(REPO, "postinstall.py"), "--root", str(tmp_path),
                           "--datadir", "var/lib/smtpgw"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == postinstall.FAILED
    assert "--datadir 'var/lib/smtpgw'" in done.stderr


def test_install_refuses_a_folder_that_is_not_a_release(release: str, tmp_path) -> None:
    partial = str(tmp_path / "partial")
    shutil.copytree(release, partial)
    shutil.rmtree(os.path.join(partial, "dist"))
    done = install(partial, str(tmp_path / "root"))
    assert done.returncode == 1 and "dist/smtpgw.service.in is missing" in done.stderr

# endregion
# region the dist/ files at work


def local_install(tmp_path, rundir: str | None = None) -> postinstall.Install:
    """Paths for running this checkout's code as an installed gateway, all under tmp_path."""
    base = str(tmp_path)
    return postinstall.Install(prefix=REPO, confdir=f"{base}/etc", datadir=f"{base}/data", spooldir=f"{base}/spool",
                               logdir=f"{base}/log", rundir=rundir or f"{base}/run", user="root", group="root",
                               python=sys.executable)


def render_to(install: postinstall.Install, template: str, target: str, mode: int = 0o644) -> str:
    text = postinstall.render(read(os.path.join(REPO, "dist", template)).decode(), install.template_values())
    postinstall.write_text(target, text, mode)
    return target


def test_systemd_unit_passes_systemd_analyze(tmp_path) -> None:
    analyze = require("systemd-analyze", "systemd")
    unit = render_to(local_install(tmp_path, rundir="/run/smtpgw"), "smtpgw.service.in", str(tmp_path / "smtpgw.service"))
    done = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, timeout=120, check=False)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if re.search(r"unknown|ignoring|invalid|failed|not executable|bad", line, re.IGNORECASE)]
    assert done.returncode == 0 and complaints == [], done.stdout + done.stderr


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        return connection.recv(512)


def test_init_script_and_logrotate_drive_a_real_gateway(tmp_path) -> None:
    logrotate = require("logrotate")
    install = local_install(tmp_path)
    for folder in (install.logdir, f"{install.spooldir}/control", install.confdir):
        os.makedirs(folder)
    port = free_port()
    lines = postinstall.config_text(read(os.path.join(REPO, "smtpgw.conf.sample")).decode(), install,
                                    account=False).splitlines()
    for section, key, value in (("smtpgw.network", "ListenOn", f"127.0.0.1:{port}"),
                                ("path", "BasesPath", f"{REPO}/smtpgw/bases"),
                                ("path", "TemplatesPath", f"{REPO}/smtpgw/templates")):
        postinstall.set_value(lines, section, key, value, True)
    postinstall.write_text(install.config, "\n".join(lines) + "\n", 0o640)
    script = render_to(install, "smtpgw.init", str(tmp_path / "smtpgw.init"), 0o755)
    rotate = render_to(install, "logrotate.smtpgw", str(tmp_path / "logrotate.conf"))

    def service(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SHELL, script, action], capture_output=True, text=True, timeout=150, check=False)

    assert service("status").returncode == 3
    started = service("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr + read(f"{install.logdir}/console.log").decode()
        pid = int(read(install.pidfile))
        assert service("status").stdout.strip() == f"smtpgw is running (pid {pid})"
        assert greeting(port).startswith(b"220 ")
        assert "already running" in service("start").stdout
        # the reference's service commands, from the init script and from the systemd helper
        helper = render_to(install, "smtpgwctl.in", str(tmp_path / "smtpgwctl"), 0o755)
        assert service("recv-off").returncode == 0
        assert greeting(port).startswith(b"421 ")
        assert subprocess.run([SHELL, helper, "recv-on"], capture_output=True, timeout=60).returncode == 0
        assert greeting(port).startswith(b"220 ")
        assert "mta_incoming_connections_total=3\n" in service("stats").stdout  # three greetings
        assert service("bogus").returncode == 2
        log = f"{install.logdir}/smtpgw.log"
        rotated = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "logrotate.state"), rotate],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert rotated.returncode == 0, rotated.stderr
        assert os.path.exists(log + ".1")
        # postrotate sent HUP: the gateway reloads and writes to the new file
        wait_until(lambda: os.path.exists(log) and b"configuration reloaded" in read(log), 20, "the new log file")
        assert service("reload").returncode == 0
        stopped = service("stop")
        assert stopped.returncode == 0 and "smtpgw stopped" in stopped.stdout
        assert not os.path.exists(install.pidfile)
        assert service("status").returncode == 3
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        if os.path.exists(install.pidfile):
            os.kill(int(read(install.pidfile)), signal.SIGKILL)


def test_init_script_refuses_a_bad_configuration(tmp_path) -> None:
    install = local_install(tmp_path)
    os.makedirs(install.logdir)
    postinstall.write_text(install.config, "[smtpgw.network]\nNoSuchKey=1\n", 0o640)
    script = render_to(install, "smtpgw.init", str(tmp_path / "smtpgw.init"), 0o755)
    done = subprocess.run([SHELL, script, "start"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 6 and "has problems" in done.stderr and "NoSuchKey" in done.stderr


@pytest.fixture
def cron_guard(tmp_path) -> Iterator[tuple[str, str]]:
    """The guard of the rendered cron line, and the configuration it reads."""
    install = local_install(tmp_path)
    line = [text for text in postinstall.render(read(os.path.join(REPO, "dist", "cron.smtpgw")).decode(),
                                                install.template_values()).splitlines()
            if text and not text.startswith("#")]
    assert len(line) == 1
    fields = line[0].split(None, 6)
    assert fields[1:6] == ["*", "*", "*", "*", "root"] and 0 <= int(fields[0]) < 60  # hourly, as root
    guard, _, command = fields[6].partition(" && ")
    assert command == f"{sys.executable} {REPO}/smtpgw.py -c {install.config} keepup2date"
    os.makedirs(install.confdir)
    yield guard, install.config


@pytest.mark.parametrize("text, runs", [
    ("[updater.options]\nUpdateServerUrl = http://updates.example.test/set\n", True),
    ("[updater.options]\n#UpdateServerUrl=/srv/smtpgw-updates\n", False),
    ("[updater.options]\nUpdateServerUrl=\n", False),
])
def test_cron_runs_keepup2date_only_once_a_source_is_set(cron_guard: tuple[str, str], text: str, runs: bool) -> None:
    guard, config = cron_guard
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(text)
    assert (subprocess.run([SHELL, "-c", guard], timeout=30, check=False).returncode == 0) == runs

# endregion


# region questions for a new configuration


def config_lines(root: str) -> list[str]:
    return read(os.path.join(root, "etc", "smtpgw", "smtpgw.conf")).decode().splitlines()


def test_unattended_install_takes_its_answers_as_flags(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    installed(root, "--hostname", "mx.corp.test", "--domains", "corp.test, *.corp.test", "--relay-from",
              "10.0.0.0/8", "--forward-to", "mail.corp.test:2526", "--non-interactive", release=release)
    cfg = load_config(os.path.join(root, "etc", "smtpgw", "smtpgw.conf"))
    assert (cfg.network.Hostname, cfg.network.ProtectedDomains) == ("mx.corp.test", ["corp.test", "*.corp.test"])
    assert cfg.network.Postmaster == "postmaster@example.test"  # not asked: the sample's value stays
    lines = config_lines(root)
    assert [line for line in lines if line.startswith(("RelayRule=", "ForwardRoute="))] == [
        "RelayRule=allow from 10.0.0.0/8 to *", "RelayRule=allow from any to *@corp.test",
        "RelayRule=allow from any to *@*.corp.test", "RelayRule=deny from any to *",
        "ForwardRoute=*@corp.test [mail.corp.test:2526]", "ForwardRoute=*@*.corp.test [mail.corp.test:2526]"]
    done = install(release, str(tmp_path / "other"), "--listen", "nowhere")
    assert done.returncode == 1 and "--listen 'nowhere': not of the expected form" in done.stderr


def on_terminal(command: list[str], answers: list[tuple[str, str]], timeout: float = 120) -> tuple[int, str]:
    """Run ``command`` on a pseudo-terminal, giving each answer once its prompt (a regex) shows."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the command on the terminal
        os.execv(command[0], command)
    output = b""
    deadline = time.monotonic() + timeout
    pending = list(answers)
    try:
        while time.monotonic() < deadline:
            if pending and re.search(pending[0][0].encode(), output):
                os.write(fd, pending.pop(0)[1].encode() + b"\n")
                output += b"\n--answered--\n"
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(fd)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:  # still waiting for an answer: the prompt never came
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_postinstall_asks_its_questions_on_a_terminal(release: str, tmp_path) -> None:
    root = str(tmp_path / "root")
    command = [SHELL, os.path.join(release, "install.sh"), "--root", root, "--init", "sysv", "--clamd", "127.0.0.1:3310"]
    code, output = on_terminal(command, [
        (r"Name of this gateway \(greeting, EHLO\) \[[^\]]*\]: $", "mx.corp.test"),
        (r"Domains whose mail it protects \(comma list\) \[corp\.test\]: $", ""),  # Enter: the proposal
        (r"Postmaster address \[postmaster@corp\.test\]: $", "not an address"),
        (r"not a valid answer: 'not an address'\r?\nPostmaster address \[postmaster@corp\.test\]: $", ""),
        (r"Administrator address for notifications \[postmaster@corp\.test\]: $", "security@corp.test"),
        (r"Address and port to listen on \[0\.0\.0\.0:25\]: $", "127.0.0.1:2525"),
        (r"may send to any domain \(comma list\) \[127\.0\.0\.0/8, ::1\]: $", "192.0.2.0/24, ::1"),
        (r"their MX hosts\) \[\]: $", "[192.0.2.25]"),
    ])
    assert code == 0, output
    assert "clamd address" not in output  # given as a flag, not asked
    cfg = load_config(os.path.join(root, "etc", "smtpgw", "smtpgw.conf"))
    assert (cfg.network.Hostname, cfg.network.ProtectedDomains, cfg.network.Postmaster) == \
        ("mx.corp.test", ["corp.test"], "postmaster@corp.test")
    assert cfg.policy.AdminNotifyAddress == "security@corp.test" and cfg.network.ListenOn == [("127.0.0.1", 2525)]
    assert cfg.ave.ClamdAddress == ["127.0.0.1:3310"]
    assert [line for line in config_lines(root) if line.startswith(("RelayRule=", "ForwardRoute="))] == [
        "RelayRule=allow from 192.0.2.0/24 to *", "RelayRule=allow from ::1 to *",
        "RelayRule=allow from any to *@corp.test", "RelayRule=deny from any to *",
        "ForwardRoute=*@corp.test [192.0.2.25]"]
    rerun, output = on_terminal(command, [])  # the configuration exists now: nothing is asked
    assert rerun == 0 and "Name of this gateway" not in output

# endregion
