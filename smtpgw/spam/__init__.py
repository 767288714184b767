"""smtpgw's anti-spam engine: lists, formal signs, term rules, Bayes and DNSBL in one verdict.

Owns the public API used by the scanner and the command line:

    from smtpgw.spam import SpamFilter, SpamVerdict, mark, as_log_fields
    spam_filter = SpamFilter(cfg.antispam, cfg.base.BasesPath)   # once per worker process
    verdict = spam_filter.classify(raw, client_ip, sender, recipients, dnsbl_listed)
    raw = mark(raw, verdict, cfg.antispam, group.ActionSpam)      # X-SpamTest-* and Subject tag
    fields, values = as_log_fields(verdict)                       # template and values for smtpgw.log.event
    spam_filter.reload()                                          # after a database update

Modules: ``mailview`` (bounded decoded view of a message), ``htmltext`` (HTML to
text and HTML tricks), ``tokenizer``, ``received`` (trace-field hints),
``formalsigns``, ``modernsigns`` (signs of today's phishing and of legitimate
bulk mail), ``rules``, ``bayes``, ``database`` (file format), ``dbindex`` (the
shipped database as a mapped hash table, shared by every process), ``lists``
(white/black lists), ``verdict``, ``spamfilter``, ``training``, ``autolearn``, ``mailsource``
and ``cli``.

Must never: do network I/O (DNSBL answers come from the receiver) or raise for
any message bytes.
"""

from smtpgw.spam.database import DatabaseError, SpamDatabase
from smtpgw.spam.spamfilter import SpamFilter
from smtpgw.spam.verdict import (
    BLACKLISTED,
    NOT_DETECTED,
    PROBABLE_SPAM,
    SPAM,
    STATUSES,
    TRUSTED,
    SpamVerdict,
    as_log_fields,
    mark,
)

__all__ = [
    "BLACKLISTED",
    "NOT_DETECTED",
    "PROBABLE_SPAM",
    "SPAM",
    "STATUSES",
    "TRUSTED",
    "DatabaseError",
    "SpamDatabase",
    "SpamFilter",
    "SpamVerdict",
    "as_log_fields",
    "mark",
]
