"""``smtpgw.py spam ...``: train, classify, learn and describe spam databases.

Owns: the command line of the anti-spam engine —

  spam train --ham PATH --spam PATH --db OUT [--rules FILE] [--min-count N]
             [--db-version TEXT] [--date YYYY-MM-DD]
  spam classify [--db PATH] [--level soft|standard|hard] FILE...
  spam learn [--db PATH] (--ham | --spam) FILE...   (into the site layer, database.site_file)
  spam info [--db PATH]

PATH may be an mbox file, a Maildir, a directory of message files or one
message file. ``--db`` takes a directory (``DIR/spam.db`` or
``DIR/spam/spam.db``) or the database file; the default is the BasesPath
given by the caller. ``classify`` prints ``FILE<TAB>STATUS<TAB>SCORE`` per
message (``FILE:N`` for the N-th message of an mbox).

Must never: write a database except atomically, or print a traceback for a
user error (bad path, damaged database): it prints one line and returns 1
(usage errors return 2).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from types import SimpleNamespace

from smtpgw.spam import spamfilter
from smtpgw.spam import training
from smtpgw.spam.database import DatabaseError, DatabaseInfo, SpamDatabase, database_file, site_file
from smtpgw.spam.mailsource import iter_messages
from smtpgw.spam.rules import RuleError, parse_rules
from smtpgw.spam.verdict import THRESHOLDS, format_score


def _parser(default_db: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgw.py spam", description="smtpgw anti-spam database tools")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="build a new database from ham and spam mail")
    train.add_argument("--ham", action="append", required=True, metavar="PATH")
    train.add_argument("--spam", action="append", required=True, metavar="PATH")
    train.add_argument("--db", required=True, metavar="OUT", help="directory (or file) to write")
    train.add_argument("--rules", metavar="FILE", help="rules file (default: the shipped default.rules)")
    train.add_argument("--min-count", type=int, default=1, metavar="N", help="drop tokens seen fewer times (sender domains are kept)")
    train.add_argument("--db-version", metavar="TEXT", help="database version (default: the date)")
    train.add_argument("--date", metavar="YYYY-MM-DD", help="database date (default: today, UTC)")

    classify = sub.add_parser("classify", help="print FILE, status and score for each message")
    classify.add_argument("--db", default=default_db, metavar="PATH")
    classify.add_argument("--level", choices=sorted(THRESHOLDS), default="standard")
    classify.add_argument("files", nargs="+", metavar="FILE")

    learn = sub.add_parser("learn", help="add messages to the site layer of a database")
    learn.add_argument("--db", default=default_db, metavar="PATH")
    kind = learn.add_mutually_exclusive_group(required=True)
    kind.add_argument("--ham", action="store_true")
    kind.add_argument("--spam", action="store_true")
    learn.add_argument("files", nargs="+", metavar="FILE")

    info = sub.add_parser("info", help="show a database's version and size")
    info.add_argument("--db", default=default_db, metavar="PATH")
    return parser


def main(argv: list[str], default_bases: str | None = None) -> int:
    """Run one ``spam`` sub-command; returns the process exit status."""
    parser = _parser(default_bases or spamfilter.default_bases())
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage message
        return int(exc.code or 0)
    try:
        return _COMMANDS[args.command](args)
    except (DatabaseError, RuleError, OSError, ValueError) as exc:
        print(f"spam {args.command}: {exc}", file=sys.stderr)
        return 1


def _train(args: argparse.Namespace) -> int:
    if args.rules:
        with open(args.rules, encoding="utf-8") as src:
            rules = parse_rules(src.read(), args.rules)
    else:
        rules = training.default_rules()
    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    datetime.date.fromisoformat(date)  # ValueError on a bad date
    sources = ", ".join(os.path.basename(os.path.normpath(p)) for p in args.ham + args.spam)
    info = DatabaseInfo(version=args.db_version or date, date=date, source=f"spam train: {sources}")
    database = training.build(training.labelled(args.ham, args.spam), rules, info, min_count=args.min_count)
    path = _output_file(args.db)
    database.save(path)
    print(f"{path}: {database.bayes.nham} ham, {database.bayes.nspam} spam, "
          f"{len(database.bayes.counts)} tokens, {len(database.terms.weights)} term weights, {len(rules)} rules")
    return 0


def _output_file(path: str) -> str:
    if path.endswith(".db") and not os.path.isdir(path):
        return path
    return os.path.join(path, "spam.db")


def _classify(args: argparse.Namespace) -> int:
    section = SimpleNamespace(SpamDetection=args.level, Check=True)
    spam_filter = spamfilter.SpamFilter(section, args.db)
    for item in args.files:
        if not os.path.exists(item):
            print(f"spam classify: {item}: no such file", file=sys.stderr)
            return 1
        for label, raw in iter_messages(item):
            verdict = spam_filter.classify(raw, None, "", [], [])
            print(f"{label}\t{verdict.status}\t{format_score(verdict.score)}")
    return 0


def _learn(args: argparse.Namespace) -> int:
    missing = [f for f in args.files if not os.path.exists(f)]
    if missing:
        print(f"spam learn: {missing[0]}: no such file", file=sys.stderr)
        return 1
    count = training.learn_files(args.db, args.files, is_spam=args.spam)
    print(f"{site_file(args.db)}: learned {count} {'spam' if args.spam else 'ham'} messages")
    return 0


def _info(args: argparse.Namespace) -> int:
    path = database_file(args.db)
    database = SpamDatabase.load(path)
    info = database.info
    print(f"file\t{path}\nformat\t{info.format}\nversion\t{info.version}\ndate\t{info.date}\n"
          f"ham\t{database.bayes.nham}\nspam\t{database.bayes.nspam}\n"
          f"tokens\t{len(database.bayes.counts)}\nterm-weights\t{len(database.terms.weights)}\n"
          f"rules\t{len(database.rules)}\nsource\t{info.source}")
    site = site_file(args.db)
    if os.path.exists(site):
        layer = SpamDatabase.load(site)
        print(f"site\t{site}\nsite-date\t{layer.info.date}\nsite-ham\t{layer.bayes.nham}\n"
              f"site-spam\t{layer.bayes.nspam}\nsite-tokens\t{len(layer.bayes.counts)}")
    return 0


_COMMANDS = {"train": _train, "classify": _classify, "learn": _learn, "info": _info}
