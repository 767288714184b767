"""The web console's updates: the last keepup2date report and a run started from the browser.

Owns: starting ``keepup2date`` (the same program as ``smtpgw.py keepup2date``,
``python3 -m smtpgw.update.updater``) as a child process with the gateway's
configuration, at most one at a time, waiting for it in a thread of its own,
and keeping its exit code and the tail of its output for the page.

Must never: start a second run while one is going (keepup2date's own PID file
would refuse it too), wait for the child on the event loop, or keep more than
`OUTPUT_BYTES` of its output.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass

import smtpgw
from smtpgw.update import CONFIG_INVALID, CRITICAL, NO_UPDATE, POST_UPDATE_FAILED, UPDATED

OUTPUT_BYTES = 16 * 1024
RUN_TIMEOUT = 3600.0  # seconds: a run still going after this is killed
REPORT_BYTES = 32 * 1024
MEANINGS = {NO_UPDATE: "no update needed", UPDATED: "updated", CRITICAL: "critical error, nothing changed",
            POST_UPDATE_FAILED: "updated, the post-update action failed", CONFIG_INVALID: "configuration invalid"}


@dataclass
class Run:
    started: float
    finished: float = 0.0
    code: int | None = None
    output: str = ""

    @property
    def outcome(self) -> str:
        if self.code is None:
            return "running"
        return f"exit code {self.code} ({MEANINGS.get(self.code, 'failed')})"


class Updates:
    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.last: Run | None = None
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Start a run; False when one is going."""
        with self._lock:
            if self.last is not None and self.last.code is None:
                return False
            self.last = run = Run(time.time())
        threading.Thread(target=self._run, args=(run,), name="keepup2date", daemon=True).start()
        return True

    def _run(self, run: Run) -> None:
        root = os.path.dirname(smtpgw.PACKAGE_DIR)
        try:
            done = subprocess.run(smtpgw.child_command("smtpgw.update.updater", "-c", self.config_path), cwd=root,
                                  env=smtpgw.child_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=RUN_TIMEOUT)
            code, output = done.returncode, done.stdout
        except (OSError, subprocess.SubprocessError) as exc:
            code, output = CRITICAL, str(exc).encode()
        run.output = output[-OUTPUT_BYTES:].decode("utf-8", "replace")
        run.finished, run.code = time.time(), code


def report_tail(path: str | None) -> str:
    """The end of the keepup2date report file, or "" when there is none."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - REPORT_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
