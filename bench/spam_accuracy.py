#!/usr/bin/env python3
"""Accuracy of smtpgw's anti-spam engine per set and per era, beside bogofilter and SpamAssassin, in one run.

Needs the corpus folder (<repo>/../shared/corpus: spamassassin/, modern-mixed/)
and the packed sets unpacked with ``sh ../shared/corpus-packs/unpack.sh DIR``
(--packs DIR, default /tmp/smtpgw-corpus); a set whose folder is missing is
left out and said so.

Sets (one row each, never one pooled number):

=============  ===========  ==========  ===================================================
set            source       era         messages
=============  ===========  ==========  ===================================================
sa-2002        spamassassin 2002        easy_ham, hard_ham, spam
sa-2003-05     spamassassin 2003-2005   easy_ham_2, spam_2
trec-2007      trec07p      2007        6,000 ham, 6,000 spam
modern-mixed   modern       2025-2026   93 ham (newsletters, receipts), 105 spam
lists          lists        2019-2026   2,000 ham of a technical mailing list (false positives only; not trained)
phishing       phishing     2022-2026   2,000 spam (catch rate only; CC BY-NC: never trained)
=============  ===========  ==========  ===================================================

Protocols:

* shipped — the shipped database (smtpgw/bases/spam/spam.db) on every set;
  a set it was trained on is marked "(trained)".
* loso — leave one source out: for each source the shipped database is
  trained on, a database is trained on the other such sources (the same
  exclusions and pruning as the shipped one) and tested on that source's sets.
  The sets never trained on (lists, phishing) are judged by the database
  trained on every trained source. This is the figure of mail of another
  source and era.
* modern-kfold — the modern set K-fold: each fold tested by a database trained
  on every other source plus the other folds of the modern set.
* sa-era — trained on sa-2002 alone, tested on sa-2003-05 (how a model ages).

Peers, in the same run, on the test set of each row: bogofilter trained on the
same training messages (its Unsure counts as Probable Spam), and SpamAssassin
4 (``spamassassin -L --mbox``, network tests off, a private --siteconfigpath
with the system's plugin loading but not its local.cf; Spam at its required
score 5.0, no middle band) on a seeded sample of --sa-sample messages of each
class of each set (it runs at a few messages per second): its rules alone
("SA rules"), and its rules with its Bayes ("SA rules+Bayes", score set 1)
trained by sa-learn into a private bayes_path on a seeded sample of --sa-train
messages of each class of the same training messages (sa-learn reads about 100
messages a second; the modern k-fold's other folds are always all in it). The
ham and spam columns give the sample sizes.

Figures: ham called Spam, ham called Probable Spam, spam caught (Spam or
Probable Spam), spam missed (Not Detected), (1-ROC AUC)%, and spam missed at
the score threshold that keeps ham false positives at or under 0.1%
("miss@0.1%").

Must never: train on a message it then tests in the same protocol, train on
the phishing set, or talk to anything on the network.

Seeds: the term weights are fitted by a seeded descent (``terms.SEED``), and a
change of a few training tokens changes its path. ``--seeds A,B,C`` runs every
protocol once per fitting seed and ends with the smtpgw rows of each set at
each seed and their spread (min-max), so that a change is judged against the
spread a reseeding alone gives, not against one path.

Usage: nice -n 10 python3 bench/spam_accuracy.py [--packs DIR] [--protocols shipped,loso,modern-kfold,sa-era]
       [--levels soft,standard,hard] [--folds 5] [--sa-sample 150] [--sa-train 2000] [--no-peers]
       [--seeds 20050311,1,2]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.spam import terms, training  # noqa: E402
from smtpgw.spam.database import DatabaseInfo, SpamDatabase  # noqa: E402
from smtpgw.spam.spamfilter import SpamFilter, default_bases  # noqa: E402
from smtpgw.spam.verdict import NOT_DETECTED, PROBABLE_SPAM, SPAM  # noqa: E402

CORPUS = os.path.join(os.path.dirname(REPO), "shared", "corpus")
DEFAULT_PACKS = "/tmp/smtpgw-corpus"
MANIFEST = os.path.join(REPO, "smtpgw", "bases", "spam", "TRAINING_FILES.txt")
LEVELS = ("soft", "standard", "hard")
FP_BUDGET = 0.001  # "spam missed at <= 0.1% false positives"


@dataclass(frozen=True)
class CorpusSet:
    """One labelled set: where its messages are, its source and era, and whether it may be trained on."""

    name: str
    source: str
    era: str
    folders: tuple[tuple[str, str, bool], ...]  # (root key, folder, is_spam)
    prefixes: tuple[str, ...] = ()  # file-name prefixes kept ("" = all)
    trainable: bool = True  # the shipped database is trained on it (tools/train_spam_db.py TRAINING_SETS)


SETS = (
    CorpusSet("sa-2002", "spamassassin", "2002",
              (("corpus", "spamassassin/ham", False), ("corpus", "spamassassin/spam", True)),
              ("easy_ham__", "hard_ham__", "spam__")),
    CorpusSet("sa-2003-05", "spamassassin", "2003-05",
              (("corpus", "spamassassin/ham", False), ("corpus", "spamassassin/spam", True)),
              ("easy_ham_2__", "spam_2__")),
    CorpusSet("trec-2007", "trec07p", "2007", (("packs", "trec07p/ham", False), ("packs", "trec07p/spam", True))),
    CorpusSet("modern-mixed", "modern", "2025-26",
              (("corpus", "modern-mixed/ham", False), ("corpus", "modern-mixed/spam", True))),
    # Licensed for training but left out of the shipped database (see tools/train_spam_db.py): a test set.
    CorpusSet("lists", "lists", "2019-26", (("packs", "modern-ham-lists", False),), trainable=False),
    CorpusSet("phishing", "phishing", "2022-26", (("packs", "phishing-2022-2026", True),), trainable=False),
)


@dataclass
class Message:
    path: str  # relative to its root, as TRAINING_FILES.txt names it
    file: str  # absolute path
    set: str
    is_spam: bool
    fold: int
    tokens: frozenset[str] = frozenset()
    raw: bytes = b""  # read only by bench/spam_speed.py


@dataclass
class Result:
    """(score, status, is_spam) of every test message of one filter on one set."""

    rows: list[tuple[float, str, bool]] = field(default_factory=list)

    def add(self, other: Result) -> None:
        self.rows.extend(other.rows)


def auc(rows: list[tuple[float, str, bool]]) -> float:
    """ROC area by the Mann-Whitney statistic (ties count half)."""
    hams = sorted(r[0] for r in rows if not r[2])
    spams = [r[0] for r in rows if r[2]]
    wins = 0.0
    for score in spams:
        low = bisect.bisect_left(hams, score)
        wins += low + (bisect.bisect_right(hams, score) - low) / 2
    return wins / (len(hams) * len(spams))


def missed_at_fp(rows: list[tuple[float, str, bool]], budget: float = FP_BUDGET) -> float:
    """Share of spam scored at or below the lowest threshold that calls at most ``budget`` of the ham spam."""
    hams = sorted((r[0] for r in rows if not r[2]), reverse=True)
    spams = [r[0] for r in rows if r[2]]
    allowed = math.floor(budget * len(hams))
    threshold = hams[allowed] if allowed < len(hams) else -math.inf  # spam must score above this
    return sum(1 for s in spams if s <= threshold) / len(spams)


HEADER = (f"{'set':<13} {'era':<8} {'filter':<26} {'ham':>5} {'spam':>5}  {'ham→Spam':>13}  {'ham→Prob':>8}"
          f"  {'caught':>7}  {'missed':>7}  {'(1-AUC)%':>8}  {'miss@0.1%':>9}")


@dataclass(frozen=True)
class Tally:
    """A result's counts: ham and spam messages, ham called Spam and Probable Spam, spam caught
    (Spam or Probable Spam) and missed (Not Detected)."""

    ham: int
    spam: int
    fp: int
    probable: int
    caught: int
    missed: int

    @classmethod
    def of(cls, result: Result) -> "Tally":
        ham = [r[1] for r in result.rows if not r[2]]
        spam = [r[1] for r in result.rows if r[2]]
        return cls(len(ham), len(spam), ham.count(SPAM), ham.count(PROBABLE_SPAM),
                   sum(1 for status in spam if status in (SPAM, PROBABLE_SPAM)), spam.count(NOT_DETECTED))


def line(set_name: str, era: str, name: str, result: Result) -> str:
    t = Tally.of(result)
    cells = [f"{set_name:<13} {era:<8} {name:<26} {t.ham:>5} {t.spam:>5}"]
    if t.ham:
        cells.append(f"  {100 * t.fp / t.ham:6.2f}% ({t.fp:>3})  {100 * t.probable / t.ham:7.2f}%")
    else:
        cells.append(f"  {'—':>13}  {'—':>8}")
    if t.spam:
        cells.append(f"  {100 * t.caught / t.spam:6.2f}%  {100 * t.missed / t.spam:6.2f}%")
    else:
        cells.append(f"  {'—':>7}  {'—':>7}")
    if t.ham and t.spam:
        cells.append(f"  {100 * (1 - auc(result.rows)):8.3f}  {100 * missed_at_fp(result.rows):8.2f}%")
    return "".join(cells)


def figures(result: Result) -> tuple[float, float, float, float]:
    """ham→Spam %, ham→Probable %, caught %, (1-AUC)% (nan where the set has no ham or no spam)."""
    t = Tally.of(result)
    nan = float("nan")
    fp = 100 * t.fp / t.ham if t.ham else nan
    probable = 100 * t.probable / t.ham if t.ham else nan
    caught = 100 * t.caught / t.spam if t.spam else nan
    ranking = 100 * (1 - auc(result.rows)) if t.ham and t.spam else nan
    return fp, probable, caught, ranking


def seed_summary(by_seed: dict[tuple[str, str], dict[int, Result]]) -> list[str]:
    """Per row (set, filter): the four figures at each seed, then their min-max spread."""
    out = [f"{'set':<13} {'filter':<22} {'seed':>9}  {'ham→Spam':>8}  {'ham→Prob':>8}  {'caught':>7}  {'(1-AUC)%':>8}"]
    for (set_name, name), results in by_seed.items():
        rows = {seed: figures(result) for seed, result in results.items()}
        for seed, cells in rows.items():
            out.append(f"{set_name:<13} {name:<22} {seed:>9}  " + "  ".join(f"{c:8.2f}" for c in cells))
        spread = []
        for i in range(4):
            values = [cells[i] for cells in rows.values() if not math.isnan(cells[i])]
            spread.append(f"{min(values):5.2f}-{max(values):<5.2f}" if values else f"{'—':>11}")
        out.append(f"{set_name:<13} {name:<22} {'spread':>9}  " + " ".join(spread))
    return out


# -- loading ----------------------------------------------------------------------------------


def _tokenise(job: tuple[str, tuple[str, ...]]) -> frozenset[str]:
    path, exclude = job
    with open(path, "rb") as src:
        return frozenset(training.message_tokens(src.read(), exclude))


def load_sets(roots: dict[str, str], exclude: tuple[str, ...], folds: int, workers: int = 2,
              tokenise: bool = True) -> list[Message]:
    """Every message of every set whose folders exist, tokenised as training would (unless ``tokenise`` is off)."""
    messages: list[Message] = []
    for corpus_set in SETS:
        found = []
        for root_key, folder, is_spam in corpus_set.folders:
            base = os.path.join(roots[root_key], folder)
            if not os.path.isdir(base):
                found = []
                print(f"{corpus_set.name}: {base} missing, set left out")
                break
            for name in sorted(os.listdir(base)):
                if corpus_set.prefixes and not name.startswith(corpus_set.prefixes):
                    continue
                rel = f"{folder}/{name}"
                fold = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % folds
                found.append(Message(rel, os.path.join(base, name), corpus_set.name, is_spam, fold))
        messages.extend(found)
    if not tokenise:
        return messages
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for message, tokens in zip(messages, pool.map(_tokenise, [(m.file, exclude) for m in messages],
                                                      chunksize=64)):
            message.tokens = tokens
    return messages


# -- smtpgw -----------------------------------------------------------------------------------


def train_smtpgw(train: list[Message], manifest: training.Manifest) -> SpamDatabase:
    return training.build_from_tokens(((set(m.tokens), m.is_spam) for m in train), training.default_rules(),
                                      DatabaseInfo(), manifest.min_count)


def _classify_job(job: tuple[str, str, list[tuple[str, bool]]]) -> list[tuple[float, str, bool]]:
    folder, level, items = job
    spam_filter = SpamFilter(SimpleNamespace(SpamDetection=level), folder)
    rows = []
    for path, is_spam in items:
        with open(path, "rb") as src:
            verdict = spam_filter.classify(src.read(), None, "", [], [])
        rows.append((verdict.score, verdict.status, is_spam))
    return rows


def run_smtpgw(folder: str, test: list[Message], levels: Iterable[str], workers: int = 2) -> dict[str, Result]:
    """The verdicts of the database in ``folder`` on ``test``, through SpamFilter.classify."""
    out = {}
    items = [(m.file, m.is_spam) for m in test]
    chunks = [items[i::workers] for i in range(workers)]
    for level in levels:
        result = Result()
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for rows in pool.map(_classify_job, [(folder, level, chunk) for chunk in chunks]):
                result.rows.extend(rows)
        out[level] = result
    return out


# -- bogofilter -------------------------------------------------------------------------------


def run_bogofilter(train: list[Message], test: list[Message]) -> Result:
    result = Result()
    with tempfile.TemporaryDirectory() as folder:
        for flag, is_spam in (("-n", False), ("-s", True)):
            files = [m.file for m in train if m.is_spam == is_spam]
            for start in range(0, len(files), 2000):
                subprocess.run(["bogofilter", "-d", folder, flag, "-B", *files[start:start + 2000]], check=True)
        by_path = {m.file: m for m in test}
        status = {"S": SPAM, "U": PROBABLE_SPAM, "H": NOT_DETECTED}
        paths = list(by_path)
        for start in range(0, len(paths), 2000):
            out = subprocess.run(["bogofilter", "-d", folder, "-T", "-B", *paths[start:start + 2000]], check=False,
                                 capture_output=True, text=True).stdout
            for row in out.splitlines():
                path, verdict, score = row.rsplit(" ", 2)
                result.rows.append((float(score), status[verdict], by_path[path].is_spam))
    return result


# -- SpamAssassin (rules only) ----------------------------------------------------------------

_SA_STATUS = re.compile(rb"^X-Spam-Status: (Yes|No), score=(-?[\d.]+)", re.M)
_BENCH_ID = re.compile(rb"^X-Bench-Id: (\d+)", re.M)
_OLD_SA = re.compile(rb"^X-Spam-[A-Za-z-]*:.*(?:\n[ \t].*)*\n", re.M)
SA_SYSTEM_CONFIG = "/etc/spamassassin"


def sample_per_class(messages: list[Message], size: int) -> list[Message]:
    """At most ``size`` messages of each class, drawn with a fixed seed."""
    picked: list[Message] = []
    for is_spam in (False, True):
        group = [m for m in messages if m.is_spam == is_spam]
        picked.extend(random.Random(20070408).sample(group, min(size, len(group))))
    return picked


def sa_site_config(folder: str) -> str:
    """A private --siteconfigpath: the system's plugin loading (``*.pre``) without its local.cf."""
    site = os.path.join(folder, "site")
    os.makedirs(site, exist_ok=True)
    for name in os.listdir(SA_SYSTEM_CONFIG) if os.path.isdir(SA_SYSTEM_CONFIG) else ():
        if name.endswith(".pre"):
            shutil.copy(os.path.join(SA_SYSTEM_CONFIG, name), site)
    with open(os.path.join(site, "local.cf"), "w", encoding="ascii") as cf:
        cf.write("use_auto_whitelist 0\nbayes_auto_learn 0\nreport_safe 0\nlock_method flock\n")
    return site


