#!/usr/bin/env python3
"""Accuracy of smtpgw's anti-spam engine beside bogofilter and SpamAssassin, in one run.

Corpus: <repo>/../shared/corpus/spamassassin (ham/ and spam/). Each message
goes to fold int(sha256(file name)) mod K, so every run splits the same way.

* holdout — fold 0 is the test set, the other folds train: smtpgw, bogofilter
  and SpamAssassin (Bayes trained with sa-learn on the same files, spamd -L:
  local tests only, no network) all measured on it; smtpgw also at the soft
  and hard levels.
* K-fold cross-validation — every fold tested once, trained on the others:
  smtpgw and bogofilter (and SpamAssassin with --sa-folds K; it is slow).
* era — train on the 2002 sets (easy_ham, hard_ham, spam), test on the later
  ones (easy_ham_2, spam_2 of 2003-2005): how well the model ages.

Figures: ham called Spam (false positives), ham called Probable Spam, spam
caught (Spam or Probable Spam), spam called Not Detected, (1-ROC AUC)%.
bogofilter's Unsure counts as Probable Spam; SpamAssassin has no middle band
(Spam at its required score 5.0).

smtpgw is trained with the same token exclusions and pruning as the shipped
database (smtpgw/bases/spam/TRAINING_FILES.txt).

Must never: train on a message it then tests in the same protocol, or talk to
anything but its own spamd on 127.0.0.1.

With --strip-trace the collector's trace fields (Received, Delivered-To,
Return-Path, X-Spam-*, ...) are removed from every message for every filter:
they were added after the point where a gateway filters, and their dates and
hosts tell the corpus's years and mailing lists apart rather than spam from ham.

The default run ends with the K-fold protocol on stripped messages
(kfold-stripped): the corpus as the gateway would have seen it.

Usage: python3 bench/spam_accuracy.py [--folds 5] [--sa-folds 1] [--no-peers]
       [--protocols holdout,kfold,era,kfold-stripped] [--strip-trace]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.spam import training  # noqa: E402
from smtpgw.spam.database import DatabaseInfo  # noqa: E402
from smtpgw.spam.spamfilter import SpamFilter  # noqa: E402
from smtpgw.spam.verdict import NOT_DETECTED, PROBABLE_SPAM, SPAM  # noqa: E402

CORPUS = os.path.join(os.path.dirname(REPO), "shared", "corpus", "spamassassin")
MANIFEST = os.path.join(REPO, "smtpgw", "bases", "spam", "TRAINING_FILES.txt")
EARLY_SETS = ("easy_ham__", "hard_ham__", "spam__")


@dataclass
class Message:
    path: str
    name: str
    is_spam: bool
    fold: int
    raw: bytes
    tokens: set[str] = field(default_factory=set)


@dataclass
class Result:
    """(score, status, is_spam) of every test message of one filter."""

    rows: list[tuple[float, str, bool]] = field(default_factory=list)

    def add(self, other: Result) -> None:
        self.rows.extend(other.rows)

    def line(self, name: str) -> str:
        ham = [r for r in self.rows if not r[2]]
        spam = [r for r in self.rows if r[2]]
        if not ham or not spam:
            return f"{name:<26} (no data)"
        fp = sum(1 for r in ham if r[1] == SPAM)
        probable = sum(1 for r in ham if r[1] == PROBABLE_SPAM)
        caught = sum(1 for r in spam if r[1] in (SPAM, PROBABLE_SPAM))
        missed = sum(1 for r in spam if r[1] == NOT_DETECTED)
        return (f"{name:<26} {len(ham):>5} {len(spam):>5}  {100 * fp / len(ham):6.2f}% ({fp:>2})"
                f"  {100 * probable / len(ham):6.2f}%  {100 * caught / len(spam):7.2f}%"
                f"  {100 * missed / len(spam):6.2f}%  {100 * (1 - auc(self.rows)):7.3f}")


HEADER = (f"{'filter':<26} {'ham':>5} {'spam':>5}  {'ham→Spam':>12}  {'ham→Prob':>7}  {'caught':>8}"
          f"  {'missed':>7}  {'(1-AUC)%':>8}")


def auc(rows: list[tuple[float, str, bool]]) -> float:
    """ROC area by the Mann-Whitney statistic (ties count half)."""
    hams = sorted(r[0] for r in rows if not r[2])
    spams = [r[0] for r in rows if r[2]]
    wins = 0.0
    for score in spams:
        low = bisect.bisect_left(hams, score)
        wins += low + (bisect.bisect_right(hams, score) - low) / 2
    return wins / (len(hams) * len(spams))


# Header fields a message gains after it passed the receiving gateway: the
# collector's delivery hops and filters. --strip-trace removes them for every
# filter, so all three judge what a gateway would have seen.
TRACE_FIELDS = re.compile(
    rb"^(?:received|delivered-to|return-path|delivery-date|x-keywords|x-status|status|x-spam-[a-z-]+|x-uid)\s*:", re.I)


def strip_trace(raw: bytes) -> bytes:
    if raw.startswith(b"From "):
        raw = raw[raw.find(b"\n") + 1 :]
    end = raw.find(b"\n\n")
    head, body = (raw[:end], raw[end:]) if end >= 0 else (raw, b"")
    fields = re.split(rb"\n(?![ \t])", head)
    return b"\n".join(f for f in fields if not TRACE_FIELDS.match(f)) + body


def load_corpus(folds: int, exclude: tuple[str, ...] | None, stripped_dir: str | None = None) -> list[Message]:
    """Every corpus message; tokenised for smtpgw (with ``exclude``) unless exclude is None.

    With ``stripped_dir`` the trace fields are removed and the copies written there
    (bogofilter and SpamAssassin read files).
    """
    out = []
    for label in ("ham", "spam"):
        folder = os.path.join(CORPUS, label)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            with open(path, "rb") as src:
                raw = src.read()
            if stripped_dir is not None:
                raw = strip_trace(raw)
                path = os.path.join(stripped_dir, name)
                with open(path, "wb") as dst:
                    dst.write(raw)
            fold = int(hashlib.sha256(name.encode()).hexdigest(), 16) % folds
            message = Message(path, name, label == "spam", fold, raw)
            if exclude is not None:
                message.tokens = training.message_tokens(raw, exclude)
            out.append(message)
    return out


# -- smtpgw -----------------------------------------------------------------------------------


def run_smtpgw(train: list[Message], test: list[Message], manifest: training.Manifest,
               levels: tuple[str, ...] = ("standard",)) -> dict[str, Result]:
    database = training.build_from_tokens(
        ((m.tokens, m.is_spam) for m in train), training.default_rules(), DatabaseInfo(), manifest.min_count
    )
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        database.save(os.path.join(folder, "spam.db"))
        for level in levels:
            spam_filter = SpamFilter(SimpleNamespace(SpamDetection=level), folder)
            result = Result()
            for message in test:
                verdict = spam_filter.classify(message.raw, None, "", [], [])
                result.rows.append((verdict.score, verdict.status, message.is_spam))
            results[level] = result
    return results


# -- bogofilter -------------------------------------------------------------------------------


def run_bogofilter(train: list[Message], test: list[Message]) -> Result:
    result = Result()
    with tempfile.TemporaryDirectory() as folder:
        for flag, is_spam in (("-n", False), ("-s", True)):
            files = [m.path for m in train if m.is_spam == is_spam]
            subprocess.run(["bogofilter", "-d", folder, flag, "-B", *files], check=True)
        by_path = {m.path: m for m in test}
        out = subprocess.run(["bogofilter", "-d", folder, "-T", "-B", *by_path], check=False,
                             capture_output=True, text=True).stdout
        status = {"S": SPAM, "U": PROBABLE_SPAM, "H": NOT_DETECTED}
        for line in out.splitlines():
            path, verdict, score = line.rsplit(" ", 2)
            result.rows.append((float(score), status[verdict], by_path[path].is_spam))
    return result


# -- SpamAssassin -----------------------------------------------------------------------------


class Spamd:
    """A private spamd -L on loopback with its own Bayes database."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def learn(self, train: list[Message]) -> None:
        bayes = os.path.join(self.folder, "bayes")
        for flag, is_spam in (("--ham", False), ("--spam", True)):
            listing = os.path.join(self.folder, f"{flag[2:]}.list")
            with open(listing, "w") as dst:
                dst.write("\n".join(m.path for m in train if m.is_spam == is_spam) + "\n")
            subprocess.run(["sa-learn", "--dbpath", bayes, "--no-sync", flag, "-f", listing], check=True,
                           capture_output=True)
        subprocess.run(["sa-learn", "--dbpath", bayes, "--sync"], check=True, capture_output=True)
        shutil.chown(self.folder, "debian-spamd")
        for name in os.listdir(self.folder):
            shutil.chown(os.path.join(self.folder, name), "debian-spamd")

    def start(self) -> None:
        bayes = os.path.join(self.folder, "bayes")
        self.proc = subprocess.Popen(
            [_which("spamd"), "-L", "-x", "-i", f"127.0.0.1:{self.port}", "-A", "127.0.0.1", "-u", "debian-spamd",
             "-m", "2", "--pidfile", os.path.join(self.folder, "spamd.pid"), "-s", "stderr",
             f"--cf=bayes_path {bayes}", "--cf=use_bayes 1", "--cf=bayes_auto_learn 0",
             "--cf=bayes_learn_to_journal 0", "--cf=lock_method flock"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("spamd exited at start-up")
            try:
                if b"PONG" in self._request(b"PING SPAMC/1.5\r\n\r\n"):
                    return
            except OSError:
                time.sleep(0.2)  # spamd is still compiling its rules; polling its port
        raise RuntimeError("spamd did not answer within 120 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def _request(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as conn:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def score(self, raw: bytes) -> float:
        """SpamAssassin's score of a message (the SPAMD 'Spam: x ; score / threshold' line)."""
        if raw.startswith(b"From "):
            raw = raw[raw.find(b"\n") + 1 :]
        reply = self._request(b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(raw) + raw)
        for line in reply.split(b"\r\n"):
            if line.startswith(b"Spam:"):
                return float(line.split(b";")[1].split(b"/")[0])
        raise RuntimeError(f"spamd answer without a score: {reply[:200]!r}")


@contextmanager
def trained_spamd(train: list[Message]) -> Iterator[Spamd]:
    """A running private spamd whose Bayes database learned ``train``."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        spamd = Spamd(folder)
        spamd.learn(train)
        spamd.start()
        try:
            yield spamd
        finally:
            spamd.stop()


def run_spamassassin(train: list[Message], test: list[Message]) -> Result:
    result = Result()
    with trained_spamd(train) as spamd, ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(lambda m: spamd.score(m.raw), test))
    for message, score in zip(test, scores):
        result.rows.append((score, SPAM if score >= 5.0 else NOT_DETECTED, message.is_spam))
    return result


def _which(program: str) -> str:
    return shutil.which(program) or os.path.join("/usr/sbin", program)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- protocols --------------------------------------------------------------------------------


def peers_available() -> dict[str, bool]:
    return {
        "bogofilter": shutil.which("bogofilter") is not None,
        "spamassassin": shutil.which("sa-learn") is not None and os.path.exists(_which("spamd")),
    }


def report(title: str, results: dict[str, Result]) -> None:
    print(f"\n== {title}")
    print(HEADER)
    for name, result in results.items():
        print(result.line(name))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="spam filter accuracy on the SpamAssassin public corpus")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sa-folds", type=int, default=1, help="folds SpamAssassin runs in k-fold (slow)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--protocols", default="holdout,kfold,era,kfold-stripped",
                        help="kfold-stripped: the K-fold protocol again with --strip-trace")
    parser.add_argument("--strip-trace", action="store_true",
                        help="remove the collector's Received/Delivered-To/... fields for every filter")
    args = parser.parse_args(argv)
    protocols = set(args.protocols.split(","))
    status = 0
    if args.strip_trace or protocols - {"kfold-stripped"}:
        status = _run_stripped(args) if args.strip_trace else run(args, None)
    if "kfold-stripped" in protocols and not args.strip_trace:
        args.protocols = "kfold"
        status = status or _run_stripped(args)
    return status


def _run_stripped(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        return run(args, folder)


def run(args: argparse.Namespace, stripped_dir: str | None) -> int:
    protocols = set(args.protocols.split(","))
    peers = {k: v and not args.no_peers for k, v in peers_available().items()}
    manifest = training.read_manifest(MANIFEST)
    started = time.monotonic()
    messages = load_corpus(args.folds, manifest.exclude, stripped_dir)
    print(f"corpus {CORPUS}{' (trace fields stripped)' if stripped_dir else ''}: {sum(not m.is_spam for m in messages)} ham, {sum(m.is_spam for m in messages)} spam,"
          f" tokenised in {time.monotonic() - started:.1f} s; peers: "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in peers.items()))

    if "holdout" in protocols:
        train = [m for m in messages if m.fold != 0]
        test = [m for m in messages if m.fold == 0]
        results = {f"smtpgw {lvl}": r for lvl, r in
                   run_smtpgw(train, test, manifest, ("soft", "standard", "hard")).items()}
        if peers["bogofilter"]:
            results["bogofilter"] = run_bogofilter(train, test)
        if peers["spamassassin"]:
            results["spamassassin (bayes, -L)"] = run_spamassassin(train, test)
        report(f"holdout: fold 0 of {args.folds} as test set", results)

    if "kfold" in protocols:
        totals: dict[str, Result] = {"smtpgw standard": Result()}
        if peers["bogofilter"]:
            totals["bogofilter"] = Result()
        if peers["spamassassin"] and args.sa_folds > 1:
            totals[f"spamassassin ({args.sa_folds} folds)"] = Result()
        for k in range(args.folds):
            train = [m for m in messages if m.fold != k]
            test = [m for m in messages if m.fold == k]
            totals["smtpgw standard"].add(run_smtpgw(train, test, manifest)["standard"])
            if peers["bogofilter"]:
                totals["bogofilter"].add(run_bogofilter(train, test))
            if peers["spamassassin"] and k < args.sa_folds and args.sa_folds > 1:
                totals[f"spamassassin ({args.sa_folds} folds)"].add(run_spamassassin(train, test))
        report(f"{args.folds}-fold cross-validation" + (" (trace fields stripped)" if stripped_dir else ""), totals)

    if "era" in protocols:
        train = [m for m in messages if m.name.startswith(EARLY_SETS)]
        test = [m for m in messages if not m.name.startswith(EARLY_SETS)]
        results = {"smtpgw standard": run_smtpgw(train, test, manifest)["standard"]}
        if peers["bogofilter"]:
            results["bogofilter"] = run_bogofilter(train, test)
        report("era: trained on easy_ham + hard_ham + spam (2002), tested on easy_ham_2 + spam_2 (2002-2005)",
               results)
    print(f"\ntotal time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
