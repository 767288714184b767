#!/usr/bin/env python3
"""Proof that a faster spam check still gives the same results: every message's tokens, evidence
and verdicts written out by one tree and compared, exactly, with another's.

For each message of the corpora (``/work/shared/corpus`` and, with ``--packs``, the packs): the
sorted token set, the Bayes score, clues and vote, the term log-odds, the rule hits at every
SpamDetection level (names, weights, reasons) and the verdict of each level (status, score,
method, reasons, content score), floats written with ``repr`` so that they compare to the last
bit. Run it once with ``--tree`` naming the base tree (a ``git worktree`` of the base commit) and
once in this one, then ``--compare``::

    python3 bench/spam_same.py --tree ../spamspeed-base --out /tmp/base.jsonl
    python3 bench/spam_same.py --out /tmp/new.jsonl --compare /tmp/base.jsonl

Must never: print a timing as proof of anything (it only compares), or write into the trees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPORA = (os.path.join(os.path.dirname(REPO), "shared", "corpus"),)
PACKS = "/work/packs"
LEVELS = ("soft", "standard", "hard")


def message_files(roots: list[str]) -> list[tuple[str, str]]:
    """(name, path) of every message file under ``roots``, in a stable order."""
    found = []
    for root in roots:
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                if name.endswith(".md"):
                    continue
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, os.path.dirname(root)), path))
    return sorted(found)


def record(filters: dict, raw: bytes) -> dict:
    """Everything the spam check says about ``raw``, floats as repr."""
    from smtpgw.spam import mailview, tokenizer

    first = filters["standard"]
    tokens = sorted(tokenizer.tokens(mailview.build(raw)))
    evidence = first.evidence(raw, ["zen.example"])
    out: dict = {
        "tokens": hashlib.sha256("\n".join(tokens).encode("utf-8", "surrogatepass")).hexdigest(),
        "ntokens": len(tokens),
        "bayes": repr(evidence.bayes.score),
        "clues": [(t, repr(p)) for t, p in evidence.bayes.clues],
        "votes": repr(evidence.bayes.votes),
        "terms": repr(evidence.terms),
    }
    for level, spam_filter in filters.items():
        hits = spam_filter.evidence(raw, [], level).hits
        out[f"hits:{level}"] = [repr(hit) for hit in hits]
        for dnsbl in ([], ["zen.example"]):
            verdict = spam_filter.classify(raw, "192.0.2.1", "sender@example.com", ["rcpt@example.org"], dnsbl)
            out[f"verdict:{level}:{len(dnsbl)}"] = repr(verdict)  # every field, floats to the last bit
    return out


def compare(new: str, old: str) -> int:
    with open(old) as src:
        before = {row["name"]: row for row in map(json.loads, src)}
    with open(new) as src:
        after = {row["name"]: row for row in map(json.loads, src)}
    differ = 0
    for name in sorted(after):  # a --limit run compares its first messages
        a, b = before.get(name), after[name]
        if a != b:
            differ += 1
            if differ <= 10:
                keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
                print(f"DIFFERS {name}: {', '.join(keys)}")
    print(f"{len(after)} messages compared with those of {old} ({len(before)}): {differ} differ")
    return 1 if differ else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="spam check results of one tree, compared with another's")
    parser.add_argument("--tree", default=REPO, help="the tree whose smtpgw is run (default: this one)")
    parser.add_argument("--out", required=True, help="JSON lines written here")
    parser.add_argument("--compare", help="JSON lines of the other tree: exit 1 when any message differs")
    parser.add_argument("--packs", action="store_true", help=f"the packs under {PACKS} too")
    parser.add_argument("--limit", type=int, default=0, help="only the first N messages")
    parser.add_argument("--every", type=int, default=1, help="one message in N (a sample of every folder)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.tree))
    from smtpgw.spam.spamfilter import SpamFilter

    roots = [root for root in CORPORA if os.path.isdir(root)]
    if args.packs:
        roots += [os.path.join(PACKS, name) for name in sorted(os.listdir(PACKS))]
    files = message_files(roots)[::args.every][:args.limit or None]
    # The tree's own shipped database: both trees must ship the same one for a comparison.
    filters = {level: SpamFilter(SimpleNamespace(SpamDetection=level), None) for level in LEVELS}
    with open(args.out, "w") as out:
        for name, path in files:
            with open(path, "rb") as src:
                raw = src.read()
            out.write(json.dumps({"name": name, **record(filters, raw)}) + "\n")
    print(f"{len(files)} messages written to {args.out} by {filters['standard'].path}")
    return compare(args.out, args.compare) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
