"""iChecker (kmg-spec §3.12 ``UseIChecker``): skip rescanning objects already found clean.

Owns: a cache of SHA-256 checksums of objects clamd found clean, tagged with the
engine and database version that said so, kept in memory and, when
``ICheckerDBFilename`` is set, in an SQLite file shared by the scanner workers;
both hold at most ``ICheckerCacheSize`` entries (the oldest go first), and the
file drops the entries of older databases.

Must never: answer "clean" for an object scanned with other databases than the
ones in use now (a database update empties the cache), or remember anything but
a clean verdict.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from typing import Any

from smtpgw.scan.clamd import ClamdPool, Verdict

log = logging.getLogger("smtpgw.scan.ichecker")

DEFAULT_SIZE = 100_000  # ICheckerCacheSize
VERSION_CHECK_INTERVAL = 60.0  # seconds between asking clamd which databases it runs
PRUNE_EVERY = 1000  # entries written to the file between two trims of it to its size


class IChecker:
    """A ClamdPool in front of which identical clean objects are answered from the cache."""

    def __init__(self, pool: ClamdPool, path: str | None = None, size: int = DEFAULT_SIZE) -> None:
        self.pool = pool
        self.size = max(1, size)
        self.memory: OrderedDict[bytes, str] = OrderedDict()
        self.db: sqlite3.Connection | None = None
        if path:
            self.db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
            self.db.execute("CREATE TABLE IF NOT EXISTS clean (digest BLOB PRIMARY KEY, generation TEXT, seen REAL)")
            self.db.execute("CREATE INDEX IF NOT EXISTS clean_seen ON clean (seen)")
        self._generation = ""
        self._checked = 0.0
        self._written = 0
        self.hits = 0

    def generation(self) -> str:
        """The engine and databases in use (asked again once a minute)."""
        now = time.monotonic()
        if now - self._checked > VERSION_CHECK_INTERVAL or not self._generation:
            self._checked = now
            current = str(self.pool.engine())
            if current != self._generation:
                self.memory.clear()
                self._generation = current
                self._prune()
        return self._generation

    def scan(self, data: bytes) -> Verdict:
        digest = hashlib.sha256(data).digest()
        generation = self.generation()
        if self._known_clean(digest, generation):
            self.hits += 1
            return Verdict("clean", detail="iChecker: identical to an object found clean", server="ichecker")
        verdict = self.pool.scan(data)
        if verdict.status == "clean":
            self._remember(digest, generation)
        return verdict

    def _known_clean(self, digest: bytes, generation: str) -> bool:
        if self.memory.get(digest) == generation:
            self.memory.move_to_end(digest)
            return True
        if self.db is None:
            return False
        try:
            row = self.db.execute("SELECT generation FROM clean WHERE digest = ?", (digest,)).fetchone()
        except sqlite3.Error as exc:
            log.warning("iChecker database unreadable: %s", exc)
            return False
        return row is not None and row[0] == generation

    def _remember(self, digest: bytes, generation: str) -> None:
        self.memory[digest] = generation
        if len(self.memory) > self.size:
            self.memory.popitem(last=False)
        if self.db is not None:
            try:
                self.db.execute("INSERT OR REPLACE INTO clean VALUES (?, ?, ?)", (digest, generation, time.time()))
            except sqlite3.Error as exc:
                log.warning("iChecker database not written: %s", exc)
                return
            self._written += 1
            if self._written % PRUNE_EVERY == 0:
                self._prune()

    def _prune(self) -> None:
        """The file keeps the current databases' entries only, the ``size`` most recent of them."""
        if self.db is None:
            return
        try:
            self.db.execute("DELETE FROM clean WHERE generation != ?", (self._generation,))
            self.db.execute("DELETE FROM clean WHERE digest IN (SELECT digest FROM clean ORDER BY seen DESC"
                            " LIMIT -1 OFFSET ?)", (self.size,))
        except sqlite3.Error as exc:
            log.warning("iChecker database not trimmed: %s", exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)  # engine(), check_health(), reload() of the pool
