#!/usr/bin/env python3
"""postinstall: finish an smtpgw installation made by install.sh.

Owns, for the paths install.sh passes: the installed configuration (written
from smtpgw.conf.sample with the install paths filled in when none exists,
then checked with ``smtpgw.py -k``); the templates copied beside it; the
service (systemd unit and its smtpgwctl helper, or SysV init script, from dist/), the logrotate and cron
files; the shipped spam database, installed through keepup2date (so an older
one never replaces a newer one); the manifest ``PREFIX/installed-files`` that
``install.sh --uninstall`` reads; and the closing next steps.

Must never: overwrite an existing configuration or template, start a gateway
that was not running, or write outside ``--root`` when one is given (paths
written into files are the final ones, without the root).

A new configuration gets the answers to QUESTIONS (name, domains, addresses,
listening address, relaying networks, mail server, clamd): given as flags
(``--hostname`` ...) for unattended installs, and asked on a terminal for the
others (``--non-interactive`` asks nothing); the sample's values stay for the
questions left unanswered.

Exit codes: 0 done; 1 failed; 2 installed, but the existing configuration
fails the check (fix it before starting).
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

OK, FAILED, CONFIG_PROBLEMS = 0, 1, 2
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")  # written unquoted into units, scripts and cron lines
SAFE_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
MANIFEST = "installed-files"
HELPER = "/usr/sbin/smtpgwctl"  # the reference's service commands beside the systemd unit


@dataclass(frozen=True)
class Install:
    """Final paths (as the installed system sees them) and the staging root."""

    prefix: str
    confdir: str
    datadir: str
    spooldir: str
    logdir: str
    rundir: str
    user: str
    group: str
    python: str
    root: str = ""
    service: bool = True
    init: str = "auto"
    answers: tuple[tuple[str, str], ...] = ()  # (question key, answer) given as flags
    interactive: bool = False  # ask the questions not answered by a flag (on a terminal)

    def staged(self, path: str) -> str:
        """Where ``path`` is written now: under the staging root, if any."""
        return self.root.rstrip("/") + path if self.root else path

    @property
    def config(self) -> str:
        return f"{self.confdir}/smtpgw.conf"

    @property
    def pidfile(self) -> str:
        return f"{self.rundir}/smtpgw.pid"

    @property
    def live(self) -> bool:
        """Installing into this very system (not staging): accounts, services, ownership."""
        return not self.root

    def account_exists(self) -> bool:
        try:
            pwd.getpwnam(self.user)
            grp.getgrnam(self.group)
        except KeyError:
            return False
        return True

    def template_values(self) -> dict[str, str]:
        minute = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:2], "big") % 60
        return {
            "PYTHON": self.python, "PREFIX": self.prefix, "CONFDIR": self.confdir, "DATADIR": self.datadir,
            "SPOOLDIR": self.spooldir, "LOGDIR": self.logdir, "RUNDIR": self.rundir,
            "RUNDIR_NAME": self.rundir.removeprefix("/run/"), "PIDFILE": self.pidfile,
            "USER": self.user, "GROUP": self.group, "MINUTE": str(minute),  # spread hosts over the hour
        }


class InstallError(Exception):
    """A step failed; the message says which and why."""


# region the configuration

def config_settings(install: Install, account: bool) -> list[tuple[str, str, str, bool]]:
    """(section, key, value, active) written into a new configuration; inactive ones
    replace the sample's commented examples, so that uncommenting them gives install paths."""
    i = install
    return [
        ("path", "BasesPath", f"{i.datadir}/bases", True),
        ("path", "TemplatesPath", f"{i.confdir}/templates", True),
        ("smtpgw.options", "StatFilename", f"{i.spooldir}/control/stats", False),
        ("smtpgw.options", "AVStatistics", f"{i.logdir}/avstats.log", False),
        ("smtpgw.options", "ICheckerDBFilename", f"{i.datadir}/ichecker.db", False),
        ("smtpgw.options", "User", i.user, account),
        ("smtpgw.options", "Group", i.group, account),
        ("smtpgw.options", "PidFile", i.pidfile, True),
        ("smtpgw.options", "LogFile", f"{i.logdir}/smtpgw.log", True),
        ("smtpgw.path", "IncomingArchivePath", f"{i.datadir}/arch_in", False),
        ("smtpgw.path", "OutgoingArchivePath", f"{i.datadir}/arch_out", False),
        ("smtpgw.path", "QueuePath", f"{i.spooldir}/queue", True),
        ("smtpgw.path", "ControlPath", f"{i.spooldir}/control", True),
        ("smtpgw.policy", "BackupPath", f"{i.datadir}/backup", True),
        ("smtpgw.policy", "QuarantinePath", f"{i.datadir}/quarantine", True),
        ("updater.path", "UploadPatchPath", f"{i.datadir}/updates", True),
        ("updater.path", "BackUpPath", f"{i.datadir}/bases.backup", True),
        ("updater.path", "PidFile", f"{i.datadir}/keepup2date.pid", True),
        ("updater.options", "PostUpdateCmd", f"touch {i.spooldir}/control/.c_db_reload", False),
        ("updater.report", "Append", "true", True),
        ("updater.report", "ReportFileName", f"{i.logdir}/keepup2date.log", True),
    ]