def sa_bayes(train: list[Message], folder: str) -> list[str]:
    """sa-learn on ``train`` into a private bayes_path; the spamassassin options that use it."""
    site, bayes = sa_site_config(folder), os.path.join(folder, "bayes")
    for flag, is_spam in (("--ham", False), ("--spam", True)):
        files = [m.file for m in train if m.is_spam == is_spam]
        for start in range(0, len(files), 1000):
            subprocess.run(["sa-learn", "-L", f"--siteconfigpath={site}", f"--dbpath={bayes}", "--no-sync", flag,
                            *files[start:start + 1000]], check=True, capture_output=True)
    subprocess.run(["sa-learn", f"--siteconfigpath={site}", f"--dbpath={bayes}", "--sync"], check=True,
                   capture_output=True)
    return [f"--siteconfigpath={site}", "--cf=use_bayes 1", f"--cf=bayes_path {bayes}"]


def run_spamassassin(test: list[Message], sample: int, options: list[str] | None = None) -> Result:
    """SpamAssassin's local rules (no network) on a seeded sample of each class of ``test``: Bayes
    off, or with ``options`` from ``sa_bayes`` on."""
    picked = sample_per_class(test, sample)
    result = Result()
    with tempfile.TemporaryDirectory() as folder:
        mbox = os.path.join(folder, "test.mbox")
        order: list[Message] = []
        with open(mbox, "wb") as dst:
            for message in picked:
                with open(message.file, "rb") as src:
                    raw = src.read().replace(b"\r\n", b"\n")
                if raw.startswith(b"From "):
                    raw = raw[raw.find(b"\n") + 1:]
                head, sep, body = raw.partition(b"\n\n")
                raw = _OLD_SA.sub(b"", head + b"\n") + sep + body  # the collector's own SpamAssassin verdict
                dst.write(b"From bench@localhost Thu Jan  1 00:00:00 1970\nX-Bench-Id: %d\n" % len(order))
                order.append(message)
                dst.write(re.sub(rb"^(>*From )", rb">\1", raw, flags=re.M).rstrip(b"\n") + b"\n\n")
        config = options or [f"--siteconfigpath={sa_site_config(folder)}", "--cf=use_bayes 0"]
        out = subprocess.run(["spamassassin", "-L", "--mbox", *config, mbox], check=False,
                             capture_output=True).stdout
    # --mbox writes the messages in an order of its own: each is found again by its X-Bench-Id.
    verdicts: dict[int, tuple[bytes, bytes]] = {}
    for chunk in out.split(b"\nFrom bench@localhost ")[:len(picked) + 1]:
        head = chunk.split(b"\n\n", 1)[0]
        ident, status = _BENCH_ID.search(head), _SA_STATUS.search(head)
        if ident and status:
            verdicts[int(ident.group(1))] = status.groups()
    if len(verdicts) != len(picked):
        print(f"spamassassin: {len(verdicts)} verdicts for {len(picked)} messages, left out")
        return Result()
    for index, message in enumerate(order):
        flag, score = verdicts[index]
        result.rows.append((float(score), SPAM if flag == b"Yes" else NOT_DETECTED, message.is_spam))
    return result


