"""What a scanner worker's job returns and the main process applies, and the templates a group's
scan uses: the part of the scanner that the main process needs (``scan/scanner.py``, ``app/gateway.py``)
without the checks that only workers run (``scan/job.py``, ``scan/antivirus.py``: MIME and archive
parsing, the disclaimer, autolearning; about 2 MiB RSS the main process no longer imports).

Owns: ``CopyResult`` and ``ScanResult`` (one JSON line per job, ``as_dict`` / ``from_dict``),
``not_scanned`` (a group with Check=false), where a group's templates are (``templates_path``) and
loading its placeholder template (``load_placeholder``, checked at start).

Must never: import what only a worker runs (mail/mime, mail/archives, scan/antivirus, scan/job).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from smtpgw import PACKAGE_DIR
from smtpgw.config import Config
from smtpgw.log import Event
from smtpgw.reports.templates import Template, load_template

TEMPLATES = os.path.join(PACKAGE_DIR, "templates")


@dataclass
class CopyResult:
    """What happens to the recipients of one group (one per-group copy)."""

    group: str
    recipients: list[str]
    blocked: bool = False
    rewritten: str | None = None  # a new message file written by the worker, or None: unchanged
    # or, when only the header changed: the new header block (Latin-1 text) and where the body it
    # goes with starts in msg/ID (``header_change``; the record carries it, ``Queue.open_message``)
    head: str | None = None
    body_offset: int = 0
    events: list[Event] = field(default_factory=list)  # log events (AV-SCANNED, AS-SCANNED, BLOCKED...)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """The copy's message is not the one scanned."""
        return self.rewritten is not None or self.head is not None


@dataclass
class ScanResult:
    copies: list[CopyResult] = field(default_factory=list)
    deferred: str | None = None  # a check could not run: retry later, never pass

    def as_dict(self) -> dict[str, Any]:
        """The result as its JSON line carries it (``from_dict`` reads it back): the copies' fields
        as they are, with no deep copy (``dataclasses.asdict`` copied every list and dict of each
        copy, 7% of a worker's CPU for a message the spam filter passes)."""
        return {"copies": [dict(vars(copy)) for copy in self.copies], "deferred": self.deferred}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScanResult":
        return cls(copies=[CopyResult(**c) for c in data.get("copies", [])], deferred=data.get("deferred"))


def not_scanned(group: str, rcpts: list[str]) -> CopyResult:
    """kmg-spec §3.13: a group with Check=false passes its mail through unchanged."""
    return CopyResult(group=group, recipients=rcpts, notes={"status": "not scanned"},
                      events=[('AV-SCANNED, group=%s, status="not scanned", names="", nrcpt=%d', [group, len(rcpts)])])


def templates_path(cfg: Config, group: Any) -> str:
    """The group's TemplatesPath (notify, placeholder, disclaimer), else [path] TemplatesPath."""
    return str(group.TemplatesPath or cfg.base.TemplatesPath)


def load_placeholder(templates_path: str | None = None) -> Template:
    """Load and check placeholder.tmpl (`smtpgw.reports.templates`: the ``%MACRO%``, ``%%``
    and ``%#`` comment syntax of notify.tmpl, without blocks or header lines).

    Raises TemplateError for a missing, oversized or non-UTF-8 file, a stray ``%`` or a
    macro the placeholder kind does not know.
    """
    return load_template(os.path.join(templates_path or TEMPLATES, "placeholder.tmpl"), "placeholder")
