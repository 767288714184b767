"""The web console's requests: parsing, the checks every request passes, the routes.

Owns: one request from its bytes to its answer: bounded query and form fields,
the session cookie (HttpOnly, SameSite=Strict, Secure over HTTPS), the
same-origin and CSRF checks on every POST, the role a POST needs, the
security headers of every answer, and the table of routes (`ROUTES`) that
call the console's operations and pages.

Must never: act on a POST without a valid CSRF token and session, act for a
read-only user, answer without the security headers, or pass a request value
to the file system (queue IDs go through ``control.locate``, store items
through ``Store.item``, stores are chosen by name from the configuration).
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import re
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable

from smtpgw import __version__, console_auth, console_pages as pages
from smtpgw.config import ConfigError, load_config
from smtpgw.console_auth import ADMIN, Session
from smtpgw.console_updates import report_tail
from smtpgw.queue import STATES
from smtpgw.store import STATUSES, Store, StoreError

if TYPE_CHECKING:
    from smtpgw.console import Console

log = logging.getLogger("smtpgw.console")

COOKIE = "smtpgw_session"
MAX_BODY = 16 * 1024  # bytes of a form
MAX_FIELD = 256  # characters of one form or query value
MAX_CONFIG_FORM = 1024 * 1024  # bytes of a configuration sent to be checked
MAX_ROWS = 500  # rows of a listing
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request
SWITCHES = (".c_recv_on", ".c_recv_off", ".c_send_on", ".c_send_off", ".c_avir_on", ".c_avir_off",
            ".c_db_reload", ".c_stats")
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make a browser send "Origin: null"
    "Cache-Control": "no-store",
}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LEVEL = re.compile(r"[EWID]")
_LINE_LEVEL = re.compile(r"\[[^\]]* ([A-Z])\]")  # log.LineFormatter: "[DATE TIME L] QID: text"


class Refused(Exception):
    """A request answered with an HTTP error: ``status`` and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Handler(http.server.BaseHTTPRequestHandler):
    server: Any  # console._Server
    server_version = "smtpgw-console"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.0"

    @property
    def console(self) -> "Console":
        return self.server.console

    @property
    def ip(self) -> str:
        address = str(self.client_address[0])
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return address
        mapped = getattr(parsed, "ipv4_mapped", None)
        return str(mapped or parsed)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("console %s: %s", self.ip, format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        try:
            url = urllib.parse.urlsplit(self.path)
            route = ROUTES.get((method, url.path))
            if route is None:
                raise Refused(404 if method == "GET" else 405, "no such page")
            route(self, fields(url.query) if method == "GET" else self.form())
        except Refused as exc:
            self.send_page(exc.status, pages.error_page(exc.status, str(exc)))
        except Exception:
            log.exception("console: %s %s failed", method, self.path[:200])
            self.send_page(500, pages.error_page(500, "internal error; see the gateway's log"))

    # -- request parts ----------------------------------------------------------------------
    def form(self) -> dict[str, str]:
        """The POST's form: bounded; only a configuration check carries one long field (``text``)."""
        if self.headers.get_content_type() != "application/x-www-form-urlencoded":
            raise Refused(415, "a form is expected")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise Refused(411, "Content-Length is needed") from None
        long_field = "text" if urllib.parse.urlsplit(self.path).path == "/config/check" else None
        if not 0 <= length <= (MAX_CONFIG_FORM if long_field else MAX_BODY):
            raise Refused(413, "form too large")
        return fields(self.rfile.read(length).decode("utf-8", "replace"), long_field)

    def token(self) -> str | None:
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return None

    def same_origin(self) -> bool:
        """A POST from another site is refused even before its CSRF token is looked at."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        return urllib.parse.urlsplit(origin).netloc == self.headers.get("Host", "")

    def user(self) -> Session:
        """The session of a page; without one the browser goes to the login page."""
        session = self.console.sessions.get(self.token())
        if session is None:
            raise Redirect("/login")
        return session

    def acting(self, form: dict[str, str], action: str, item: str = "-") -> Session:
        """The session of a POST that changes something: same origin, CSRF token, admin role."""
        session = self.console.sessions.get(self.token())
        if session is None or not self.same_origin() or not console_auth.csrf_ok(session, form.get("csrf")):
            self.console.audit(session, self.ip, action, item, "refused: no valid session or CSRF token")
            raise Refused(403, "refused: no valid session or CSRF token (reload the page)")
        if session.role != ADMIN:
            self.console.audit(session, self.ip, action, item, "refused: read-only user")
            raise Refused(403, "refused: this user may look, not act")
        return session

    # -- answers --------------------------------------------------------------------------
    def send_page(self, status: int, body: str, content_type: str = "text/html; charset=utf-8",
                  extra: dict[str, str] | None = None) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        for name, value in {**HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def page(self, session: Session, title: str, body: str, refresh: int = 0) -> None:
        self.send_page(200, pages.layout(title, body, session.user, session.role, session.csrf, refresh))

    def redirect(self, where: str, cookie: str | None = None) -> None:
        self.send_page(303, "", extra={"Location": where, **({"Set-Cookie": cookie} if cookie is not None else {})})

    def cookie(self, token: str) -> str:
        secure = "; Secure" if self.console.secure else ""
        return f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}" + ("" if token else "; Max-Age=0")


class Redirect(Refused):
    def __init__(self, where: str) -> None:
        super().__init__(303, where)
        self.where = where


def fields(text: str, long_field: str | None = None) -> dict[str, str]:
    """Form or query fields, each name once; values bounded (``long_field`` by the form's size)."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=32)
    except ValueError:
        raise Refused(400, "too many fields") from None
    found: dict[str, str] = {}
    for name, value in pairs:
        if name in found or (len(value) > MAX_FIELD and name != long_field):
            raise Refused(400, f"field {name[:32]!r} repeated or too long")
        found[name] = value
    return found


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
    h.console.on_loop(h.console.gw.control.commands[command])
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
    code, output = h.console.on_loop(lambda: h.console.gw.control.handle(op, qid))  # control.locate checks qid
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
        result = f"{item.id} learned as {op[6:]} ({count} message(s)); databases reloading"
    elif op == "delete":
        store.remove(item.id)
        result = f"{item.id} deleted"
    elif not item.recipients:
        raise Refused(409, "the item has no recipients to release to")
    else:
        path, check = store.message_path(item.id), op == "release"
        qid = h.console.on_loop(lambda: h.console.gw.inject(path, item.sender, list(item.recipients), check))
        result = f"{item.id} released as {qid}" + ("" if check else " without check")
    h.console.audit(session, h.ip, f"store-{op}", f"{name}/{item.id}", result)
    h.redirect(_notice(f"/store?name={urllib.parse.quote(name)}", result))


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
    path = h.console.gw.config_path
    with open(path, "rb") as f:
        text = f.read(MAX_CONFIG_FORM).decode("utf-8", "replace")
    h.page(session, "Configuration", pages.config_page(path, text, session.role == ADMIN, session.csrf))


def config_check(h: Handler, form: dict[str, str]) -> None:
    """``-k`` of an edited copy, as if it were the configuration file (its folder, its file: lists)."""
    session = h.acting(form, "config-check")
    text, path = form.get("text", ""), h.console.gw.config_path
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
    gw = h.console.gw

    def reload() -> bool:
        before = gw.cfg
        gw.reload()
        return gw.cfg is not before
    result = "configuration reloaded" if h.console.on_loop(reload) else "reload refused; the log says why"
    h.console.audit(session, h.ip, "config-reload", "-", result)
    h.redirect(_notice("/config", result))


@guarded
def updates_view(h: Handler, form: dict[str, str]) -> None:
    session, cfg = h.user(), h.console.gw.cfg
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