def peers_available() -> dict[str, bool]:
    return {"bogofilter": shutil.which("bogofilter") is not None,
            "spamassassin": shutil.which("spamassassin") is not None,
            "sa-learn": shutil.which("sa-learn") is not None}


# -- protocols --------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    messages: list[Message]
    manifest: training.Manifest
    peers: dict[str, bool]
    levels: tuple[str, ...]
    by_seed: dict[tuple[str, str], dict[int, Result]] = field(default_factory=dict)

    def sets_of(self, pick: Callable[[CorpusSet], bool]) -> list[CorpusSet]:
        present = {m.set for m in self.messages}
        return [s for s in SETS if s.name in present and pick(s)]

    def report(self, title: str, database_folder: str, train: list[Message] | None,
               tests: list[tuple[CorpusSet, list[Message], str]]) -> None:
        """One row per set (and level, and peer) for a database and the messages it never saw."""
        print(f"\n== {title}")
        with tempfile.TemporaryDirectory() as sa_folder:
            sa_options = self.sa_trained(train, sa_folder)
            print(HEADER)
            for corpus_set, test, note in tests:
                results = {f"smtpgw {level}{note}": r for level, r in
                           run_smtpgw(database_folder, test, self.levels).items()}
                results.update(self.peer_results(train, test, sa_options))
                for name, result in results.items():
                    if result.rows:
                        print(line(corpus_set.name, corpus_set.era, name, result))
                        self.save_scores(title, corpus_set.name, name, result)
                        self.record(corpus_set.name, name, result)
                sys.stdout.flush()

    def sa_trained(self, train: list[Message] | None, folder: str, whole: str = "") -> list[str] | None:
        """SpamAssassin's Bayes trained on a seeded sample of ``train`` (--sa-train per class; every
        message of the set ``whole``, the other folds of a k-fold, besides), or None."""
        if train is None or not (self.peers["spamassassin"] and self.peers["sa-learn"]) or self.args.sa_sample <= 0:
            return None
        sample = (sample_per_class([m for m in train if m.set != whole], self.args.sa_train)
                  + [m for m in train if m.set == whole])
        started = time.monotonic()
        options = sa_bayes(sample, folder)
        ham = sum(1 for m in sample if not m.is_spam)
        print(f"(sa-learn on {ham} ham and {len(sample) - ham} spam of the same training messages"
              f" in {time.monotonic() - started:.0f} s)")
        return options

    def peer_results(self, train: list[Message] | None, test: list[Message],
                     sa_options: list[str] | None) -> dict[str, Result]:
        """bogofilter trained on ``train``; SpamAssassin's rules alone and with its Bayes (``sa_options``)
        on a sample of ``test``: the sample sizes are in the names."""
        results: dict[str, Result] = {}
        if self.peers["bogofilter"] and train is not None:
            results["bogofilter"] = run_bogofilter(train, test)
        if self.peers["spamassassin"] and self.args.sa_sample > 0:
            sample = self.args.sa_sample
            results[f"SA rules ({sample}/class)"] = run_spamassassin(test, sample)
            if sa_options is not None:
                results[f"SA rules+Bayes ({sample}/class)"] = run_spamassassin(test, sample, sa_options)
        return results

    def record(self, set_name: str, filter_name: str, result: Result) -> None:
        """Keep smtpgw's result of this row under the fitting seed in use, for the --seeds summary."""
        if filter_name.startswith("smtpgw"):
            self.by_seed.setdefault((set_name, filter_name), {})[terms.SEED] = result

    def save_scores(self, title: str, set_name: str, filter_name: str, result: Result) -> None:
        """Append every (score, status, label) to --scores, for choosing thresholds on held-out scores."""
        if not self.args.scores:
            return
        with open(self.args.scores, "a", encoding="utf-8") as dst:
            for score, status, is_spam in result.rows:
                dst.write(f"{title}\t{set_name}\t{filter_name}\t{score!r}\t{status}\t{int(is_spam)}\n")

    def trained(self, train: list[Message], folder: str) -> str:
        started = time.monotonic()
        train_smtpgw(train, self.manifest).save(os.path.join(folder, "spam.db"))
        print(f"(trained on {len(train)} messages in {time.monotonic() - started:.0f} s)")
        return folder


