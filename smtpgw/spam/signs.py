"""The named signs the spam rules and the tokenizer read: the formal signs and today's signs, one registry.

Owns: ``CHECKS``, ``detail`` (what a sign rested on, quoted in its rule's reason), every sign by the name a rule gives it (``check NAME`` in the database's
rules): those of ``formalsigns`` first, then those of ``modernsigns`` (which reads the helpers of
``formalsigns``), and ``run_check``, each sign computed once per message.

Must never: let a sign that raises count as a hit (it is not one), or compute a sign twice for
one message.
"""

from __future__ import annotations

from collections.abc import Callable

from smtpgw.mail.dkim import Result
from smtpgw.spam import formalsigns, modernsigns
from smtpgw.spam.mailview import MailView

CHECKS: dict[str, Callable[[MailView], bool]] = {**formalsigns.CHECKS, **modernsigns.CHECKS}


def detail(name: str, view: MailView) -> str:
    """What check ``name`` rested on, for the reason of its rule: the DKIM result of the marks of a
    signed sender (" (dkim=pass d=example.com)"), else ""."""
    used = view.memo.get("dkim") if name in modernsigns.DKIM_CHECKS else None
    return f" ({used.describe()})" if isinstance(used, Result) else ""


def run_check(name: str, view: MailView) -> bool:
    """The result of check ``name`` on ``view``, computed once per message; False when it fails."""
    return formalsigns.once(view, CHECKS[name])
