#!/usr/bin/env python3
"""Make a keepup2date update set (the folder UpdateServerUrl points at) from a bases folder.

Usage:
  python3 tools/make_update_set.py BASES OUT [--version V] [--date D] [--clamd FILE ...]

BASES is a bases folder (e.g. smtpgw/bases, or a host's BasesPath after training);
OUT, which must be new or empty, receives ``index.json``, ``bases/...`` and
``clamd/...`` (the format is described in smtpgw/updateset.py). The version and date
default to the spam database's; ``--clamd`` adds clamd signature files (.ndb,
.hdb, .ldb, .cvd, ...), checked with clamscan as keepup2date will check them.
Publish OUT with any web server, or share it as a folder.

Must never: write an index that does not describe the files beside it, or
publish a spam database or clamd signatures that do not load.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtpgw.updateset import UpdateError, build_update_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a keepup2date update set from a bases folder.")
    parser.add_argument("bases", help="bases folder (holding spam/spam.db)")
    parser.add_argument("out", help="new or empty folder for the update set")
    parser.add_argument("--version", help="set version: numbers separated by . or - (default: the spam database's)")
    parser.add_argument("--date", help="set date (default: the spam database's)")
    parser.add_argument("--clamd", nargs="+", default=[], metavar="FILE", help="clamd signature files to include")
    args = parser.parse_args(argv)
    try:
        index = build_update_set(args.bases, args.out, args.version, args.date, args.clamd, check=True)
    except (UpdateError, OSError) as exc:
        print(f"make_update_set: {exc} ({args.out} has no index.json: not usable)", file=sys.stderr)
        return 1
    total = sum(entry.size for entry in index.entries)
    print(f"{args.out}: version {index.version}, {len(index.entries)} file(s), {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