def protocol_shipped(run: Run) -> None:
    shipped = {path for _label, _digest, path in run.manifest.entries}
    tests = []
    for corpus_set in run.sets_of(lambda s: True):
        test = [m for m in run.messages if m.set == corpus_set.name]
        seen = sum(1 for m in test if _listed_path(m) in shipped)
        tests.append((corpus_set, test, " (trained)" if seen else ""))
    run.report("shipped database, every set", default_bases() + "/spam", None, tests)


def _listed_path(message: Message) -> str:
    corpus_set = next(s for s in SETS if s.name == message.set)
    root_key = next(key for key, folder, _ in corpus_set.folders if message.path.startswith(folder + "/"))
    return message.path if root_key == "corpus" else f"packs/{message.path}"


def protocol_loso(run: Run) -> None:
    trainable = run.sets_of(lambda s: s.trainable)
    sources = list(dict.fromkeys(s.source for s in trainable))
    for source in sources:
        train = [m for m in run.messages if _set(m).trainable and _set(m).source != source]
        tests = [(s, [m for m in run.messages if m.set == s.name], "") for s in trainable if s.source == source]
        with tempfile.TemporaryDirectory() as folder:
            run.report(f"leave one source out: trained on every source but {source}", run.trained(train, folder),
                       train, tests)
    untrained = run.sets_of(lambda s: not s.trainable)
    if untrained:
        train = [m for m in run.messages if _set(m).trainable]
        tests = [(s, [m for m in run.messages if m.set == s.name], "") for s in untrained]
        with tempfile.TemporaryDirectory() as folder:
            run.report("never-trained sets: trained on every trainable source", run.trained(train, folder),
                       train, tests)