@dataclass(frozen=True)
class Question:
    """A question about a new configuration: asked on a terminal, or answered by ``--KEY``."""

    key: str
    prompt: str
    form: re.Pattern[str]
    default: Any  # answers so far -> the proposed answer


_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
_ADDRESS = r"[^@\s,\[\]]+@" + _HOST
_LIST = r"(?:{0})(?:\s*,\s*(?:{0}))*"
QUESTIONS = (
    Question("hostname", "Name of this gateway (greeting, EHLO)", re.compile(_HOST), lambda a: socket.getfqdn()),
    Question("domains", "Domains whose mail it protects (comma list)", re.compile(_LIST.format(r"[A-Za-z0-9*?.-]+")),
             lambda a: a["hostname"].partition(".")[2] or a["hostname"]),
    Question("postmaster", "Postmaster address", re.compile(_ADDRESS),
             lambda a: "postmaster@" + split_list(a["domains"])[0].lstrip("*?.")),
    Question("admin", "Administrator address for notifications", re.compile(_ADDRESS), lambda a: a["postmaster"]),
    Question("listen", "Address and port to listen on", re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[0-9.]+):\d{1,5}"),
             lambda a: "0.0.0.0:25"),
    Question("relay-from", "Networks whose clients may send to any domain (comma list)",
             re.compile(_LIST.format(r"[0-9A-Fa-f:.]+(?:/\d{1,3})?")), lambda a: "127.0.0.0/8, ::1"),
    Question("forward-to", "Mail server receiving the protected domains' mail (host or host:port; "
             "empty: their MX hosts)", re.compile(rf"(?:{_HOST}|\[[0-9A-Fa-f:.]+\])(?::\d{{1,5}})?|"), lambda a: ""),
    Question("clamd", "clamd address (unix:/path or host:port)", re.compile(rf"unix:/\S+|{_HOST}:\d{{1,5}}"),
             lambda a: "unix:/var/run/clamav/clamd.ctl"),
)


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def ask_questions(install: Install, ask: Any = input) -> dict[str, str]:
    """The answers: the flags' and, on a terminal, the others asked in turn (Enter takes the
    proposed one; an answer of the wrong form is asked again). EOF stops the installation."""
    given = dict(install.answers)
    answers: dict[str, str] = {}
    for question in QUESTIONS:
        if question.key in given:
            answers[question.key] = given[question.key]
            continue
        if not install.interactive:
            continue
        proposed = question.default(answers)  # on a terminal every earlier question has its answer
        while True:
            try:
                text = ask(f"{question.prompt} [{proposed}]: ").strip() or proposed
            except EOFError:
                raise InstallError("no answer: installation stopped") from None
            if question.form.fullmatch(text):
                answers[question.key] = text
                break
            print(f"  not a valid answer: {text!r}")
    return answers


