"""Term rules: weighted patterns over headers, bodies, URLs and formal signs.

Owns: the rule language kept in the spam database and in ``default.rules``,
compiling it (with line numbers in errors), and evaluating the rules active at
a ``SpamDetection`` level against one message.

A rule line is ``NAME WEIGHT LEVELS KIND ARGUMENT``:

* NAME — letters, digits and ``_``; shown in the verdict's reasons.
* WEIGHT — log-odds added to the Bayes score when the rule hits (negative for
  ham signs), or ``spam`` for a rule that alone makes the message Spam.
* LEVELS — ``all`` or a comma list of ``soft``, ``standard``, ``hard``.
* KIND and ARGUMENT —
  ``check NAME`` a built-in sign (``signs.CHECKS``);
  ``header:FIELD REGEX`` a regex over the decoded values of FIELD;
  ``body REGEX`` over the decoded text of the body (HTML rendered to text),
  lower-cased and with every run of white space made one space, so patterns
  are written in lower case with plain spaces (and run without re.IGNORECASE,
  which keeps them fast);
  ``html REGEX`` over the names of HTML signs and tags found;
  ``uri REGEX`` over each URL;
  ``words W1 W2 ...`` all the words present (word combinations).

Must never: run a regex over more than ``MAX_RULE_TEXT`` characters, accept a
rule it cannot compile, or keep a GTUBE literal (that test is the built-in
check ``gtube``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtpgw.spam import signs
from smtpgw.spam.mailview import MailView
from smtpgw.spam.needles import Needled

LEVELS = ("soft", "standard", "hard")
MAX_RULE_TEXT = 64 * 1024
FORCE_SPAM = "spam"
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_FIELD = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 §3.6.8 field name
# Header formal signs report as method "headers"; the other checks as "rules".
HEADER_CHECKS = frozenset({
    "missing_from", "missing_to", "missing_date", "missing_message_id", "empty_x_mailer", "random_from",
    "random_to", "numeric_from", "subject_random_tail", "subject_all_caps", "asian_charset", "from_is_to",
    "to_undisclosed", "many_recipients", "high_priority", "forged_mailer_id", "obfuscated_subject",
    "malformed_date",
})


class RuleError(ValueError):
    """A rule line that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Rule:
    name: str
    weight: float  # log-odds; ignored when ``force`` is set
    force: bool
    levels: frozenset[str]
    kind: str  # check, header, body, html, uri, words
    target: str  # check name, header field name (lower case), or ""
    argument: str  # the pattern or word list as written
    pattern: re.Pattern[str] | None
    words: tuple[str, ...]

    @property
    def method(self) -> str:
        """The X-SpamTest-Method family a hit of this rule belongs to."""
        if self.kind == "header" or (self.kind == "check" and self.target in HEADER_CHECKS):
            return "headers"
        return "rules"

    def line(self) -> str:
        """The rule in the database's tab-separated form."""
        weight = FORCE_SPAM if self.force else _format_weight(self.weight)
        levels = "all" if self.levels == frozenset(LEVELS) else ",".join(l for l in LEVELS if l in self.levels)
        kind = f"header:{self.target}" if self.kind == "header" else self.kind
        return "\t".join((self.name, weight, levels, kind, self.argument))


@dataclass(frozen=True)
class RuleHit:
    name: str
    weight: float
    force: bool
    method: str


def _format_weight(weight: float) -> str:
    return f"{weight:.2f}"


def parse_rule(line: str, where: str = "rule") -> Rule:
    """Compile one rule line (fields separated by tabs or runs of spaces)."""
    fields = line.strip().split(None, 4)
    if len(fields) < 5:
        raise RuleError(f"{where}: expected NAME WEIGHT LEVELS KIND ARGUMENT")
    name, weight_text, levels_text, kind, argument = fields
    if "\t" in argument:
        raise RuleError(f"{where}: a TAB inside the argument (write \\t in a regex)")
    if not _NAME.match(name):
        raise RuleError(f"{where}: bad rule name {name!r}")
    force = weight_text.lower() == FORCE_SPAM
    try:
        weight = 0.0 if force else float(weight_text)
    except ValueError:
        raise RuleError(f"{where}: bad weight {weight_text!r}") from None
    if not -20.0 <= weight <= 20.0:
        raise RuleError(f"{where}: weight {weight} outside -20..20")
    levels = frozenset(LEVELS) if levels_text == "all" else frozenset(levels_text.split(","))
    if not levels or not levels <= set(LEVELS):
        raise RuleError(f"{where}: levels must be 'all' or a list of {', '.join(LEVELS)}")
    target = ""
    if kind.startswith("header:"):
        kind, target = "header", kind[7:].lower()
        if not _FIELD.match(target):
            raise RuleError(f"{where}: bad header field name {target!r}")
    pattern = None
    words: tuple[str, ...] = ()
    if kind == "check":
        if argument not in signs.CHECKS:
            raise RuleError(f"{where}: unknown check {argument!r}")
        target = argument
    elif kind in ("header", "body", "html", "uri"):
        try:
            pattern = re.compile(argument)
        except re.error as exc:
            raise RuleError(f"{where}: bad regular expression: {exc}") from None
    elif kind == "words":
        words = tuple(argument.lower().split())
        if not words:
            raise RuleError(f"{where}: no words")
    else:
        raise RuleError(f"{where}: unknown rule kind {kind!r}")
    return Rule(name, round(weight, 2), force, levels, kind, target, argument, pattern, words)


def parse_rules(text: str, source: str = "rules") -> list[Rule]:
    """Compile a rules file; ``#`` starts a comment line; rule names must be unique."""
    rules: list[Rule] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rule = parse_rule(line, f"{source}:{number}")
        if rule.name in seen:
            raise RuleError(f"{source}:{number}: duplicate rule name {rule.name}")
        seen.add(rule.name)
        rules.append(rule)
    return rules


class RuleSet:
    """The compiled rules, evaluated per message at one level."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        # each pattern with the words a text must hold for it to match (``needles``)
        self._searches = [Needled(rule.pattern) if rule.pattern is not None else None for rule in rules]

    def evaluate(self, view: MailView, tokens: set[str], level: str) -> list[RuleHit]:
        hits: list[RuleHit] = []
        body = " ".join(view.body[:MAX_RULE_TEXT].lower().split())
        html_names = _html_names(view)
        for rule, search in zip(self.rules, self._searches):
            if level not in rule.levels:
                continue
            if _matches(rule, search, view, tokens, body, html_names):
                name = rule.name + signs.detail(rule.target, view) if rule.kind == "check" else rule.name
                hits.append(RuleHit(name, rule.weight, rule.force, rule.method))
        return hits


def _html_names(view: MailView) -> str:
    if view.html is None:
        return ""
    return " ".join(sorted(view.html.signs) + [f"tag:{t}" for t in sorted(view.html.tags)][:200])


def _matches(rule: Rule, search: Needled | None, view: MailView, tokens: set[str], body: str,
             html_names: str) -> bool:
    kind = rule.kind
    if kind == "check":
        return signs.run_check(rule.target, view)
    if kind == "words":
        return all(word in tokens for word in rule.words)
    assert search is not None
    if kind == "body":
        return search.search(body) is not None
    if kind == "header":
        return any(search.search(value[:MAX_RULE_TEXT]) for value in view.header_all(rule.target))
    if kind == "html":
        return search.search(html_names) is not None
    return any(search.search(url) for url in view.urls[:100])