def protocol_modern_kfold(run: Run) -> None:
    modern = [s for s in run.sets_of(lambda s: s.source == "modern")]
    if not modern:
        return
    name = modern[0].name
    total: dict[str, Result] = {}
    for k in range(run.args.folds):
        train = [m for m in run.messages if _set(m).trainable and not (m.set == name and m.fold == k)]
        test = [m for m in run.messages if m.set == name and m.fold == k]
        with tempfile.TemporaryDirectory() as folder:
            run.trained(train, folder)
            for level, result in run_smtpgw(folder, test, run.levels).items():
                total.setdefault(f"smtpgw {level}", Result()).add(result)
            with tempfile.TemporaryDirectory() as sa_folder:
                for filter_name, result in run.peer_results(train, test, run.sa_trained(train, sa_folder, name)).items():
                    total.setdefault(filter_name, Result()).add(result)
    for filter_name, result in total.items():
        run.save_scores(f"{name} k-fold", name, filter_name, result)
    print(f"\n== {name} {run.args.folds}-fold: each fold judged by a database trained on every other source"
          " and the other folds")
    print(HEADER)
    for filter_name, result in total.items():
        print(line(name, modern[0].era, filter_name, result))
        run.record(f"{name} {run.args.folds}-f", filter_name, result)


def protocol_sa_era(run: Run) -> None:
    sets = {s.name: s for s in run.sets_of(lambda s: s.source == "spamassassin")}
    if len(sets) < 2:
        return
    train = [m for m in run.messages if m.set == "sa-2002"]
    test = [m for m in run.messages if m.set == "sa-2003-05"]
    with tempfile.TemporaryDirectory() as folder:
        run.report("era: trained on sa-2002 alone", run.trained(train, folder), train,
                   [(sets["sa-2003-05"], test, "")])


