"""Finding the real components tests need (clamd, swaks, postfix, dnsmasq, ...).

A test that needs a component calls ``require("clamd")``: when it is absent the
test is skipped with a clear reason, except under ``SMTPGW_STRICT=1`` (set by
``.ci/run``), where a missing component is a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

STRICT = os.environ.get("SMTPGW_STRICT") == "1"

# Debian puts daemons in /usr/sbin, which is not always on a non-root PATH.
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def which(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    for folder in _EXTRA_DIRS:
        candidate = os.path.join(folder, program)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require(program: str, package: str | None = None) -> str:
    """Return the path of ``program`` or skip (fail under SMTPGW_STRICT=1)."""
    path = which(program)
    if path:
        return path
    reason = f"{program} not installed (Debian package {package or program})"
    if STRICT:
        pytest.fail(f"SMTPGW_STRICT=1: {reason}")
    pytest.skip(reason)
    raise AssertionError("unreachable")  # pytest.skip raises


def missing(reason: str) -> None:
    """Skip (or fail under strict mode) for a missing prerequisite other than a program."""
    if STRICT:
        pytest.fail(f"SMTPGW_STRICT=1: {reason}")
    pytest.skip(reason)
