"""Command line: run the gateway, check the configuration, manage the queue.

Owns: argument parsing and exit codes (kmg-spec §4.2: 0 ok, 1 bad options or
configuration, 30 critical runtime error, 41 already running / PID file, 42
PID file cannot be created, 44 cannot change user), the PID file, the
``queue`` subcommands (the reference's klmailq), which ask a running gateway
through the control directory and act directly only when none runs, and the
``control`` subcommand behind the init script's service commands (stats,
recv-off/on, send-off/on, avir-off/on, reload-bases: control files, §4.4).

Must never: change queue states behind a running gateway's back.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from smtpgw import __version__
from smtpgw import log as logsetup
from smtpgw.config import ConfigError, check_config, load_config
from smtpgw.spool import ops
from smtpgw.spool.durable import write_durably
from smtpgw.spool.queue import Queue

DEFAULT_CONFIG = "/etc/smtpgw/smtpgw.conf"
REQUEST_DEADLINE = 30.0  # seconds a queue command waits for the running gateway


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgw.py", description="smtpgw: SMTP filtering relay (anti-virus, anti-spam)")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("-k", "--check-config", action="store_true", help="check the configuration and exit")
    parser.add_argument("-n", "--no-pid-file", action="store_true", help="do not create the PID file")
    parser.add_argument("-p", "--pid-file", help="PID file (overrides [smtpgw.options] PidFile)")
    parser.add_argument("-u", "--user", help="run as this user (overrides [smtpgw.options] User)")
    parser.add_argument("-o", "--no-change-owner", action="store_true", help="keep the current user")
    parser.add_argument("-v", "--version", action="version", version=f"smtpgw {__version__}")
    sub = parser.add_subparsers(dest="command")
    queue = sub.add_parser("queue", help="the working queue (klmailq)")
    qsub = queue.add_subparsers(dest="op", required=True)
    qsub.add_parser("list", help="list queued messages")
    for op, text in (("remove", "remove one message"), ("send", "scan and send one message ahead of the rest")):
        p = qsub.add_parser(op, help=text)
        p.add_argument("id")
    qsub.add_parser("remove-all", help="remove every message that is not being processed")
    qsub.add_parser("send-all", help="send every queued message now, ignoring back-off")
    sub.add_parser("store", help="quarantine, backup and archives (klmaila); store -h for more")
    sub.add_parser("keepup2date", help="update the databases; keepup2date -h for more")
    sub.add_parser("spam", help="train and run the spam filter; spam -h for more")
    console = sub.add_parser("console", help="the web console ([smtpgw.console])")
    console.add_subparsers(dest="op", required=True).add_parser(
        "passwd", help="read a password (stdin or prompt) and print the AdminPasswordHash value to paste")
    stats = sub.add_parser("stats", help="write the statistics (.c_stats) and print them; --days N: the daily history")
    stats.add_argument("--timeout", type=float, default=REQUEST_DEADLINE)
    stats.add_argument("--days", type=int, metavar="N", help="print the last N days of the daily history instead")
    control = sub.add_parser("control", help="the init script's service commands: stats, recv-off, recv-on, "
                             "send-off, send-on, avir-off, avir-on, reload-bases")
    control.add_argument("action", choices=("stats", *CONTROL_FILES))
    control.add_argument("--timeout", type=float, default=REQUEST_DEADLINE,
                         help="seconds to wait for the gateway to take the command")
    return parser


# The reference's init script actions (kmg-spec §4.1) and the control files that carry them (§4.4).
CONTROL_FILES = {
    "recv-off": ".c_recv_off", "recv-on": ".c_recv_on", "send-off": ".c_send_off", "send-on": ".c_send_on",
    "avir-off": ".c_avir_off", "avir-on": ".c_avir_on", "reload-bases": ".c_db_reload",
}


PASS_THROUGH = ("store", "keepup2date", "spam")  # subcommands that parse their own arguments
_VALUED = ("-c", "--config", "-p", "--pid-file", "-u", "--user")


def split_command(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(global options, pass-through subcommand or None, its own arguments)."""
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in _VALUED:
            index += 2
            continue
        if token.startswith("-"):
            index += 1
            continue
        if token in PASS_THROUGH:
            return argv[:index], token, argv[index + 1 :]
        break
    return argv, None, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, command, rest = split_command(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 1
    if args.check_config:
        return check_config(args.config)
    if args.command == "console":
        return console_passwd()
    if command == "keepup2date":
        from smtpgw.update.updater import main as update_main

        return update_main(rest, args.config)  # it reports a bad configuration with its own code (75)
    if command == "spam" and not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        from smtpgw.spam.cli import main as spam_main

        return spam_main(rest, None)  # the spam tools work without a configuration too
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if command == "spam":
        from smtpgw.spam.cli import main as spam_main

        return spam_main(rest, cfg.base.BasesPath)
    if command == "store":
        from smtpgw.app.storecli import store_main

        return store_main(rest, cfg, release_callback=lambda *a: release(cfg, *a))

    if args.command == "queue":
        return queue_command(cfg, args)
    if args.command == "stats" and args.days is not None:
        return history_command(cfg, args.days)
    if args.command == "stats" or (args.command == "control" and args.action == "stats"):
        return stats_command(cfg, args.timeout)
    if args.command == "control":
        return control_command(cfg, args.action, args.timeout)
    return run(cfg, args)


def console_passwd() -> int:
    """``console passwd``: the PBKDF2 hash of a password, for AdminPasswordHash or ReadOnlyUsers."""
    from getpass import getpass

    from smtpgw.console.auth import hash_password

    if sys.stdin.isatty():
        password = getpass("Password: ")
        if getpass("Again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("a password needs at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def run(cfg, args: argparse.Namespace) -> int:
    from smtpgw.app.gateway import Gateway, StartupError

    def open_log() -> None:
        logsetup.setup(cfg.options.LogFile, cfg.options.LogLevel, cfg.locale.DateFormat, cfg.locale.TimeFormat,
                       echo=sys.stderr.isatty())

    logsetup.setup(None, cfg.options.LogLevel, cfg.locale.DateFormat, cfg.locale.TimeFormat)  # until we know who we are
    pid_file = None if args.no_pid_file else (args.pid_file or cfg.options.PidFile)
    try:
        gateway = Gateway(cfg, args.config)
        gateway.check_not_running()  # 41 is reported before a port is bound
        if pid_file:
            check_pid_file(pid_file, only_regular=True)
        gateway.bind()
        if not args.no_change_owner:
            gateway.drop_privileges(args.user or cfg.options.User, cfg.options.Group)
        open_log()  # as the service user, so that a reopen at HUP works too
        gateway.lock_queue()
        if pid_file:
            write_pid_file(pid_file)
        gateway.start()
    except (StartupError, OSError) as exc:  # OSError: a folder that cannot be made (QueuePath, ...)
        logsetup.root.error("cannot start: %s", exc)
        print(f"smtpgw: {exc}", file=sys.stderr)
        return exc.code if isinstance(exc, StartupError) else 30
    try:
        gateway.run()
    finally:
        if pid_file:
            try:
                os.unlink(pid_file)
            except OSError:
                pass
    return 0


def write_pid_file(path: str) -> None:
    from smtpgw.app.gateway import StartupError

    check_pid_file(path)
    try:
        write_durably(path, f"{os.getpid()}\n".encode())
    except OSError as exc:
        raise StartupError(f"cannot create PID file {path}: {exc}", 42) from exc


def check_pid_file(path: str, only_regular: bool = False) -> None:
    """StartupError 41 when ``path`` names a running process other than this one (a stale file is
    fine). ``only_regular``: anything but a regular file (a FIFO would block) is left for later."""
    from smtpgw.app.gateway import StartupError

    try:
        if only_regular and not stat.S_ISREG(os.stat(path).st_mode):
            return
        with open(path) as f:
            old = int(f.read().strip() or 0)
        if old and old != os.getpid():
            try:
                os.kill(old, 0)
                raise StartupError(f"PID file {path} names a running process {old}", 41)
            except ProcessLookupError:
                pass  # stale
            except PermissionError:  # alive, owned by another user
                raise StartupError(f"PID file {path} names a running process {old}", 41) from None
    except (FileNotFoundError, ValueError):
        pass


# -- queue manager (klmailq) ----------------------------------------------------------
def _size(n: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def format_queue(queue: Queue) -> str:
    lines = []
    total = 0
    for state, env in ops.entries(queue):
        total += env.size
        when = datetime.fromtimestamp(env.received_at).strftime("%Y-%m-%d %H:%M:%S")
        rcpts = " ".join(f"<{r.addr}>" for r in env.pending()) or "-"
        lines.append(f"{env.id} {state} {_size(env.size)} {when} {env.client_ip or '-'} <{env.sender}> -> {rcpts}")
    lines.append(f"-- {len(lines)} message(s), {_size(total)}")
    return "\n".join(lines)


@contextmanager
def offline_lock(queue: Queue) -> Iterator[bool]:
    """The queue's lock, held for the whole block when no gateway runs (True), so that a
    gateway starting meanwhile waits for the spool to be consistent; False: a gateway holds it."""
    fd = os.open(os.path.join(queue.root, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def ask_gateway(control_path: str, op: str, qid: str | None, extra: dict | None = None,
                poll_interval: float = 0.0) -> tuple[int, str]:
    """Drop a request in the control directory and wait for the gateway's answer: up to
    REQUEST_DEADLINE after its next poll (``poll_interval``, ControlPollInterval). A request
    not taken by then is withdrawn, so that it is never carried out after this reported
    failure; one taken meanwhile is answered, and that answer is awaited."""
    nonce = f"{os.getpid()}_{secrets.token_hex(4)}"
    request = os.path.join(control_path, f".q_{nonce}")
    write_durably(request, json.dumps({"op": op, "id": qid, **(extra or {})}).encode())
    answer = os.path.join(control_path, f".a_{nonce}")
    got = _answer(answer, REQUEST_DEADLINE + poll_interval)
    if got is None:
        try:
            os.unlink(request)
            return 3, "the gateway did not answer in time (is it running?); nothing was done"
        except FileNotFoundError:  # the gateway took it just now
            got = _answer(answer, REQUEST_DEADLINE)
    return got if got is not None else (3, "the gateway took the request but did not answer in time")


def _answer(path: str, timeout: float) -> tuple[int, str] | None:
    """The gateway's answer in ``path`` (code, output), or None when none came in ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                data = json.load(f)
            os.unlink(path)
            return int(data["code"]), str(data["output"])
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)  # polling a file another process writes
    return None


def queue_command(cfg, args: argparse.Namespace) -> int:
    try:
        queue = Queue(cfg.path.QueuePath)
    except OSError as exc:
        print(f"cannot read the queue {cfg.path.QueuePath}: {exc}", file=sys.stderr)
        return 2
    if args.op == "list":
        print(format_queue(queue))
        return 0
    qid = getattr(args, "id", None)
    with offline_lock(queue) as offline:
        if offline:
            code, output = offline_queue_command(queue, args.op, qid)
    if not offline:
        code, output = ask_gateway(cfg.path.ControlPath, args.op, qid, poll_interval=cfg.options.ControlPollInterval)
    print(output, file=sys.stdout if code == 0 else sys.stderr)
    return code


def offline_queue_command(queue: Queue, op: str, qid: str | None) -> tuple[int, str]:
    """With no gateway running, act on the spool directly; the caller holds its lock. The
    same rules and the same removal as the gateway's (``spool.ops.remove_request``)."""
    if op in ("remove", "remove-all"):
        return ops.remove_request(queue, op, qid, lambda item, state: ops.remove_record(queue, item, state))
    if op == "send-all":
        return ops.NOT_PERFORMED, "the gateway is not running: messages are sent when it starts"
    state, code, why = ops.locate(queue, qid)
    if state is None:
        return code, why
    return ops.NOT_PERFORMED, "the gateway is not running: messages are sent when it starts"


def release(cfg, raw: bytes, sender: str, recipients: list[str], check: bool) -> bool:
    """Queue a released store item: through the running gateway, or directly when none runs."""
    queue = Queue(cfg.path.QueuePath)
    with offline_lock(queue) as offline:
        if offline:  # under the lock: a gateway starting now cannot take the half-written record
            # picked up when the gateway starts
            env = ops.release(queue, sender, recipients, check, cfg.network.Hostname, data=raw)
            print(f"released as {env.id}")
            return True
    os.makedirs(cfg.path.ControlPath, exist_ok=True)
    name = f".m_{os.getpid()}_{secrets.token_hex(4)}"
    write_durably(os.path.join(cfg.path.ControlPath, name), raw)
    code, output = ask_gateway(cfg.path.ControlPath, "release", None,
                               {"message": name, "sender": sender, "recipients": recipients, "check": check},
                               poll_interval=cfg.options.ControlPollInterval)
    print(output, file=sys.stdout if code == 0 else sys.stderr)
    return code == 0


def stats_command(cfg, timeout: float) -> int:
    """Ask the running gateway for a statistics dump (``.c_stats``) and print it."""
    path = cfg.options.StatFilename
    os.makedirs(cfg.path.ControlPath, exist_ok=True)
    before = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
    open(os.path.join(cfg.path.ControlPath, ".c_stats"), "w").close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.stat(path).st_mtime_ns != before:
            with open(path) as f:
                print(f.read(), end="")
            return 0
        time.sleep(0.05)  # polling a file the gateway writes
    print("the gateway did not write statistics in time (is it running?)", file=sys.stderr)
    return 3


def control_command(cfg, action: str, timeout: float) -> int:
    """Drop the control file of ``action`` and wait until the running gateway takes it (it deletes
    the file, then acts): 0 taken; 3 not taken in time (the file is withdrawn, so that a gateway
    started later does not act on it)."""
    os.makedirs(cfg.path.ControlPath, exist_ok=True)
    path = os.path.join(cfg.path.ControlPath, CONTROL_FILES[action])
    write_durably(path, b"")
    deadline = time.monotonic() + timeout + cfg.options.ControlPollInterval
    while os.path.exists(path):
        if time.monotonic() > deadline:
            try:
                os.unlink(path)
            except FileNotFoundError:
                break  # taken just now
            print(f"smtpgw: the gateway did not take {action} in time (is it running?); nothing was done",
                  file=sys.stderr)
            return 3
        time.sleep(0.05)  # polling a file the gateway removes
    print(f"smtpgw: {action} taken by the gateway")
    return 0


def history_command(cfg, days: int) -> int:
    """``stats --days N``: the last N lines of the daily history (today's as last saved)."""
    from smtpgw.stats import format_history, history_path, read_history

    if days < 1:
        print("smtpgw: --days needs a number of days of 1 or more", file=sys.stderr)
        return 1
    try:
        lines = read_history(history_path(cfg.path.QueuePath))
    except OSError as exc:
        print(f"smtpgw: cannot read the statistics history: {exc}", file=sys.stderr)
        return 2
    print(format_history(lines, days), end="")
    return 0
