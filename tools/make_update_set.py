#!/usr/bin/env python3
"""Make a signed keepup2date update set (the folder UpdateServerUrl points at) from a bases folder.

Usage:
  python3 tools/make_update_set.py BASES OUT --key RELEASE_KEY [--key KEY2] [--version V] [--date D]
                                   [--clamd FILE ...]

BASES is a bases folder (e.g. smtpgw/bases, or a host's BasesPath after training);
OUT, which must be new or empty, receives ``index.json``, ``index.json.sig``,
``bases/...`` and ``clamd/...`` (the format is described in smtpgw/update/updateset.py and
smtpgw/update/signing.py). The version and date default to the spam database's; ``--clamd``
adds clamd signature files (.ndb, .hdb, .ldb, .cvd, ...), checked with clamscan as
keepup2date will check them. ``--key`` is the secret key that signs the set: for the
project's releases the release key, whose public half ships as
smtpgw/keys/smtpgw-release.pub. The release manager keeps that secret key off the
repository and off the update server: on their own machine as
``~/.smtpgw-release/smtpgw-release`` (folder 0700, file 0600), with an offline backup;
a site signing its own sets uses its own key (``smtpgw.py keepup2date keygen``).
Give ``--key`` twice to sign with an old and a new key while gateways change keys.
Publish OUT with any web server, or share it as a folder.

The same as ``smtpgw.py keepup2date make-bundle --key KEY --db BASES --out OUT``.

Must never: write an index that does not describe the files beside it, publish a
spam database or clamd signatures that do not load, or sign with a secret key that
others can read.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.update.updater import make_bundle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a signed keepup2date update set from a bases folder.")
    parser.add_argument("bases", help="bases folder (holding spam/spam.db)")
    parser.add_argument("out", help="new or empty folder for the update set")
    parser.add_argument("--key", required=True, action="append", metavar="FILE",
                        help="secret key that signs the set (the release key for the project's sets)")
    parser.add_argument("--version", help="set version: numbers separated by . or - (default: the spam database's)")
    parser.add_argument("--date", help="set date (default: the spam database's)")
    parser.add_argument("--clamd", nargs="+", default=[], metavar="FILE", help="clamd signature files to include")
    args = parser.parse_args(argv)
    code = make_bundle(args.bases, args.out, args.key, args.version, args.date, args.clamd, prog="make_update_set")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
