#!/usr/bin/env python3
"""Fit how the spam filter adds up its evidence, on scores of mail the database never saw.

Owns: collecting, for every message of bench/spam_accuracy.py's sets, the
inputs of ``SpamFilter``'s combination (``spamfilter.Evidence``: the Bayes
score and its clue counts, the term weights' log-odds, the rules that hit)
under the leave-one-source-out protocol — each trained source judged by a
database of the other sources, the never-trained sets (lists, phishing) by a
database of every trained source — and fitting on them a logistic regression
(Newton's method, L2 towards the shipped factors) whose coefficients are the
factors of ``spamfilter``: each trained source weighs the same in the fit, and
within it ham and spam weigh the same, so the fitted score is a probability
for an even prior and no one corpus's size decides.

It prints the coefficients, and per set ham→Spam / ham→Probable / caught /
(1-AUC)% of the shipped combination, of the fitted one, and of fits that
leave each source out of the fit too (the figure that says whether the fit
generalises). The Spam threshold is the lowest score that calls at most 0.1%
of the ham of every trained source Spam; lists (ham) and phishing (spam) are
never used by the fit nor by the thresholds.

Must never: fit on a message whose database was trained on it, use the lists
or phishing sets in the fit, or talk to the network.

Usage: nice -n 10 python3 bench/spam_combination.py --packs DIR [--evidence FILE] [--reuse] [--lam 1.0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import spam_accuracy as accuracy  # noqa: E402

from smtpgw.spam import spamfilter, training  # noqa: E402
from smtpgw.spam.bayes import STRONG_DEVIATION  # noqa: E402
from smtpgw.spam.rules import RuleSet  # noqa: E402
from smtpgw.spam.verdict import THRESHOLDS  # noqa: E402

FP_BUDGET = 0.001  # ham→Spam allowed on every trained source
LEVEL = "standard"


# -- collecting the evidence ----------------------------------------------------------------------


def _evidence_job(job: tuple[str, list[tuple[str, str, bool]]]) -> list[dict]:
    folder, items = job
    spam_filter = spamfilter.SpamFilter(SimpleNamespace(SpamDetection="hard"), folder)
    rows = []
    for path, set_name, is_spam in items:
        with open(path, "rb") as src:
            evidence = spam_filter.evidence(src.read(), [], "hard")  # every rule; levels applied when fitting
        bayes = evidence.bayes
        strong_spam = sum(1 for _, p in bayes.clues if p >= 0.5 + STRONG_DEVIATION)
        strong_ham = sum(1 for _, p in bayes.clues if p <= 0.5 - STRONG_DEVIATION)
        rows.append({"set": set_name, "spam": is_spam, "bayes": bayes.score, "clues": len(bayes.clues),
                     "strong_spam": strong_spam, "strong_ham": strong_ham, "terms": evidence.terms,
                     "hits": sorted(rule_name(hit.name) for hit in evidence.hits if not hit.force),
                     "forced": any(hit.force for hit in evidence.hits), "file": path})
    return rows


def rule_name(hit_name: str) -> str:
    """The rule's name of a hit: a sign's hit carries what it rested on after a space
    (``CONSISTENT_SENDER (dkim=pass d=gmail.com)``, ``signs.detail``), which is no rule's name."""
    return hit_name.split(" ", 1)[0]


def collect(run: accuracy.Run, workers: int) -> list[dict]:
    """Evidence of every message, each judged by a database that never saw its source."""
    out: list[dict] = []
    trainable = run.sets_of(lambda s: s.trainable)
    groups = [(source, [m for m in run.messages if accuracy._set(m).trainable and accuracy._set(m).source != source],
               [m for m in run.messages if accuracy._set(m).trainable and accuracy._set(m).source == source])
              for source in dict.fromkeys(s.source for s in trainable)]
    groups.append(("never-trained", [m for m in run.messages if accuracy._set(m).trainable],
                   [m for m in run.messages if not accuracy._set(m).trainable]))
    for source, train, test in groups:
        with tempfile.TemporaryDirectory() as folder:
            run.trained(train, folder)
            items = [(m.file, m.set, m.is_spam) for m in test]
            chunks = [(folder, items[i::workers]) for i in range(workers)]
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for rows in pool.map(_evidence_job, chunks):
                    out.extend(rows)
        print(f"(evidence of {len(test)} messages of {source})", flush=True)
    return out


# -- features and the fit -------------------------------------------------------------------------


