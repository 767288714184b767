#!/usr/bin/env python3
"""How often each named sign of the spam engine fires, per set and per class: the figures a rule weight is
chosen on.

Reads the same sets as bench/spam_accuracy.py (the corpus folder and the packs unpacked with
``sh ../shared/corpus-packs/unpack.sh DIR``; a set whose folder is missing is left out) and prints, for
every sign of ``smtpgw.spam.signs.CHECKS``, the share of ham and of spam of each set it fires on, then the
rule that reads it and that rule's weight. A sign of legitimate mail should fire on ham of every era and
on little spam; a spam sign on spam (phishing included) and on no ham of any set, the mailing-list ham
and today's newsletters above all.

Must never: train on anything, or talk to anything on the network.

Usage: nice -n 10 python3 bench/spam_signs.py [--packs DIR] [--signs a,b] [--rules] [--out FILE]
  --rules: the rules of default.rules that are not a sign (header, body, uri, html, words) instead,
  as they would hit at SpamDetection=hard (where every rule is on).
  --out writes one line per message (set, class, file, the signs it fired) for a closer look.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spam_accuracy import CORPUS, DEFAULT_PACKS, MANIFEST, load_sets  # noqa: E402

from smtpgw.spam import mailview, tokenizer, training  # noqa: E402
from smtpgw.spam.rules import RuleSet  # noqa: E402
from smtpgw.spam.signs import CHECKS, run_check  # noqa: E402


def _fired(job: tuple[str, tuple[str, ...], bool]) -> tuple[str, ...]:
    path, names, rules = job
    with open(path, "rb") as src:
        view = mailview.build(src.read())
    if rules:
        hits = RuleSet([r for r in training.default_rules() if r.name in names]).evaluate(
            view, tokenizer.tokens(view), "hard")
        return tuple(hit.name for hit in hits)
    return tuple(name for name in names if run_check(name, view))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="hit rate of every spam sign per set and class")
    parser.add_argument("--packs", default=DEFAULT_PACKS, help="where unpack.sh put the packed sets")
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--signs", default="", help="comma list of signs (default: all)")
    parser.add_argument("--rules", action="store_true", help="the rules that are not signs, instead of the signs")
    parser.add_argument("--out", help="write every message's fired signs to this file (TSV)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    names = tuple(n for n in args.signs.split(",") if n) or tuple(CHECKS)
    if args.rules:
        names = tuple(r.name for r in training.default_rules() if r.kind != "check")
    unknown = [n for n in names if n not in CHECKS and not args.rules]
    if unknown:
        parser.error(f"unknown sign(s) {', '.join(unknown)}")
    started = time.monotonic()
    manifest = training.read_manifest(MANIFEST)
    messages = load_sets({"corpus": args.corpus, "packs": args.packs}, manifest.exclude, 5, tokenise=False)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        fired = list(pool.map(_fired, [(m.file, names, args.rules) for m in messages], chunksize=64))
    columns: dict[tuple[str, bool], list[tuple[str, ...]]] = {}
    for message, hits in zip(messages, fired):
        columns.setdefault((message.set, message.is_spam), []).append(hits)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as dst:
            for message, hits in zip(messages, fired):
                dst.write(f"{message.set}\t{'spam' if message.is_spam else 'ham'}\t{message.file}\t{','.join(hits)}\n")
    rules = {rule.name if args.rules else rule.target: rule for rule in training.default_rules()
             if (rule.kind == "check") != args.rules}
    keys = sorted(columns, key=lambda k: (k[1], [m.set for m in messages].index(k[0])))
    print(f"{len(messages)} messages in {time.monotonic() - started:.0f} s; % of each set and class the sign fires on")
    print(f"{'sign':<24}" + "".join(f" {s[:10] + ('/S' if spam else '/H'):>13}" for s, spam in keys)
          + "  rule weight")
    for name in names:
        cells = []
        for key in keys:
            column = columns[key]
            cells.append(f" {100 * sum(1 for hits in column if name in hits) / len(column):13.1f}")
        rule = rules.get(name)
        where = f"  {rule.name} {'spam' if rule.force else f'{rule.weight:+.2f}'} {','.join(sorted(rule.levels))}" \
            if rule else "  (token only)"
        print(f"{name:<24}" + "".join(cells) + where)
    print("counts: " + ", ".join(f"{s}/{'S' if spam else 'H'} {len(columns[(s, spam)])}" for s, spam in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
