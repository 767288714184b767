"""Robinson/Fisher chi-square Bayesian classifier (the SpamBayes / bogofilter family).

Owns: per-token spam probabilities from ham/spam message counts (Gary
Robinson's f(w) with a prior), the choice of the most telling tokens, and
Fisher's chi-square combination into one score in [0, 1]:
0 = certainly ham (or no clue at all), 0.5 = strong evidence both ways or
none either way, 1 = certainly spam; and the clue vote, which says which side
the strong evidence of such a 0.5 leans to.

Must never: divide by zero on an empty database, underflow on long token
lists (sums of logarithms, not products), or let one message's token count
exceed ``MAX_CLUES`` in the combination.

References: G. Robinson, "A Statistical Approach to the Spam Problem", Linux
Journal 107 (2003); SpamBayes ``classifier.py`` (chi2Q, clue selection).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Parameters chosen with bench/spam_accuracy.py (5-fold, holdout and era protocols,
# with and without --strip-trace): a weak prior and only strongly one-sided tokens,
# all of them (bogofilter's choice) rather than SpamBayes' 150 best, ages better on
# newer mail. Beside the learned term weights (``terms``) s = 0.05 ranks best: the
# weights temper what a rare token's near-certain f(w) would overstate (5-fold
# (1-AUC)% 0.052 at s = 0.1 and 0.05, era 0.088 -> 0.079).
# Rare tokens' near-certain f(w) on an unseen source, tried with database 2026.12.08-1's input and the
# shipped factors, each source judged by a database of the others ("standard", ham→Spam / ham→Probable
# / caught %, (1-AUC)%, sa-2002 | sa-2003-05 | trec-2007 | modern-mixed; shipped 0.00/4.08/90.6 2.39
# | 0.00/1.15/90.1 0.91 | 0.05/5.78/93.4 1.55 | 0.00/7.53/93.3 2.33): s = 0.45 (SpamBayes' default)
# 0.00/2.67/87.6 2.91 | 0.00/1.05/88.0 0.97 | 0.12/7.20/94.5 1.56 | 1.08/5.38/92.4 2.41, lists
# 0.10/0.75; no clue from a token seen in fewer than 4 messages (sender identities kept) 0.00/3.71/88.2
# 2.84 | 0.00/1.15/88.8 0.93 | 0.07/7.40/95.1 1.40 | 1.08/5.38/94.3 2.25, lists 0.10/0.80. Both move
# mail from one set's ham to another's Spam: s stays.
UNKNOWN_WORD_STRENGTH = 0.05  # Robinson's s: weight of the prior
UNKNOWN_WORD_PROB = 0.5  # Robinson's x: the prior itself
MIN_DEVIATION = 0.35  # tokens with |f(w) - 0.5| below this are not clues
STRONG_DEVIATION = 0.45  # clues with f(w) <= 0.05 or >= 0.95 vote (``votes``)
MAX_CLUES = 1000  # most telling tokens used per message (a bound on work, rarely reached)
_PROB_FLOOR = 1e-6  # keeps log(0) away for a token seen only in one class
MAX_LOG_TERMS = 1 << 16  # clue probabilities whose logarithms are kept (``_log_terms``)
_LOG_TERMS: dict[float, tuple[float, float]] = {}


def chi2q(x2: float, degrees: int) -> float:
    """P(chi-square >= x2) with an even number of degrees of freedom."""
    m = x2 / 2.0
    term = math.exp(-m)
    total = term
    for i in range(1, degrees // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def token_probability(ham: int, spam: int, nham: int, nspam: int) -> float:
    """Robinson's f(w): the spam probability of a token, pulled toward 0.5 when rare."""
    ham_ratio = ham / nham if nham else 0.0
    spam_ratio = spam / nspam if nspam else 0.0
    if ham_ratio + spam_ratio == 0.0:
        return UNKNOWN_WORD_PROB
    p = spam_ratio / (ham_ratio + spam_ratio)
    n = ham + spam
    return (UNKNOWN_WORD_STRENGTH * UNKNOWN_WORD_PROB + n * p) / (UNKNOWN_WORD_STRENGTH + n)


def clue_probability(ham: int, spam: int, nham: int, nspam: int) -> float:
    """f(w) of a token that is a clue (at least ``MIN_DEVIATION`` from 0.5), else 0.0 (never an f(w))."""
    p = token_probability(ham, spam, nham, nspam)
    return p if abs(p - 0.5) >= MIN_DEVIATION else 0.0


def _log_terms(p: float) -> tuple[float, float]:
    """(log(1 - p), log(p)) of a clue probability held within ``_PROB_FLOOR`` of 0 and 1; kept
    for the next message (the database's few thousand distinct probabilities recur)."""
    held = min(max(p, _PROB_FLOOR), 1.0 - _PROB_FLOOR)
    terms = (math.log(1.0 - held), math.log(held))
    if len(_LOG_TERMS) < MAX_LOG_TERMS:
        _LOG_TERMS[p] = terms
    return terms


