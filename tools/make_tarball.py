#!/usr/bin/env python3
"""Build the release tarball ``smtpgw-<version>.tar.gz`` (version from smtpgw/__init__.py).

Usage:
  python3 tools/make_tarball.py [--source DIR] [--output DIR]

It holds, under ``smtpgw-<version>/``: smtpgw.py, the smtpgw/ package (with
bases/ and templates/), smtpgw.conf.sample, install.sh, postinstall.py, dist/,
LICENSE, README.md and ARCHITECTURE.md. The output folder defaults to
``<source>/build``; the tarball's path is printed.

The archive is reproducible: members sorted, owned by root, modes 0755 (folders
and the scripts in EXECUTABLES) or 0644 whatever the checkout's modes, times set
to the newest file's (or SOURCE_DATE_EPOCH).

Must never: pack caches, compiled files, hidden files (locks, temp files of
atomic writes, editor swap files), backups, symbolic links or anything outside
the list above.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import io
import os
import re
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("smtpgw.py", "smtpgw.conf.sample", "install.sh", "postinstall.py", "LICENSE", "README.md", "ARCHITECTURE.md")
FOLDERS = ("smtpgw", "dist")
REQUIRED_INSIDE = ("smtpgw/bases", "smtpgw/templates", "smtpgw/keys/smtpgw-release.pub")
EXECUTABLES = frozenset({"smtpgw.py", "install.sh", "postinstall.py", "dist/smtpgw.init"})
JUNK = ("__pycache__", "*.pyc", "*.pyo", ".*", "*~", "*.swp", "*.tmp", "*.bak", "*.orig", "*.rej")


class ReleaseError(Exception):
    """The release cannot be built; the message says why."""


def version_of(source: str) -> str:
    path = os.path.join(source, "smtpgw", "__init__.py")
    try:
        with open(path, encoding="utf-8") as handle:
            match = re.search(r'^__version__ = "([0-9A-Za-z.+-]{1,40})"$', handle.read(), re.MULTILINE)
    except OSError as exc:
        raise ReleaseError(f"cannot read {path}: {exc.strerror}") from None
    if not match:
        raise ReleaseError(f'{path}: no __version__ = "..." line')
    return match.group(1)


def junk(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in JUNK)


def members(source: str) -> list[str]:
    """The relative paths to pack (files and folders), sorted; a missing item is an error."""
    missing = [item for item in (*FILES, *FOLDERS, *REQUIRED_INSIDE) if not os.path.exists(os.path.join(source, item))]
    if missing:
        raise ReleaseError(f"{source}: missing {', '.join(missing)}")
    found = list(FILES)
    for top in FOLDERS:
        found.append(top)
        for folder, folders, names in os.walk(os.path.join(source, top)):
            folders[:] = sorted(name for name in folders if not junk(name))
            for name in [*folders, *names]:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    raise ReleaseError(f"{path}: symbolic links are not packed; replace it with the file")
                if not junk(name):
                    found.append(os.path.relpath(path, source))
    return sorted(found)


def build(source: str, output: str) -> str:
    version = version_of(source)
    top = f"smtpgw-{version}"
    items = members(source)
    paths = [os.path.join(source, item) for item in items]
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    mtime = int(epoch) if epoch and epoch.isdigit() else int(max(os.path.getmtime(path) for path in paths))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        root = tarfile.TarInfo(top)
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, mtime
        archive.addfile(root)
        for item, path in zip(items, paths):
            info = archive.gettarinfo(path, f"{top}/{item}")
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = mtime
            info.mode = 0o755 if info.isdir() or item in EXECUTABLES else 0o644
            if info.isdir():
                archive.addfile(info)
            else:
                with open(path, "rb") as handle:
                    archive.addfile(info, handle)
    os.makedirs(output, exist_ok=True)
    target = os.path.join(output, f"{top}.tar.gz")
    temp = target + ".part"
    with open(temp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as packed:
        packed.write(buffer.getvalue())
    os.replace(temp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the smtpgw release tarball.")
    parser.add_argument("--source", default=REPO, help="project folder (default: this checkout)")
    parser.add_argument("--output", help="folder for the tarball (default: <source>/build)")
    args = parser.parse_args(argv)
    source = os.path.abspath(args.source)
    try:
        print(build(source, os.path.abspath(args.output or os.path.join(source, "build"))))
    except (ReleaseError, OSError) as exc:
        print(f"make_tarball: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