def clipped_logit(p: float, clip: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return min(max(math.log(p / (1 - p)), -clip), clip)


def features(row: dict, rule_weights: dict[str, float], rule_names: list[str] | None) -> dict[str, float]:
    """The fitted inputs of one message: the three content parts, the rules (summed by their
    written weights, or one input per rule with ``rule_names``)."""
    bayes = row["bayes"] if row["clues"] else spamfilter.NO_EVIDENCE
    out = {"bias": 1.0, "bayes": clipped_logit(bayes, spamfilter.BAYES_CLIP),
           "votes": math.log((1 + row["strong_spam"]) / (1 + row["strong_ham"])), "terms": row["terms"]}
    hits = [h for h in row["hits"] if h in rule_weights]
    if rule_names is None:
        out["rules"] = sum(rule_weights[h] for h in hits)
    else:
        for h in hits:
            out["rule:" + h] = 1.0
    return out


def shipped_coefficients(rule_weights: dict[str, float]) -> dict[str, float]:
    coef = {"bias": spamfilter.PRIOR_LOG_ODDS, "bayes": spamfilter.BAYES_FACTOR, "votes": spamfilter.VOTES_FACTOR,
            "terms": spamfilter.TERMS_FACTOR, "rules": spamfilter.RULES_FACTOR}
    coef.update({"rule:" + name: spamfilter.RULES_FACTOR * w for name, w in rule_weights.items()})
    return coef


def fit(rows: list[tuple[dict[str, float], bool, float]], prior: dict[str, float], lam: float,
        iterations: int = 30) -> dict[str, float]:
    """Weighted logistic regression by Newton's method; L2 of strength ``lam`` towards ``prior``
    (the bias is free)."""
    names = sorted({k for x, _, _ in rows for k in x})
    index = {n: i for i, n in enumerate(names)}
    beta = [prior.get(n, 0.0) for n in names]
    sparse = [([(index[k], v) for k, v in x.items()], 1.0 if y else 0.0, w) for x, y, w in rows]
    size = len(names)

    def loss(b: list[float]) -> float:
        total = 0.0
        for x, y, w in sparse:
            z = sum(b[i] * v for i, v in x)
            total += w * (math.log1p(math.exp(-abs(z))) + max(z, 0.0) - y * z)
        return total + 0.5 * lam * sum((b[i] - prior.get(n, 0.0)) ** 2 for i, n in enumerate(names) if n != "bias")

    current = loss(beta)
    for _ in range(iterations):
        grad = [0.0] * size
        hess = [[0.0] * size for _ in range(size)]
        for x, y, w in sparse:
            z = sum(beta[i] * v for i, v in x)
            p = 1.0 / (1.0 + math.exp(-min(max(z, -35.0), 35.0)))
            g, h = w * (p - y), w * p * (1.0 - p)
            for i, v in x:
                grad[i] += g * v
                row = hess[i]
                for j, u in x:
                    row[j] += h * v * u
        for i, n in enumerate(names):
            if n != "bias":
                grad[i] += lam * (beta[i] - prior.get(n, 0.0))
                hess[i][i] += lam
            hess[i][i] += 1e-6
        step = solve(hess, grad)
        scale = 1.0
        while scale > 1e-4:  # backtracking: Newton's full step may overshoot far from the optimum
            trial = [b - scale * s for b, s in zip(beta, step)]
            value = loss(trial)
            if value <= current:
                break
            scale /= 2
        else:
            break
        beta, improved, current = trial, current - value, value
        if improved < 1e-7 * max(current, 1.0):
            break
    return dict(zip(names, beta))


def solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (matrix and vector are copied)."""
    n = len(vector)
    a = [row[:] + [vector[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            if factor:
                for c in range(col, n + 1):
                    a[r][c] -= factor * a[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out


def score(x: dict[str, float], coef: dict[str, float]) -> float:
    z = sum(coef.get(k, 0.0) * v for k, v in x.items())
    return 1.0 / (1.0 + math.exp(-min(max(z, -35.0), 35.0)))


# -- figures --------------------------------------------------------------------------------------


def source_of(set_name: str) -> str:
    return next(s.source for s in accuracy.SETS if s.name == set_name)


def weights(rows: list[dict], fitted_sources: set[str]) -> list[float]:
    """Each fitted source weighs the same, and within it ham and spam weigh the same (total = rows)."""
    groups: dict[tuple[str, bool], int] = {}
    for row in rows:
        key = (source_of(row["set"]), row["spam"])
        groups[key] = groups.get(key, 0) + 1
    fitted = [k for k in groups if k[0] in fitted_sources]
    total = sum(groups[k] for k in fitted)
    return [total / (len(fitted) * groups[(source_of(r["set"]), r["spam"])])
            if source_of(r["set"]) in fitted_sources else 0.0 for r in rows]


def spam_threshold(scored: list[tuple[float, dict]], sources: set[str]) -> float:
    """The lowest score that calls at most FP_BUDGET of each source's ham Spam."""
    low = 0.5
    for source in sources:
        hams = sorted((s for s, r in scored if not r["spam"] and source_of(r["set"]) == source), reverse=True)
        allowed = math.floor(FP_BUDGET * len(hams))
        if allowed < len(hams):
            low = max(low, math.nextafter(hams[allowed], 1.0))
    return low


def table(title: str, scored: list[tuple[float, dict]], probable: float, spam: float) -> None:
    print(f"\n== {title}: Probable from {probable:.4f}, Spam from {spam:.6f}")
    print(accuracy.HEADER)
    for corpus_set in accuracy.SETS:
        result = accuracy.Result([(s, status(s, r, probable, spam), r["spam"]) for s, r in scored
                                  if r["set"] == corpus_set.name])
        if result.rows:
            print(accuracy.line(corpus_set.name, corpus_set.era, "smtpgw " + LEVEL, result))


def status(value: float, row: dict, probable: float, spam: float) -> str:
    if row["forced"] or value >= spam:
        return accuracy.SPAM
    return accuracy.PROBABLE_SPAM if value >= probable else accuracy.NOT_DETECTED


def evaluate(title: str, rows: list[dict], coef_for: Callable[[set[str]], dict[str, float]],
             make: Callable[[dict], dict[str, float]], sources: list[str], probable: float,
             held_out: bool) -> None:
    """Figures of the coefficients fitted on every source; with ``held_out``, each source's rows
    also scored by a fit that left it out (and thresholds chosen without it)."""
    xs = [make(r) for r in rows]
    coef = coef_for(set(sources))
    scored = [(score(x, coef), r) for x, r in zip(xs, rows)]
    table(title, scored, probable, spam_threshold(scored, set(sources)))
    print("coefficients: " + ", ".join(f"{k} {v:+.3f}" for k, v in sorted(coef.items(), key=lambda kv: -abs(kv[1]))))
    if not held_out:
        return
    out: list[tuple[float, dict]] = []
    for source in sources:
        rest = set(sources) - {source}
        coef = coef_for(rest)
        mine = [(score(x, coef), r) for x, r in zip(xs, rows)]
        threshold = spam_threshold(mine, rest)
        out.extend((s if s < threshold else 2.0, r) for s, r in mine if source_of(r["set"]) == source)
    table(title + ", each source scored by a fit without it", out, probable, 1.5)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="fit the spam filter's combination on held-out evidence")
    parser.add_argument("--packs", default=accuracy.DEFAULT_PACKS)
    parser.add_argument("--corpus", default=accuracy.CORPUS)
    parser.add_argument("--evidence", default="/tmp/smtpgw-evidence.jsonl", help="where the evidence is kept")
    parser.add_argument("--reuse", action="store_true", help="read --evidence instead of collecting it again")
    parser.add_argument("--lam", type=float, default=1.0, help="L2 strength towards the shipped factors")
    parser.add_argument("--per-rule", action="store_true", help="one coefficient per rule instead of one for all")
    parser.add_argument("--probable", type=float, default=THRESHOLDS[LEVEL][0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.reuse:
        manifest = training.read_manifest(accuracy.MANIFEST)
        messages = accuracy.load_sets({"corpus": args.corpus, "packs": args.packs}, manifest.exclude, 5,
                                      args.workers)
        run = accuracy.Run(SimpleNamespace(scores=None), messages, manifest, {}, (LEVEL,))
        with open(args.evidence, "w", encoding="utf-8") as dst:
            for row in collect(run, args.workers):
                dst.write(json.dumps(row, sort_keys=True) + "\n")
    with open(args.evidence, encoding="utf-8") as src:
        rows = [json.loads(line) for line in src]
    rules = RuleSet(training.default_rules()).rules
    rule_weights = {r.name: r.weight for r in rules if LEVEL in r.levels and not r.force}
    sources = sorted({source_of(r["set"]) for r in rows if _set_named(r["set"]).trainable})
    names = sorted(rule_weights) if args.per_rule else None

    def make(row: dict) -> dict[str, float]:
        return features(row, rule_weights, names)

    prior = shipped_coefficients(rule_weights)
    xs = [make(r) for r in rows]

    def coef_for(fitted: set[str]) -> dict[str, float]:
        w = weights(rows, fitted)
        return fit([(x, r["spam"], wi) for x, r, wi in zip(xs, rows, w) if wi > 0], prior, args.lam)

    shipped = [(score(x, prior), r) for x, r in zip(xs, rows)]
    table("shipped combination", shipped, THRESHOLDS[LEVEL][0], THRESHOLDS[LEVEL][1])
    evaluate("fitted combination", rows, coef_for, make, sources, args.probable, held_out=True)
    return 0


def _set_named(name: str) -> accuracy.CorpusSet:
    return next(s for s in accuracy.SETS if s.name == name)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
