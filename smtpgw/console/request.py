"""The web console's requests: parsing and the checks every request passes.

Owns: one request from its bytes to the route that answers it (the server's
table, `console_routes.ROUTES`): bounded query and form fields, the session
cookie (HttpOnly, SameSite=Strict, Secure over HTTPS), the same-origin and
CSRF checks on every POST, the role a POST needs, and the security headers of
every answer.

Must never: act on a POST without a valid CSRF token and session, act for a
read-only user, or answer without the security headers.
"""

from __future__ import annotations

import http.server
import io
import ipaddress
import logging
import threading
import urllib.parse
from typing import Any, Callable, Protocol

from smtpgw.config import Config
from smtpgw.console import auth as console_auth, pages
from smtpgw.console.auth import ADMIN, LoginThrottle, Session, Sessions
from smtpgw.console.traffic import Traffic
from smtpgw.console.updates import Updates
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.spool.queue import Committer, Envelope, Queue
from smtpgw.stats import Stats

log = logging.getLogger("smtpgw.console")

COOKIE = "smtpgw_session"
MAX_BODY = 16 * 1024  # bytes of a form
MAX_FIELD = 256  # characters of one form or query value
MAX_CONFIG_FORM = 1024 * 1024  # bytes of a configuration sent to be checked
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request
# Requests answered at once: the others wait their turn. Each answer is Python work that takes the
# interpreter lock from the event loop; one at a time keeps the loop's share at half or more.
ANSWERING = threading.BoundedSemaphore(1)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make a browser send "Origin: null"
    "Cache-Control": "no-store",
}


class Gatekeeper(Protocol):
    """What the console reads and asks of the running gateway (always on its loop, `Console.on_loop`):
    its configuration, loop, spool, counters and traffic, and the operations of the control
    directory (the same ones: ``.c_*`` commands, queue operations, a release, a reload)."""

    cfg: Config
    config_path: str
    loop: EventLoop
    queue: Queue
    stats: Stats
    committer: Committer
    traffic: Traffic
    resolver: Resolver
    stopping: bool

    def switches(self) -> dict[str, bool]:
        """``receiving``, ``sending``, ``scanning``: on or off."""

    def command(self, name: str) -> None:
        """Carry out the control command ``name`` (``.c_recv_off`` ...)."""

    def queue_operation(self, op: str, qid: str | None) -> tuple[int, str]:
        """A ``queue`` operation (send, remove ...), as the control directory answers it."""

    def release(self, path: str, sender: str, recipients: list[str], check: bool) -> str:
        """A stored message file into the queue; its new queue ID."""

    def reload(self) -> None:
        """As SIGHUP."""


class Site(Protocol):
    """What a request and its route use of the console (``console/server.Console``): accounts and
    sessions, the audit log line, the gateway's state read on its loop, the stores by name, and
    ``host`` for the operations the control directory also carries out."""

    sessions: Sessions
    throttle: LoginThrottle
    updates: Updates
    host: Gatekeeper
    secure: bool

    def audit(self, session: Session | None, ip: str, action: str, item: str = "-", result: str = "done") -> None: ...

    def account(self, user: str) -> tuple[str, str] | None: ...

    def on_loop(self, job: Callable[[], Any]) -> Any: ...

    def snapshot(self) -> dict[str, Any]: ...

    def charts(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]: ...

    def queue_depth(self) -> dict[str, int]: ...

    def queue_entries(self) -> list[tuple[str, Envelope]]: ...

    def stores(self) -> dict[str, str]: ...

    def spam_database(self) -> dict[str, str]: ...

    def clamd_health(self) -> list[tuple[str, bool, str]]: ...

    def learn(self, message_path: str, is_spam: bool) -> int: ...

    def log_tail(self) -> list[str]: ...

    def metrics_allowed(self, ip: str) -> bool: ...


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
    def console(self) -> Site:
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
        """Answer into memory, then send: a client slow to read never holds `ANSWERING`."""
        client, self.wfile = self.wfile, io.BytesIO()
        try:
            self._answer(method)
        finally:
            answer, self.wfile = self.wfile.getvalue(), client
            client.write(answer)

    def _answer(self, method: str) -> None:
        try:
            url = urllib.parse.urlsplit(self.path)
            route = self.server.routes.get((method, url.path))
            if route is None:
                raise Refused(404 if method == "GET" else 405, "no such page")
            form = fields(url.query) if method == "GET" else self.form()
            with ANSWERING:
                route(self, form)
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
