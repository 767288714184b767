#!/usr/bin/env python3
"""Rebuild the shipped spam database (smtpgw/bases/spam/spam.db) byte for byte.

Owns: turning the exact input list ``smtpgw/bases/spam/TRAINING_FILES.txt``
(metadata, token exclusions, and one ``ham|spam SHA256 PATH`` line per
message) plus ``smtpgw/spam/default.rules`` into the shipped database. The
output depends only on those inputs: the date and version come from the list,
tokens are written sorted, and every input file's SHA-256 is checked first.

A PATH is relative to the corpus folder (<repo>/../shared/corpus), or, when it
starts with ``packs/``, to the folder where ``../shared/corpus-packs/unpack.sh``
extracted the packed sets (``sh unpack.sh DIR``; --packs DIR, default
/tmp/smtpgw-corpus). The sets trained on and why each may be (licences):
``TRAINING_SETS`` below. The phishing pack (CC BY-NC 4.0) is never trained on.

Usage:
  python3 tools/train_spam_db.py                 rebuild smtpgw/bases/spam/spam.db
  python3 tools/train_spam_db.py --check         rebuild in memory, compare with the shipped file
  python3 tools/train_spam_db.py --write-list    regenerate the list from the corpus folders
Options: --corpus DIR (default <repo>/../shared/corpus), --packs DIR (default
/tmp/smtpgw-corpus), --list FILE, --out FILE. A rebuild of the whole list takes
a few minutes and about 200 MB (run it with nice -n 10).

Must never: train on a file whose hash differs from the list, or write the
database other than atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.spam import training  # noqa: E402
from smtpgw.spam.database import DatabaseInfo  # noqa: E402

DEFAULT_LIST = os.path.join(REPO, "smtpgw", "bases", "spam", "TRAINING_FILES.txt")
DEFAULT_OUT = os.path.join(REPO, "smtpgw", "bases", "spam", "spam.db")
DEFAULT_CORPUS = os.path.join(os.path.dirname(REPO), "shared", "corpus")
DEFAULT_PACKS = "/tmp/smtpgw-corpus"
PACKS_PREFIX = "packs/"

# (label, folder) of every set the shipped database learns; "packs/" folders come from unpack.sh.
TRAINING_SETS = (
    ("ham", "spamassassin/ham"),  # SpamAssassin public corpus 2002-2005: posted publicly, see its README
    ("spam", "spamassassin/spam"),
    ("ham", "modern-mixed/ham"),  # foff-milter test mail 2025-2026: MIT
    ("spam", "modern-mixed/spam"),
    ("ham", "packs/trec07p/ham"),  # TREC 2007 public spam corpus: research corpus, fine for training
    ("spam", "packs/trec07p/spam"),
)
# Not trained on, though their licences would allow it: packs/modern-ham-lists (2,000 messages of one
# technical mailing list, 2019-2026, ham only). Beside 105 modern spam it taught that anything of today's
# form is ham: the phishing set's catch fell from 90.6% to 84.4% with it (bench/spam_accuracy.py, a
# database of every other trainable set). It stays a test set for false positives.

# Written at the top of a regenerated list: what the corpus is, and the tokens
# that only describe where it was collected (the collector's hosts and
# addresses, the corpus's obfuscation placeholders), which must not be learned.
LIST_HEADER = """\
# Exact input of the shipped spam database; see tools/train_spam_db.py.
# Paths are relative to the corpus root (<repo>/../shared/corpus); packs/ paths to the folder of
# ../shared/corpus-packs/unpack.sh.
version 2026.12.08-6
date 2026-12-08
source SpamAssassin public corpus 2002-2005, TREC 2007 public corpus (first half, seeded sample), modern-mixed 2025-2026
min-count 2
# Collector artefacts: the corpus owners' hosts and addresses and the obfuscation placeholders.
exclude taint.org
exclude netnoteinc
exclude jmason
exclude slashnull
exclude example.com
exclude example.net
exclude example.org
exclude example.sourceforge
exclude zzzz
exclude yyyy
exclude qqqq
exclude localhost
exclude uwaterloo
exclude ktwarwic
exclude phishing@pot
"""


def sha256_of(path: str) -> str:
    with open(path, "rb") as src:
        return hashlib.sha256(src.read()).hexdigest()


def resolve(rel: str, corpus: str, packs: str) -> str:
    """The file a list PATH names: under --packs for "packs/..." paths, under --corpus otherwise."""
    if rel.startswith(PACKS_PREFIX):
        return os.path.join(packs, rel[len(PACKS_PREFIX):])
    return os.path.join(corpus, rel)


def write_list(corpus: str, packs: str, out: str) -> int:
    lines = [LIST_HEADER.rstrip("\n")]
    for label, folder in TRAINING_SETS:
        base = resolve(folder, corpus, packs)
        if not os.path.isdir(base):
            raise SystemExit(f"{base}: missing (unpack the packed sets with ../shared/corpus-packs/unpack.sh)")
        for name in sorted(os.listdir(base)):
            rel = f"{folder}/{name}"
            lines.append(f"{label} {sha256_of(os.path.join(base, name))} {rel}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as dst:
        dst.write("\n".join(lines) + "\n")
    print(f"{out}: {len(lines) - 1} messages")
    return 0


def rebuild(corpus: str, packs: str, list_path: str):  # type: ignore[no-untyped-def]
    manifest = training.read_manifest(list_path)

    def messages():  # type: ignore[no-untyped-def]
        for is_spam, digest, rel in manifest.entries:
            try:
                with open(resolve(rel, corpus, packs), "rb") as src:
                    raw = src.read()
            except OSError as exc:
                raise SystemExit(f"{rel}: {exc.strerror} (unpack the packed sets with"
                                 " ../shared/corpus-packs/unpack.sh and give --packs)") from None
            if hashlib.sha256(raw).hexdigest() != digest:
                raise SystemExit(f"{rel}: SHA-256 differs from {list_path}")
            yield rel, raw, is_spam

    info = DatabaseInfo(version=manifest.version, date=manifest.date, source=manifest.source)
    return training.build(messages(), training.default_rules(), info, manifest.exclude, manifest.min_count)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--packs", default=DEFAULT_PACKS, help="where unpack.sh extracted the packed sets")
    parser.add_argument("--list", default=DEFAULT_LIST)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare a rebuild with --out")
    parser.add_argument("--write-list", action="store_true", help="regenerate --list from --corpus")
    args = parser.parse_args(argv)
    if args.write_list:
        return write_list(args.corpus, args.packs, args.list)
    database = rebuild(args.corpus, args.packs, args.list)
    if args.check:
        with open(args.out, "rb") as src:
            same = src.read() == database.to_bytes()
        print(f"{args.out}: {'identical to' if same else 'DIFFERS from'} a rebuild")
        return 0 if same else 1
    database.save(args.out)
    print(f"{args.out}: {database.bayes.nham} ham, {database.bayes.nspam} spam, "
          f"{len(database.bayes.counts)} tokens, {len(database.rules)} rules, {os.path.getsize(args.out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
