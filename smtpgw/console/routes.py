"""The web console's routes: each page and action, from checked fields to the console's operations.

Owns: the table `ROUTES` of (method, path) to the function answering it, the
validation of every field a route reads (states, statuses, dates and levels
from fixed sets or patterns), and which operation an action calls: control
commands and queue operations through ``Control``, releases through
``Gateway.inject``, store items through ``Store``, spam learning, the
configuration check and reload, keepup2date runs.

Must never: pass a request value to the file system (queue IDs go through
``control.locate``, store items through ``Store.item``, stores are chosen by
name from the configuration), or change anything on a GET.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from typing import Any, Callable

from smtpgw import __version__
from smtpgw.config import ConfigError, load_config
from smtpgw.console import auth as console_auth, pages
from smtpgw.console.auth import ADMIN
from smtpgw.console.request import MAX_CONFIG_FORM, Handler, Redirect, Refused
from smtpgw.console.updates import report_tail
from smtpgw.spam.database import DatabaseError
from smtpgw.spool import ops
from smtpgw.spool.queue import STATES
from smtpgw.spool.store import STATUSES, Store, StoreError

MAX_ROWS = 500  # rows of a listing
SWITCHES = (".c_recv_on", ".c_recv_off", ".c_send_on", ".c_send_off", ".c_avir_on", ".c_avir_off",
            ".c_db_reload", ".c_stats")  # the control commands (control.Control.commands) a button may give
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LEVEL = re.compile(r"[EWID]")
_LINE_LEVEL = re.compile(r"\[[^\]]* ([A-Z])\]")  # log.LineFormatter: "[DATE TIME L] QID: text"


def _choice(value: str, allowed: tuple[str, ...] | Any, what: str) -> str:
    if value and value not in allowed:
        raise Refused(400, f"not a {what}")
    return value


def _notice(url: str, text: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}notice={urllib.parse.quote(text[:200])}"


# -- routes -----------------------------------------------------------------------------------
Route = Callable[[Handler, dict[str, str]], None]


def guarded(route: Route) -> Route:
    """A page: a visitor without a session is sent to the login page."""
    def run(h: Handler, form: dict[str, str]) -> None:
        try:
            route(h, form)
        except Redirect as redirect:
            h.redirect(redirect.where)
    return run


def stylesheet(h: Handler, form: dict[str, str]) -> None:
    h.send_page(200, pages.STYLESHEET, "text/css; charset=utf-8")


def login_form(h: Handler, form: dict[str, str]) -> None:
    if h.console.sessions.get(h.token()) is not None:
        h.redirect("/")
        return
    h.send_page(200, pages.login_page())


def login(h: Handler, form: dict[str, str]) -> None:
    user, password = form.get("user", ""), form.get("password", "")
    keys = (f"ip:{h.ip}", f"user:{user}")
    if not h.same_origin():
        raise Refused(403, "refused: cross-site login")
    if h.console.throttle.locked(*keys):
        h.console.audit(None, h.ip, "login", user, "refused: locked out")
        h.send_page(429, pages.login_page("Too many failed logins: locked out, try again later."))
        return
    account = h.console.account(user)
    if account is None:
        console_auth.verify_unknown(password)
    if account is None or not console_auth.verify_password(password, account[0]):
        locked = h.console.throttle.failed(*keys)
        h.console.audit(None, h.ip, "login", user, "wrong user or password" + (", now locked out" if locked else ""))
        h.send_page(403, pages.login_page("Wrong user name or password."))
        return
    h.console.throttle.succeeded(*keys)
    token, session = h.console.sessions.open(user, account[1])
    h.console.audit(session, h.ip, "login", user)
    h.redirect("/", h.cookie(token))


def logout(h: Handler, form: dict[str, str]) -> None:
    session = h.console.sessions.get(h.token())
    if session is not None and console_auth.csrf_ok(session, form.get("csrf")):
        h.console.sessions.close(h.token())
        h.console.audit(session, h.ip, "logout")
    h.redirect("/login", h.cookie(""))


@guarded
def status(h: Handler, form: dict[str, str]) -> None:
    session, console = h.user(), h.console
    body = pages.status_page(console.snapshot(), console.queue_depth(), console.spam_database(),
                             console.clamd_health(), __version__, session.role == ADMIN, session.csrf)
    h.page(session, "Status", pages.notice(form.get("notice", "")) + body)


def control(h: Handler, form: dict[str, str]) -> None:
    command = form.get("command", "")
    session = h.acting(form, "control", command)
    if command not in SWITCHES:
        raise Refused(400, "not a control command")
    h.console.on_loop(lambda: h.console.host.command(command))
    h.console.audit(session, h.ip, "control", command)
    h.redirect(_notice("/", f"{command} done"))


@guarded
def queue(h: Handler, form: dict[str, str]) -> None:
    session = h.user()
    wanted = {"state": _choice(form.get("state", ""), STATES, "queue state"),
              "sender": form.get("sender", ""), "recipient": form.get("recipient", "")}
    rows = [(state, env) for state, env in h.console.queue_entries()
            if (not wanted["state"] or state == wanted["state"])
            and wanted["sender"].lower() in env.sender.lower()
            and (not wanted["recipient"] or any(wanted["recipient"].lower() in r.addr.lower() for r in env.recipients))]
    body = pages.queue_page(rows[:MAX_ROWS], wanted, STATES, session.role == ADMIN, session.csrf, len(rows) > MAX_ROWS)
    h.page(session, "Queue", pages.notice(form.get("notice", "")) + body)


def queue_action(h: Handler, form: dict[str, str]) -> None:
    op, qid = form.get("op", ""), form.get("id", "")
    session = h.acting(form, f"queue-{op}", qid)
    if op not in ("remove", "send"):
        raise Refused(400, "not a queue operation")
    code, output = h.console.on_loop(lambda: h.console.host.queue_operation(op, qid))  # control.locate checks qid
    h.console.audit(session, h.ip, f"queue-{op}", qid, output if code else "done")
    h.redirect(_notice("/queue", output))


def _store(h: Handler, form: dict[str, str]) -> tuple[str, Store]:
    name = form.get("name", "quarantine")
    path = h.console.stores().get(name)
    if path is None:
        raise Refused(404, "no such store")
    return name, Store(path)


def _item(store: Store, item_id: str) -> Any:
    try:
        return store.item(item_id)
    except StoreError:
        raise Refused(400, "not an item ID") from None
    except KeyError:
        raise Refused(404, "no such item") from None


@guarded
def store_list(h: Handler, form: dict[str, str]) -> None:
    session = h.user()
    name, store = _store(h, form)
    wanted = {"status": _choice(form.get("status", ""), STATUSES, "status"), "sender": form.get("sender", ""),
              "recipient": form.get("recipient", ""), "date": form.get("date", "")}
    if wanted["date"] and not _DATE.fullmatch(wanted["date"]):
        raise Refused(400, "a date is YYYY-MM-DD")
    try:
        items = store.list()
    except OSError:
        items = []
    items = [i for i in items if (not wanted["status"] or i.status == wanted["status"])
             and wanted["sender"].lower() in i.sender.lower()
             and (not wanted["recipient"] or any(wanted["recipient"].lower() in r.lower() for r in i.recipients))
             and (not wanted["date"] or time.strftime("%Y-%m-%d", time.localtime(i.time)) == wanted["date"])]
    body = pages.store_page(name, list(h.console.stores()), items[-MAX_ROWS:], wanted, session.role == ADMIN,
                            session.csrf)
    h.page(session, f"Store: {name}", pages.notice(form.get("notice", "")) + body)


@guarded
def store_item(h: Handler, form: dict[str, str]) -> None:
    session = h.user()
    name, store = _store(h, form)
    item = _item(store, form.get("id", ""))
    with open(store.message_path(item.id), "rb") as f:
        raw = f.read(pages.PREVIEW_BYTES * 4)
    h.page(session, f"{name}: {item.id}", pages.item_page(name, item, raw, session.role == ADMIN, session.csrf))


def store_action(h: Handler, form: dict[str, str]) -> None:
    op, item_id = form.get("op", ""), form.get("id", "")
    session = h.acting(form, f"store-{op}", item_id)
    if op not in ("release", "release-without-check", "delete", "learn-spam", "learn-ham"):
        raise Refused(400, "not a store operation")
    name, store = _store(h, form)
    item = _item(store, item_id)
    if op.startswith("learn-"):
        count = h.console.learn(store.message_path(item.id), op == "learn-spam")
        result = f"{item.id} learned as {op[6:]} ({count} message(s)) into the site spam database"
    elif op == "delete":
        store.remove(item.id)
        result = f"{item.id} deleted"
    elif not item.recipients:
        raise Refused(409, "the item has no recipients to release to")
    else:
        path, check = store.message_path(item.id), op == "release"
        learned = _learn_released(h, item, path)
        qid = h.console.on_loop(lambda: h.console.host.release(path, item.sender, list(item.recipients), check))
        result = f"{item.id} released as {qid}" + ("" if check else " without check") + learned
    h.console.audit(session, h.ip, f"store-{op}", f"{name}/{item.id}", result)
    h.redirect(_notice(f"/store?name={urllib.parse.quote(name)}", result))


def _learn_released(h: Handler, item: Any, path: str) -> str:
    """LearnOnRelease, as ``store release`` (``spool.ops.learns_on_release``): a released spam is
    learned as ham first, in this request's thread; what happened, for the notice."""
    if not ops.learns_on_release(item, h.console.host.cfg.antispam.LearnOnRelease):
        return ""
    try:
        h.console.learn(path, False)
    except (DatabaseError, OSError) as exc:
        return f" (not learned as ham: {exc})"
    return ", learned as ham"


