"""Reading training and test mail from mbox files, Maildirs and one-message files.

Owns: finding the messages under a path — a Maildir (``cur/`` and ``new/``), a
directory of message files (walked in sorted order), an mbox file (split at
``From `` lines that start the file or follow an empty line, RFC 4155, with
mboxrd ``>From`` quoting undone), or a file holding one message — and yielding
each message's bytes without its mbox separator line.

Must never: follow a directory symlink loop, read more than ``MAX_FILE_BYTES``
of one file, keep more than ``MAX_MESSAGE_BYTES`` of one message, or raise on a
file it cannot read (it is logged and skipped).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator

log = logging.getLogger("smtpgw.spam.mailsource")

MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024  # an mbox is read as a stream, up to this much
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the classifier reads far less (mailview.MAX_MESSAGE_BYTES)
MAX_FILES = 1_000_000
_MBOXRD_QUOTED = re.compile(rb"^>+From ")


def iter_messages(path: str) -> Iterator[tuple[str, bytes]]:
    """(label, message bytes) for every message under ``path``, in a stable order."""
    if os.path.isdir(path):
        yield from _iter_directory(path)
    else:
        yield from _iter_file(path)


def _iter_directory(path: str) -> Iterator[tuple[str, bytes]]:
    subdirs = [os.path.join(path, name) for name in ("cur", "new")]
    if any(os.path.isdir(d) for d in subdirs):  # Maildir: messages live in cur/ and new/
        roots = [d for d in subdirs if os.path.isdir(d)]
    else:
        roots = [path]
    count = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):  # os.walk does not follow symlinked directories
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "tmp")
            for name in sorted(files):
                if name.startswith("."):
                    continue
                count += 1
                if count > MAX_FILES:
                    log.warning("more than %d files under %s; the rest is skipped", MAX_FILES, path)
                    return
                yield from _iter_file(os.path.join(folder, name))


def _iter_file(path: str) -> Iterator[tuple[str, bytes]]:
    try:
        src = open(path, "rb")
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc.strerror or exc)
        return
    with src:
        messages = split_mbox(src)
        first = next(messages, None)
        if first is None:
            return
        second = next(messages, None)
        if second is None:
            yield path, first
            return
        yield f"{path}:1", first
        yield f"{path}:2", second
        for number, message in enumerate(messages, 3):
            yield f"{path}:{number}", message


def split_mbox(src) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    """Messages of a binary stream; a stream without ``From `` separators is one message."""
    current: list[bytes] = []
    size = 0
    read = 0
    previous_blank = True
    is_mbox = None
    for line in src:
        read += len(line)
        if read > MAX_FILE_BYTES:
            log.warning("stopped reading after %d bytes", MAX_FILE_BYTES)
            break
        if is_mbox is None:
            is_mbox = line.startswith(b"From ")
        if is_mbox and line.startswith(b"From ") and previous_blank:
            if current:
                yield b"".join(current)
            current, size = [], 0
            previous_blank = False
            continue
        previous_blank = line in (b"\n", b"\r\n")
        if is_mbox and _MBOXRD_QUOTED.match(line):
            line = line[1:]
        if size + len(line) <= MAX_MESSAGE_BYTES:
            current.append(line)
            size += len(line)
    if current:
        yield b"".join(current)
