"""Web console accounts, sessions and login throttling.

Owns: the password hash format of ``AdminPasswordHash`` and ``ReadOnlyUsers``
(``pbkdf2_sha256$ITERATIONS$SALT$HASH``, PBKDF2-HMAC-SHA256 from hashlib,
base64 salt and hash), checking a password against it in constant time, the
in-memory login sessions (random token, role, CSRF token, idle expiry), and
the login rate limit with its lock-out per client address and per user name.

Must never: keep or log a password in clear text, compare secrets with ``==``,
accept a session token or CSRF token it did not issue, or let a locked-out
client try again before its lock-out ends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

SCHEME = "pbkdf2_sha256"
ITERATIONS = 310_000  # OWASP 2023 figure for PBKDF2-HMAC-SHA256
MIN_ITERATIONS = 100_000
MAX_ITERATIONS = 10_000_000
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_HASH = re.compile(r"pbkdf2_sha256\$(\d{1,8})\$([A-Za-z0-9+/=]{8,88})\$([A-Za-z0-9+/=]{44})")

ADMIN, READ_ONLY = "admin", "read-only"
SESSION_IDLE = 1800.0  # seconds a session lives without a request
MAX_SESSIONS = 256
FAILURES_BEFORE_LOCK = 5  # wrong passwords in FAILURE_WINDOW before a lock-out
FAILURE_WINDOW = 300.0
LOCK_OUT = 900.0  # seconds
MAX_TRACKED = 4096  # addresses and names whose failures are remembered


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The ``pbkdf2_sha256$...`` value to paste into the configuration."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def hash_problem(value: str) -> str | None:
    """Why ``value`` is not a usable password hash, or None."""
    match = _HASH.fullmatch(value)
    if not match:
        return f"not a {SCHEME}$ITERATIONS$SALT$HASH value (make one with: smtpgw.py console passwd)"
    if not MIN_ITERATIONS <= int(match.group(1)) <= MAX_ITERATIONS:
        return f"iterations must be {MIN_ITERATIONS}-{MAX_ITERATIONS}"
    return None


def verify_password(password: str, stored: str) -> bool:
    match = _HASH.fullmatch(stored)
    if not match:
        return False
    iterations, salt, expected = int(match.group(1)), base64.b64decode(match.group(2)), base64.b64decode(match.group(3))
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(digest, expected)


_DECOY: list[str] = []


def verify_unknown(password: str) -> bool:
    """As long as `verify_password` takes, for a user name that does not exist (its answer
    time must not tell which names do); always False."""
    if not _DECOY:
        _DECOY.append(hash_password(secrets.token_hex(16)))
    verify_password(password, _DECOY[0])
    return False


def parse_user_entry(text: str) -> tuple[str, str]:
    """``NAME:HASH`` of ``ReadOnlyUsers``; ValueError says what is wrong."""
    name, colon, value = text.partition(":")
    if not colon or not USER_NAME.fullmatch(name):
        raise ValueError(f"'{text[:40]}' is not NAME:HASH (a user name of letters, digits, _ . @ -)")
    problem = hash_problem(value)
    if problem:
        raise ValueError(f"{name}: {problem}")
    return name, value


@dataclass
class Session:
    user: str
    role: str
    csrf: str
    last_seen: float


class Sessions:
    """Login sessions by their cookie token; thread-safe (the console's request threads)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, user: str, role: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, role, secrets.token_urlsafe(32), time.monotonic())
        with self._lock:
            self._expire()
            if len(self._sessions) >= MAX_SESSIONS:  # the oldest gives way
                del self._sessions[min(self._sessions, key=lambda t: self._sessions[t].last_seen)]
            self._sessions[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            self._expire()
            session = self._sessions.get(token)
            if session is not None:
                session.last_seen = time.monotonic()
            return session

    def close(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)

    def _expire(self) -> None:
        limit = time.monotonic() - SESSION_IDLE
        for token in [t for t, s in self._sessions.items() if s.last_seen < limit]:
            del self._sessions[token]


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf.encode(), (token or "").encode())


@dataclass
class _Failures:
    times: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class LoginThrottle:
    """Counts wrong logins per client address and per user name; locks both out after
    ``FAILURES_BEFORE_LOCK`` in ``FAILURE_WINDOW`` for ``LOCK_OUT`` seconds."""

    def __init__(self, failures: int = FAILURES_BEFORE_LOCK, window: float = FAILURE_WINDOW,
                 lock_out: float = LOCK_OUT) -> None:
        self.failures, self.window, self.lock_out = failures, window, lock_out
        self._seen: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def locked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(self._seen.get(key, _Failures()).locked_until > now for key in keys)

    def failed(self, *keys: str) -> bool:
        """Record a wrong login; True when it locked one of ``keys`` out."""
        now = time.monotonic()
        locked = False
        with self._lock:
            if len(self._seen) >= MAX_TRACKED:
                self._seen = {k: v for k, v in self._seen.items() if v.locked_until > now}
            for key in keys:
                entry = self._seen.setdefault(key, _Failures())
                entry.times = [t for t in entry.times if t > now - self.window] + [now]
                if len(entry.times) >= self.failures:
                    entry.locked_until, entry.times = now + self.lock_out, []
                    locked = True
        return locked

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._seen.pop(key, None)