def answer_settings(answers: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(section, key, values) the answers give a new configuration."""
    settings: list[tuple[str, str, list[str]]] = []
    simple = {"hostname": ("smtpgw.network", "Hostname"), "postmaster": ("smtpgw.network", "Postmaster"),
              "domains": ("smtpgw.network", "ProtectedDomains"), "listen": ("smtpgw.network", "ListenOn"),
              "admin": ("smtpgw.policy", "AdminNotifyAddress"), "clamd": ("smtpgw.ave", "ClamdAddress")}
    for key, (section, name) in simple.items():
        if key in answers:
            settings.append((section, name, [", ".join(split_list(answers[key])) if key == "domains" else answers[key]]))
    domains = split_list(answers.get("domains", ""))
    if "relay-from" in answers or domains:
        nets = split_list(answers.get("relay-from", "127.0.0.0/8, ::1"))
        settings.append(("smtpgw.access", "RelayRule", [f"allow from {net} to *" for net in nets]
                         + [f"allow from any to *@{domain}" for domain in domains] + ["deny from any to *"]))
    if "forward-to" in answers:
        host = answers["forward-to"]
        target = host if host.startswith("[") else f"[{host}]"
        settings.append(("smtpgw.forward", "ForwardRoute",
                         [f"*@{domain} {target}" for domain in domains or ["*"]] if host else []))
    return settings


def set_table(lines: list[str], section: str, key: str, values: list[str]) -> None:
    """Replace every active ``key`` line of ``[section]`` by one line per value."""
    header = re.compile(r"\s*\[\s*" + re.escape(section) + r"\s*\]\s*", re.IGNORECASE)
    start = next((n for n, line in enumerate(lines) if header.fullmatch(line)), None)
    if start is None:
        lines.extend(["", f"[{section}]", *(f"{key}={value}" for value in values)])
        return
    end = next((n for n in range(start + 1, len(lines)) if re.match(r"\s*\[", lines[n])), len(lines))
    setting = re.compile(r"\s*" + re.escape(key) + r"\s*=", re.IGNORECASE)
    found = [n for n in range(start + 1, end) if setting.match(lines[n])]
    at = found[0] if found else max((n for n in range(start, end) if lines[n].strip()), default=start) + 1
    for n in reversed(found):
        del lines[n]
    lines[at:at] = [f"{key}={value}" for value in values]


def set_value(lines: list[str], section: str, key: str, value: str, active: bool) -> None:
    """Set ``key`` in ``[section]`` of a configuration's lines: the first line setting it
    (active, else commented out) is replaced; otherwise a line is added to the section."""
    header = re.compile(r"\s*\[\s*" + re.escape(section) + r"\s*\]\s*", re.IGNORECASE)
    start = next((n for n, line in enumerate(lines) if header.fullmatch(line)), None)
    text = f"{key}={value}" if active else f"#{key}={value}"
    if start is None:
        lines.extend(["", f"[{section}]", text])
        return
    end = next((n for n in range(start + 1, len(lines)) if re.match(r"\s*\[", lines[n])), len(lines))
    found: dict[bool, int] = {}  # commented out? -> first line number
    for number in range(start + 1, end):
        match = re.match(r"\s*([#;]?)\s*" + re.escape(key) + r"\s*=", lines[number], re.IGNORECASE)
        if match:
            found.setdefault(bool(match.group(1)), number)
    if found:
        lines[found[False] if False in found else found[True]] = text
        return
    last = max((n for n in range(start, end) if lines[n].strip()), default=start)
    lines.insert(last + 1, text)


def config_text(sample: str, install: Install, account: bool, answers: dict[str, str] | None = None) -> str:
    """A new configuration: the sample with the install paths and the answers to QUESTIONS."""
    lines = sample.splitlines()
    for section, key, value, active in config_settings(install, account):
        set_value(lines, section, key, value, active)
    for section, key, values in answer_settings(answers or {}):
        set_table(lines, section, key, values)
    stamp = (f"# Written by postinstall.py on {date.today().isoformat()} from smtpgw.conf.sample "
             "with the install paths.")
    return "\n".join([stamp, *lines]) + "\n"


def check_config(install: Install) -> tuple[bool, str]:
    """``smtpgw.py -k`` of the installed code on the installed configuration."""
    program = install.staged(f"{install.prefix}/smtpgw.py")
    done = subprocess.run([sys.executable, program, "-c", install.staged(install.config), "-k"],
                          capture_output=True, text=True, cwd=install.staged(install.prefix), check=False)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def install_config(install: Install) -> bool:
    """Refresh the sample beside the configuration; write the configuration when there is none.
    True when it was written now."""
    sample = read_text(install.staged(f"{install.prefix}/smtpgw.conf.sample"))
    write_text(install.staged(f"{install.config}.sample"), sample, 0o644)
    target = install.staged(install.config)
    if os.path.exists(target):
        print(f"configuration {install.config} kept (compare it with {install.config}.sample)")
        return False
    account = install.account_exists()
    if not account:
        print(f"warning: account {install.user}:{install.group} does not exist here; User and Group are "
              "left commented out in the configuration")
    answers = ask_questions(install)
    write_text(target, config_text(sample, install, account, answers), 0o640)
    own(install, target, group_only=True)
    print(f"configuration {install.config} written")
    return True


def install_templates(install: Install) -> None:
    """Copy the shipped templates the configuration folder does not have yet."""
    shipped = install.staged(f"{install.prefix}/smtpgw/templates")
    target = install.staged(f"{install.confdir}/templates")
    os.makedirs(target, 0o755, exist_ok=True)
    for name in sorted(os.listdir(shipped)):
        destination = os.path.join(target, name)
        if not name.startswith(".") and os.path.isfile(os.path.join(shipped, name)) and not os.path.exists(destination):
            shutil.copyfile(os.path.join(shipped, name), destination)
            os.chmod(destination, 0o644)

# endregion
# region service, logrotate, cron


def render(template: str, values: dict[str, str]) -> str:
    """``@NAME@`` fields filled in; an unknown field is an error."""
    text = re.sub(r"@([A-Z_]+)@", lambda m: values.get(m.group(1), m.group(0)), template)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise InstallError(f"template fields without a value: {', '.join(left)}")
    return text


def init_system(install: Install) -> str:
    if install.init != "auto":
        return install.init
    return "systemd" if os.path.isdir("/run/systemd/system") else "sysv"


def install_files(install: Install) -> list[tuple[str, str]]:
    """Write the service, logrotate and cron files; the manifest lines for them."""
    values = install.template_values()
    dist = install.staged(f"{install.prefix}/dist")
    files = [("logrotate.smtpgw", "/etc/logrotate.d/smtpgw", 0o644), ("cron.smtpgw", "/etc/cron.d/smtpgw", 0o644)]
    manifest = []
    if install.service:
        kind = init_system(install)
        if kind == "systemd" and not re.fullmatch(r"/run/[A-Za-z0-9._-]+", install.rundir):
            raise InstallError(f"--rundir {install.rundir}: systemd needs a folder directly under /run")
        files += ([("smtpgw.service.in", "/etc/systemd/system/smtpgw.service", 0o644),
                   ("smtpgwctl.in", HELPER, 0o755)] if kind == "systemd"
                  else [("smtpgw.init", "/etc/init.d/smtpgw", 0o755)])
        manifest.append(("service", kind))
    for template, path, mode in files:
        write_text(install.staged(path), render(read_text(os.path.join(dist, template)), values), mode)
        manifest.append(("file", path))
        print(f"installed {path}")
    return manifest


def enable_service(install: Install, kind: str) -> None:
    """Register the service with the init system; restart it if it runs (new code), never start it."""
    if kind == "systemd":
        commands = [["systemctl", "daemon-reload"], ["systemctl", "enable", "smtpgw.service"],
                    ["systemctl", "try-restart", "smtpgw.service"]]
    elif shutil.which("update-rc.d"):
        commands = [["update-rc.d", "smtpgw", "defaults"], ["/etc/init.d/smtpgw", "try-restart"]]
    else:
        commands = [["chkconfig", "--add", "smtpgw"], ["/etc/init.d/smtpgw", "try-restart"]]
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"warning: {' '.join(command)}: {exc}")
            continue
        if done.returncode != 0:
            print(f"warning: {' '.join(command)} exited with {done.returncode}: {(done.stderr or done.stdout).strip()}")

# endregion
# region bases


def install_bases(install: Install) -> bool:
    """Install the shipped spam database with keepup2date's installer: verified, backed up,
    never replacing a newer one. The configuration's paths are used when it loads."""
    package = install.staged(install.prefix)
    sys.path.insert(0, package)
    from smtpgw.update import updateset  # the installed code, not this folder's
    from smtpgw.update import updater
    from smtpgw.config import ConfigError, load_config

    report = updater.Report(sys.stdout, level=3)
    updates = install.staged(f"{install.datadir}/updates")
    os.makedirs(updates, 0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="postinstall.", dir=updates) as scratch:
        update_set = os.path.join(scratch, "set")
        try:
            updateset.build_update_set(os.path.join(package, "smtpgw", "bases"), update_set)
        except updateset.UpdateError as exc:
            print(f"warning: the shipped bases are not installed: {exc}")
            return True
        options = updater.build_parser().parse_args(["-s", update_set, "-t", scratch])
        try:
            settings = updater.Settings.from_config(load_config(install.staged(install.config)), options)
        except (ConfigError, updater.SettingsError):
            print("warning: the configuration does not load; the shipped bases go to the install paths")
            settings = updater.Settings(source=update_set, bases=f"{install.datadir}/bases",
                                        backup=f"{install.datadir}/bases.backup",
                                        lock=f"{install.datadir}/keepup2date.pid",
                                        control=f"{install.spooldir}/control")
        settings = replace(
            settings, bases=install.staged(settings.bases), backup=install.staged(settings.backup),
            lock=install.staged(settings.lock), control=install.staged(settings.control or ""),
            clamd=None, temp=scratch, post_update_cmd=None,
            allow_unsigned=True,  # a set made here from the package being installed: as trusted as its code
        )
        if older_than_installed(update_set, settings.bases):
            return True
        code = updater.run(settings, report)
    return code in (updater.NO_UPDATE, updater.UPDATED)


def older_than_installed(update_set: str, bases: str) -> bool:
    """Whether the shipped bases are older than the installed ones, which are then kept
    (keepup2date refuses an older set as an error: from a package it is no error)."""
    from smtpgw.update import updateset

    shipped = updateset.read_index(os.path.join(update_set, updateset.INDEX))
    try:
        current = updateset.read_index(os.path.join(bases, updateset.INDEX))
    except updateset.UpdateError:
        return False  # a damaged installed index: keepup2date installs the shipped set in full
    if shipped is None or current is None or shipped.key >= current.key:
        return False
    print(f"the shipped bases: version {shipped.version} is older than the installed {current.version}: "
          f"refused, the installed ones are kept")
    return True

# endregion
# region helpers and main


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror}") from None