def combine(probabilities: Iterable[float]) -> float:
    """Fisher's chi-square combination of clue probabilities: SpamBayes' indicator.

    S is the evidence that the clues are spam, H that they are ham, and the
    score is I = (S - H + 1) / 2. It is 0.5 both when there is strong evidence
    both ways and when there is little either way, which bench/spam_accuracy.py
    shows ranks newer mail best: weighting I by S (a score of 0 for "no spam
    evidence") pushed mixed new spam below ham and doubled the era protocol's
    (1-AUC)% (0.124 -> 0.213). No clue at all gives 0; the filter then uses its
    own neutral starting point.
    """
    log_spam = log_ham = 0.0
    n = 0
    known = _LOG_TERMS
    for p in probabilities:
        terms = known.get(p)
        if terms is None:
            terms = _log_terms(p)
        log_spam += terms[0]
        log_ham += terms[1]
        n += 1
    if not n:
        return 0.0
    spam_evidence = 1.0 - chi2q(-2.0 * log_spam, 2 * n)
    ham_evidence = 1.0 - chi2q(-2.0 * log_ham, 2 * n)
    return (spam_evidence - ham_evidence + 1.0) / 2.0


@dataclass(frozen=True)
class BayesResult:
    score: float
    clues: list[tuple[str, float]]  # the tokens used, most telling first

    @property
    def votes(self) -> float:
        """log((1 + strong spam clues) / (1 + strong ham clues)): the clue vote.

        The chi-square score of a long message with many strong clues on both
        sides saturates at 0.5 (both S and H are 1 to double precision), which
        leaves newsletters, commercial ham and chatty spam unranked by Bayes.
        Counting the strong clues on each side still tells which way such a
        message leans, and the logarithm keeps a long message from outvoting
        everything else. bench/spam_accuracy.py at the shipped settings: 5-fold
        (1-AUC)% 0.051 -> 0.046, holdout 0.019 -> 0.007, era unchanged (0.081).
        """
        spam = ham = 0
        for _, p in self.clues:
            if p >= 0.5 + STRONG_DEVIATION:
                spam += 1
            elif p <= 0.5 - STRONG_DEVIATION:
                ham += 1
        return math.log((1 + spam) / (1 + ham))


class Bayes:
    """Token counts plus the probabilities of the tokens that can be clues.

    The clue table (tokens whose f(w) is at least ``MIN_DEVIATION`` from 0.5) is
    computed once after loading or learning, so scoring a message is one set
    intersection and a sort of the few tokens that matter.
    """

    def __init__(self, counts: dict[str, tuple[int, int]], nham: int, nspam: int) -> None:
        self.counts = counts
        self.nham = nham
        self.nspam = nspam
        self._clues: dict[str, float] | None = None
        self._over: tuple[Bayes, dict[str, float | None]] | None = None

    def probability(self, token: str) -> float | None:
        """f(w) of a known token, None for a token never seen in training."""
        counts = self.counts.get(token)
        if counts is None:
            return None
        return token_probability(counts[0], counts[1], self.nham, self.nspam)

    def clue_table(self) -> dict[str, float]:
        if self._clues is None:
            nham, nspam = self.nham, self.nspam
            table: dict[str, float] = {}
            for token, (ham, spam) in self.counts.items():
                p = clue_probability(ham, spam, nham, nspam)
                if p:
                    table[token] = p
            self._clues = table
        return self._clues

    def score(self, tokens: Iterable[str], site: Bayes | None = None) -> BayesResult:
        """The message's Bayes score; with ``site``, its counts are added to these at lookup time
        (a token the site never learned keeps its probability from this table)."""
        unique = tokens if isinstance(tokens, (set, frozenset)) else set(tokens)
        probabilities = self.clues_of(unique)
        if site is not None and (site.nham or site.nspam):
            probabilities = self._layered(unique, site, probabilities)
        ranked = sorted(((abs(p - 0.5), t) for t, p in probabilities.items()), reverse=True)[:MAX_CLUES]
        clues = [(t, probabilities[t]) for _, t in ranked]
        return BayesResult(combine(p for _, p in clues), clues)

    def clues_of(self, unique: set[str] | frozenset[str]) -> dict[str, float]:
        """The message's tokens that are clues here, with their probabilities."""
        table = self.clue_table()
        return {t: table[t] for t in table.keys() & unique}

    def _layered(self, unique: set[str] | frozenset[str], site: Bayes, own: dict[str, float]) -> dict[str, float]:
        """``own`` (the message's clues here) with the site layer's summed counts where it learned the token."""
        combined = site.over(self)
        probabilities: dict[str, float] = {}
        for token in unique:  # the message's few hundred tokens, not the layers' thousands
            p = combined[token] if token in combined else own.get(token)
            if p is not None:
                probabilities[token] = p
        return probabilities

    def over(self, shipped: Bayes) -> dict[str, float | None]:
        """For this site layer over ``shipped``: each learned token's probability from the summed
        counts, None where it is no clue; computed once per pair of layers (a few MiB at most)."""
        cached = self._over
        if cached is not None and cached[0] is shipped:
            return cached[1]
        nham, nspam = shipped.nham + self.nham, shipped.nspam + self.nspam
        combined: dict[str, float | None] = {}
        base = shipped.counts
        for token, (more_ham, more_spam) in self.counts.items():
            ham, spam = base.get(token, (0, 0))
            combined[token] = clue_probability(ham + more_ham, spam + more_spam, nham, nspam) or None
        self._over = (shipped, combined)
        return combined

    def learn(self, tokens: Iterable[str], is_spam: bool, count: int = 1) -> None:
        """Add (count=1) or remove (count=-1) one message's tokens."""
        for token in set(tokens):
            ham, spam = self.counts.get(token, (0, 0))
            if is_spam:
                spam = max(spam + count, 0)
            else:
                ham = max(ham + count, 0)
            if ham or spam:
                self.counts[token] = (ham, spam)
            else:
                self.counts.pop(token, None)
        if is_spam:
            self.nspam = max(self.nspam + count, 0)
        else:
            self.nham = max(self.nham + count, 0)
        self._clues = None
        self._over = None
