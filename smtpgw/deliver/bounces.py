"""Delivery status notifications the Sender queues (RFC 3464) about the recipients it reports.

Owns: reading the start of the original message, building the report with ``reports/dsn.py``
(the gateway's ``dsn.tmpl``, the original's lifetime as Retry-Until), and queueing it in QUE as a
new message from the null sender to the envelope sender (log line ``DSN``). The Sender schedules
the record it returns, as any other in QUE.

Must never: queue a report about a report (``dsn.build_dsn`` answers None for a null sender), or
raise on a message it cannot read or report on: the error is logged and no report is queued.
"""

from __future__ import annotations

import logging
import time

from smtpgw.config import Config
from smtpgw.log import event
from smtpgw.reports.templates import Template
from smtpgw.spool.queue import QUE, Envelope, Queue, Recipient, new_id

log = logging.getLogger("smtpgw")


def queue_dsn(queue: Queue, cfg: Config, template: Template, env: Envelope, recipients: list[Recipient],
              kind: str) -> Envelope | None:
    """Queue a DSN of ``kind`` (failure, delay, success) about ``recipients`` of ``env`` to its
    envelope sender; the new record (in QUE), or None when none is due or it could not be made."""
    # Imported here, as the first report is composed: reports/dsn brings reports/notify and the
    # email package (1-2 MiB of Python objects) into the delivery process, which most often never
    # composes one.
    from smtpgw.reports import dsn

    lifetime = cfg.timeouts.MaximalQueueLifetime * 86400
    try:
        original = queue.read_message(env, dsn.DEFAULT_FULL_LIMIT + 1)
        report = dsn.build_dsn(
            env.as_dict(), [r.__dict__ for r in recipients], kind, original, cfg.network.Hostname,
            cfg.network.Postmaster, template, time.time(), retry_until=env.received_at + lifetime,
        )
    except (OSError, ValueError) as exc:
        log.error("%s: cannot build a %s DSN: %s", env.id, kind, exc)
        return None
    if report is None:
        return None
    bounce = Envelope(
        id=new_id(), sender="", recipients=[Recipient(addr=env.sender)], client_ip="", helo=cfg.network.Hostname,
        received_at=time.time(), size=len(report), body=dsn.dsn_body_type(report), srcid=env.id,
    )
    queue.add_message(bounce, QUE, data=report)
    event(bounce.id, "DSN, kind=%s, srcid=%s, to=<%s>, nrcpt=%d", kind, env.id, env.sender, len(recipients))
    return bounce