def write_text(path: str, text: str, mode: int) -> None:
    """Write a file whole (temp file and rename), with ``mode``."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, 0o755, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".postinstall.", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except OSError as exc:
        raise InstallError(f"cannot write {path}: {exc.strerror}") from None


def own(install: Install, path: str, group_only: bool = False) -> None:
    """On a live install, give ``path`` to the service account (only its group with ``group_only``)."""
    if install.live and os.geteuid() == 0 and install.account_exists():
        os.chown(path, 0 if group_only else pwd.getpwnam(install.user).pw_uid, grp.getgrnam(install.group).gr_gid)


def previous_manifest(install: Install) -> list[tuple[str, str]]:
    """The (kind, value) lines of the manifest an earlier install left, if any."""
    try:
        with open(install.staged(f"{install.prefix}/{MANIFEST}"), encoding="utf-8") as handle:
            return [(kind, value) for kind, _, value in (line.rstrip("\n").partition(" ") for line in handle)
                    if kind in ("service", "file")]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InstallError(f"cannot read {install.prefix}/{MANIFEST}: {exc.strerror}") from None


def remove_stale(install: Install, previous: list[tuple[str, str]], lines: list[tuple[str, str]]) -> None:
    """Remove what an earlier install wrote and this one does not (a service of another kind,
    or none with --no-service): the new manifest forgets it, so --uninstall would not."""
    old_kind = next((value for what, value in previous if what == "service"), None)
    new_kind = next((value for what, value in lines if what == "service"), None)
    if install.live and old_kind and old_kind != new_kind:
        command = (["systemctl", "disable", "smtpgw.service"] if old_kind == "systemd" else
                   ["update-rc.d", "-f", "smtpgw", "remove"] if shutil.which("update-rc.d") else
                   ["chkconfig", "--del", "smtpgw"])
        try:
            subprocess.run(command, capture_output=True, text=True, check=False, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"warning: {' '.join(command)}: {exc}")
    for what, path in previous:
        if what == "file" and ("file", path) not in lines and os.path.lexists(install.staged(path)):
            try:
                os.unlink(install.staged(path))
            except OSError as exc:
                raise InstallError(f"cannot remove {path}: {exc.strerror}") from None
            print(f"removed {path} (no longer installed)")


def write_manifest(install: Install, lines: list[tuple[str, str]]) -> None:
    keep = [("keep", path) for path in (install.confdir, install.datadir, install.spooldir, install.logdir)]
    text = "".join(f"{kind} {value}\n" for kind, value in [*lines, *keep])
    header = "# Written by postinstall.py: what install.sh --uninstall removes (file) and keeps (keep).\n"
    write_text(install.staged(f"{install.prefix}/{MANIFEST}"), header + text, 0o644)


def next_steps(install: Install, new_config: bool, kind: str | None) -> str:
    program = f"{install.python} {install.prefix}/smtpgw.py -c {install.config}"
    start = {"systemd": "systemctl start smtpgw", "sysv": "/etc/init.d/smtpgw start"}.get(kind or "", f"{program}")
    steps = [f"  1. Edit {install.config}: [smtpgw.network] Hostname, Postmaster, ProtectedDomains and "
             "ListenOn (e.g. 0.0.0.0:25); [smtpgw.access] RelayRule; [smtpgw.forward] ForwardRoute (your "
             "mail server); [smtpgw.policy] AdminNotifyAddress, NotifyFromAddress; [smtpgw.ave] ClamdAddress."
             if new_config else
             f"  1. Your configuration was kept: compare {install.config} with {install.config}.sample.",
             f"  2. Check it: {program} -k",
             f"  3. Start the gateway: {start}",
             f"     Service commands (stats, recv-off/on, send-off/on, avir-off/on, reload-bases): "
             f"{'smtpgwctl' if kind == 'systemd' else '/etc/init.d/smtpgw' if kind else program + ' control'} ACTION",
             "  4. Database updates: set [updater.options] UpdateServerUrl; cron then runs keepup2date "
             "hourly (/etc/cron.d/smtpgw)."]
    return "Next steps:\n" + "\n".join(steps)


class Parser(argparse.ArgumentParser):
    """Usage errors exit with FAILED: argparse's 2 is CONFIG_PROBLEMS to install.sh."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(FAILED, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> Install:
    parser = Parser(description="Finish an smtpgw installation (run by install.sh).")
    parser.add_argument("--prefix", default="/opt/smtpgw")
    parser.add_argument("--confdir", default="/etc/smtpgw")
    parser.add_argument("--datadir", default="/var/lib/smtpgw")
    parser.add_argument("--spooldir", default="/var/spool/smtpgw")
    parser.add_argument("--logdir", default="/var/log/smtpgw")
    parser.add_argument("--rundir", default="/run/smtpgw")
    parser.add_argument("--user", default="smtpgw")
    parser.add_argument("--group")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--root", default="")
    parser.add_argument("--no-service", dest="service", action="store_false")
    parser.add_argument("--init", choices=("auto", "systemd", "sysv"), default="auto")
    for question in QUESTIONS:
        parser.add_argument(f"--{question.key}", metavar="VALUE", help=f"a new configuration: {question.prompt}")
    parser.add_argument("--non-interactive", action="store_true", help="ask nothing, even on a terminal")
    args = parser.parse_args(argv)
    values: dict[str, Any] = vars(args)
    values["group"] = args.group or args.user
    answers = []
    for question in QUESTIONS:
        answer = values.pop(question.key.replace("-", "_"))
        if answer is not None:
            if not question.form.fullmatch(answer.strip()):
                parser.error(f"--{question.key} {answer!r}: not of the expected form")
            answers.append((question.key, answer.strip()))
    values["answers"] = tuple(answers)
    values["interactive"] = not values.pop("non_interactive") and sys.stdin.isatty() and sys.stdout.isatty()
    for key in ("prefix", "confdir", "datadir", "spooldir", "logdir", "rundir", "python"):
        if not SAFE_PATH.fullmatch(values[key]) or "/../" in values[key] + "/":
            parser.error(f"--{key} {values[key]!r}: an absolute path of letters, digits and . _ / + -")
    for key in ("user", "group"):
        if not SAFE_NAME.fullmatch(values[key]):
            parser.error(f"--{key} {values[key]!r}: not an account name")
    if args.root and not os.path.isabs(args.root):
        parser.error("--root must be an absolute path")
    return Install(**values)


def main(argv: list[str] | None = None) -> int:
    install = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        install_templates(install)
        new_config = install_config(install)
        good, output = check_config(install)
        print(output)
        if not good and new_config:
            raise InstallError("the generated configuration fails the check (see above)")
        previous = previous_manifest(install)
        manifest = install_files(install)
        remove_stale(install, previous, manifest)
        kind = next((value for what, value in manifest if what == "service"), None)
        write_manifest(install, manifest)
        bases_ok = install_bases(install)
        if install.live and kind:
            enable_service(install, kind)
    except InstallError as exc:
        print(f"postinstall: {exc}", file=sys.stderr)
        return FAILED
    print(next_steps(install, new_config, kind))
    if not bases_ok:
        print("postinstall: the shipped bases could not be installed (see above)", file=sys.stderr)
        return FAILED
    if not good:
        print(f"postinstall: {install.config} fails the check: fix it before starting the gateway", file=sys.stderr)
        return CONFIG_PROBLEMS
    return OK


if __name__ == "__main__":
    sys.exit(main())