@guarded
def log_view(h: Handler, form: dict[str, str]) -> None:
    session = h.user()
    wanted = {"qid": form.get("qid", ""), "event": form.get("event", ""),
              "level": form.get("level", "")}
    if wanted["level"] and not _LEVEL.fullmatch(wanted["level"]):
        raise Refused(400, "not a log level")
    lines = [line for line in h.console.log_tail()
             if (not wanted["level"] or _level(line) == wanted["level"])
             and (not wanted["qid"] or f"] {wanted['qid']}:" in line)
             and wanted["event"] in line]
    follow = form.get("follow") == "1"
    h.page(session, "Log", pages.log_page(lines[-MAX_ROWS:], wanted, follow), refresh=5 if follow else 0)


def _level(line: str) -> str:
    match = _LINE_LEVEL.match(line)
    return match.group(1) if match else ""


@guarded
def stats(h: Handler, form: dict[str, str]) -> None:
    session = h.user()
    by_minute, by_hour = h.console.charts()
    h.page(session, "Statistics", pages.stats_page(h.console.snapshot(), by_minute, by_hour))


@guarded
def config_view(h: Handler, form: dict[str, str]) -> None:
    session = h.user()
    path = h.console.host.config_path
    with open(path, "rb") as f:
        text = f.read(MAX_CONFIG_FORM).decode("utf-8", "replace")
    h.page(session, "Configuration", pages.config_page(path, text, session.role == ADMIN, session.csrf))