def _set(message: Message) -> CorpusSet:
    return next(s for s in SETS if s.name == message.set)


PROTOCOLS = {"shipped": protocol_shipped, "loso": protocol_loso, "modern-kfold": protocol_modern_kfold,
             "sa-era": protocol_sa_era}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="spam filter accuracy per set and per era")
    parser.add_argument("--packs", default=DEFAULT_PACKS, help="where unpack.sh put the packed sets")
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--protocols", default="shipped,loso,modern-kfold,sa-era")
    parser.add_argument("--levels", default="soft,standard,hard")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sa-sample", type=int, default=150, help="messages of each class per set for SpamAssassin")
    parser.add_argument("--sa-train", type=int, default=2000,
                        help="training messages of each class for SpamAssassin's Bayes (a seeded sample)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scores", help="append every test message's score to this file (TSV)")
    parser.add_argument("--seeds", default=str(terms.SEED),
                        help="fitting seeds of the term weights, comma-separated: every protocol runs once per seed")
    args = parser.parse_args(argv)
    protocols = args.protocols.split(",")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        parser.error(f"unknown protocol(s) {', '.join(unknown)}; known: {', '.join(PROTOCOLS)}")
    levels = tuple(level for level in args.levels.split(",") if level in LEVELS)
    manifest = training.read_manifest(MANIFEST)
    started = time.monotonic()
    messages = load_sets({"corpus": args.corpus, "packs": args.packs}, manifest.exclude, args.folds, args.workers)
    peers = {k: v and not args.no_peers for k, v in peers_available().items()}
    counts = {}
    for m in messages:
        ham, spam = counts.get(m.set, (0, 0))
        counts[m.set] = (ham + (not m.is_spam), spam + m.is_spam)
    print(f"{len(messages)} messages tokenised in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{name} {ham}/{spam}" for name, (ham, spam) in counts.items())
          + "; peers: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in peers.items()))
    run = Run(args, messages, manifest, peers, levels)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for seed in seeds:
        terms.SEED = seed
        if len(seeds) > 1:
            print(f"\n######## fitting seed {seed}")
        for name in protocols:
            PROTOCOLS[name](run)
    if len(seeds) > 1:
        print("\n== smtpgw at each fitting seed, and the spread")
        print("\n".join(seed_summary(run.by_seed)))
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
