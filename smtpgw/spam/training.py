"""Training the spam database from labelled mail: full builds and incremental learning.

Owns: counting tokens of ham and spam messages into a ``SpamDatabase``,
leaving out tokens that only describe where a training corpus was collected
(``exclude`` substrings), pruning rare tokens, fitting the term weights
(``terms.fit``) on the tokens that remain, and learning single messages into
the site layer (``database.site_file``) under its write lock: the shipped
database is only read, for the term weights of the learned messages' tokens.

A full build keeps every message's tokens in memory for the fitting passes
(about 3 KB per message: 150 MB for 50,000 messages).

Must never: write a database other than through ``SpamDatabase.save`` (atomic),
or depend on the order or hash seed for its output (counts are order-free,
``terms.fit`` puts the messages in a canonical order, and the file is written
sorted).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from smtpgw.spam import mailview, terms, tokenizer
from smtpgw.spam.database import (
    DatabaseInfo,
    SpamDatabase,
    database_file,
    site_file,
    term_weights,
    write_lock,
)
from smtpgw.spam.mailsource import iter_messages
from smtpgw.spam.rules import Rule, parse_rules
from smtpgw.spam.spamfilter import TERMS_FACTOR

log = logging.getLogger("smtpgw.spam.training")

DEFAULT_RULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.rules")


def default_rules() -> list[Rule]:
    with open(DEFAULT_RULES, encoding="utf-8") as src:
        return parse_rules(src.read(), DEFAULT_RULES)


def message_tokens(raw: bytes, exclude: tuple[str, ...] = ()) -> set[str]:
    found = tokenizer.tokens(mailview.build(raw))
    if exclude:
        found = {t for t in found if not any(part in t for part in exclude)}
    return found


def labelled(ham: Iterable[str], spam: Iterable[str]) -> Iterator[tuple[str, bytes, bool]]:
    """(label, raw bytes, is_spam) for every message under the ham and spam paths, streamed."""
    for paths, is_spam in ((ham, False), (spam, True)):
        for path in paths:
            for label, raw in iter_messages(path):
                yield label, raw, is_spam


def build(
    training: Iterable[tuple[str, bytes, bool]],
    rules: list[Rule],
    info: DatabaseInfo,
    exclude: tuple[str, ...] = (),
    min_count: int = 1,
) -> SpamDatabase:
    """A new database from labelled messages.

    Tokens seen fewer than ``min_count`` times are dropped, except the sender
    identities of ``tokenizer.is_identity`` (bench/spam_accuracy.py: holdout
    (1-AUC)% 0.021 -> 0.019, 5-fold 0.052 -> 0.051, era 0.079 -> 0.081, within the
    spread between fitting seeds; keeping every token seen once instead costs the
    era protocol 0.083 with the term weights and 0.23 in Bayes alone).
    """
    tokenised = ((message_tokens(raw, exclude), is_spam) for _label, raw, is_spam in training)
    return build_from_tokens(tokenised, rules, info, min_count)


def build_from_tokens(
    tokenised: Iterable[tuple[set[str], bool]], rules: list[Rule], info: DatabaseInfo, min_count: int = 1
) -> SpamDatabase:
    """A new database from already tokenised messages (benchmarks reuse one tokenisation)."""
    database = SpamDatabase.empty(rules, info)
    bayes = database.bayes
    samples: list[tuple[tuple[str, ...], bool]] = []
    for found, is_spam in tokenised:
        bayes.learn(found, is_spam)
        samples.append((tuple(found), is_spam))
    if min_count > 1:
        bayes.counts = {t: c for t, c in bayes.counts.items()
                        if c[0] + c[1] >= min_count or tokenizer.is_identity(t)}
    database.terms = terms.fit(samples, bayes.counts)
    return database


@dataclass
class Manifest:
    """An exact training input: metadata, exclusions and (label, sha256, path) entries.

    File format, one item per line, ``#`` comments::

        version 2005.03.11-1
        date 2005-03-11
        source free text
        min-count 2
        exclude spamassassin.taint.org        (a token containing this is not learned)
        ham <sha256> spamassassin/ham/easy_ham__00001.7c53336b37003a9286aba55d2945844c.eml
        spam <sha256> spamassassin/spam/spam__00001.bfc8d64d12b325ff385cca8d07b84288.eml
    """

    version: str = ""
    date: str = ""
    source: str = ""
    min_count: int = 1
    exclude: tuple[str, ...] = ()
    entries: list[tuple[bool, str, str]] = field(default_factory=list)  # (is_spam, sha256, path)


def read_manifest(path: str) -> Manifest:
    manifest = Manifest()
    excludes: list[str] = []
    with open(path, encoding="utf-8") as src:
        for number, line in enumerate(src, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition(" ")
            value = value.strip()
            if key in ("version", "date", "source"):
                setattr(manifest, key, value)
            elif key == "min-count":
                manifest.min_count = int(value)
            elif key == "exclude":
                excludes.append(value)
            elif key in ("ham", "spam"):
                digest, _, name = value.partition(" ")
                if len(digest) != 64 or not name:
                    raise ValueError(f"{path}:{number}: expected '{key} SHA256 PATH'")
                manifest.entries.append((key == "spam", digest, name.strip()))
            else:
                raise ValueError(f"{path}:{number}: unknown key {key!r}")
    manifest.exclude = tuple(excludes)
    return manifest


def learn_files(db_path: str, paths: Iterable[str], is_spam: bool) -> int:
    """Add messages to the site layer of the database at ``db_path`` (``spam learn``, a release
    with LearnOnRelease, the console); returns how many."""
    messages = [message_tokens(raw) for item in paths for _label, raw in iter_messages(item)]
    path = site_file(db_path)
    with write_lock(path):
        learn_tokens(db_path, messages, is_spam)
    log.info("learned %d %s messages into %s", len(messages), "spam" if is_spam else "ham", path)
    return len(messages)


def learn_tokens(db_path: str, messages: list[set[str]], is_spam: bool) -> None:
    """Add tokenised messages to the site layer of ``db_path``; the caller holds its
    ``write_lock`` (``learn_files``, ``autolearn``). The term weights change until the shipped
    weights and the site's together judge each message right (``Terms.learn``)."""
    path = site_file(db_path)
    bias, weights = term_weights(database_file(db_path), set().union(*messages)) if messages else (0.0, {})
    site = SpamDatabase.load(path) if os.path.exists(path) else SpamDatabase.empty(
        info=DatabaseInfo(version="site", source="learned at this site"))
    for found in messages:
        offset = bias + sum(weights.get(t, 0.0) for t in found)
        site.bayes.learn(found, is_spam)
        site.terms.learn(found, is_spam, offset, learn_bias=False, scale=TERMS_FACTOR)
    site.info.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    site.save(path)