def config_check(h: Handler, form: dict[str, str]) -> None:
    """``-k`` of an edited copy, as if it were the configuration file (its folder, its file: lists)."""
    session = h.acting(form, "config-check")
    text, path = form.get("text", ""), h.console.host.config_path
    try:
        load_config(path, text.encode("utf-8"))
        problems = []
    except ConfigError as error:
        problems = error.problems
    h.console.audit(session, h.ip, "config-check", "-", f"{len(problems)} problem(s)")
    h.page(session, "Configuration", pages.config_page(path, text, True, session.csrf, problems))


def config_reload(h: Handler, form: dict[str, str]) -> None:
    """As SIGHUP: the file is read again; a bad one leaves the running configuration in force."""
    session = h.acting(form, "config-reload")
    gw = h.console.host

    def reload() -> bool:
        before = gw.cfg
        gw.reload()
        return gw.cfg is not before
    result = "configuration reloaded" if h.console.on_loop(reload) else "reload refused; the log says why"
    h.console.audit(session, h.ip, "config-reload", "-", result)
    h.redirect(_notice("/config", result))


@guarded
def updates_view(h: Handler, form: dict[str, str]) -> None:
    session, cfg = h.user(), h.console.host.cfg
    body = pages.updates_page(h.console.updates.last, report_tail(cfg.updater_report.ReportFileName),
                              cfg.updater_options.UpdateServerUrl or "", h.console.spam_database(),
                              session.role == ADMIN, session.csrf)
    h.page(session, "Updates", pages.notice(form.get("notice", "")) + body)


def updates_run(h: Handler, form: dict[str, str]) -> None:
    session = h.acting(form, "keepup2date")
    result = "keepup2date started" if h.console.updates.start() else "keepup2date is already running"
    h.console.audit(session, h.ip, "keepup2date", "-", result)
    h.redirect(_notice("/updates", result))


def _monitor(h: Handler) -> None:
    if not h.console.metrics_allowed(h.ip):
        raise Refused(403, "not allowed from this address (MetricsAllowFrom)")


def metrics(h: Handler, form: dict[str, str]) -> None:
    _monitor(h)
    text = pages.metrics_text(h.console.snapshot(), h.console.queue_depth(), h.console.clamd_health(), __version__)
    h.send_page(200, text, "text/plain; version=0.0.4; charset=utf-8")


def healthz(h: Handler, form: dict[str, str]) -> None:
    """200 ``ok`` while the event loop answers and mail is received; 503 with the reason otherwise."""
    _monitor(h)
    snap = h.console.snapshot()
    problem = "stopping" if snap["stopping"] else "" if snap["receiving"] else "receiving off"
    h.send_page(503 if problem else 200, (problem or "ok") + "\n", "text/plain; charset=utf-8")


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/style.css"): stylesheet,
    ("GET", "/login"): login_form,
    ("POST", "/login"): login,
    ("POST", "/logout"): logout,
    ("GET", "/"): status,
    ("POST", "/control"): control,
    ("GET", "/queue"): queue,
    ("POST", "/queue"): queue_action,
    ("GET", "/store"): store_list,
    ("GET", "/store/item"): store_item,
    ("POST", "/store"): store_action,
    ("GET", "/log"): log_view,
    ("GET", "/stats"): stats,
    ("GET", "/config"): config_view,
    ("POST", "/config/check"): config_check,
    ("POST", "/config/reload"): config_reload,
    ("GET", "/updates"): updates_view,
    ("POST", "/updates/run"): updates_run,
    ("GET", "/metrics"): metrics,
    ("GET", "/healthz"): healthz,
}
