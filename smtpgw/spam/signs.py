"""The named signs the spam rules and the tokenizer read: the formal signs and today's signs, one registry.

Owns: ``CHECKS``, every sign by the name a rule gives it (``check NAME`` in the database's
rules): those of ``formalsigns`` first, then those of ``modernsigns`` (which reads the helpers of
``formalsigns``), and ``run_check``, each sign computed once per message.

Must never: let a sign that raises count as a hit (it is not one), or compute a sign twice for
one message.
"""

from __future__ import annotations

from collections.abc import Callable

from smtpgw.spam import formalsigns, modernsigns
from smtpgw.spam.mailview import MailView

CHECKS: dict[str, Callable[[MailView], bool]] = {**formalsigns.CHECKS, **modernsigns.CHECKS}


def run_check(name: str, view: MailView) -> bool:
    """The result of check ``name`` on ``view``, computed once per message; False when it fails."""
    return formalsigns.once(view, CHECKS[name])
