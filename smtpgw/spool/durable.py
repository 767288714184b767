"""Durable writes: the temp → fsync → rename → fsync(dir) discipline every file we keep follows.

Owns: writing a whole file so that after a crash its path holds either the old bytes, the
new bytes or nothing; fsync of a file or of a directory (which makes a rename or an unlink in it
durable), one directory fsync shared by the threads that need it at once (`GroupSync`);
removing a file that may already be gone.

Must never: leave a half-written file under its final name, report a write as done before
the bytes (and, when asked, the directory entry) are on stable storage, or follow a policy
of its own about what to write where (callers choose paths; the spool layout belongs to
`smtpgw.spool.queue`).
"""

from __future__ import annotations

import os
import threading

__all__ = ["fsync_dir", "fsync_file", "write_durably", "reopen", "read_file", "unlink_if_present", "GroupSync"]

READ_CHUNK = 65536


def fsync_dir(path: str) -> None:
    """Make the renames and unlinks already done in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes, sync_dir: bool = True, temp: str | None = None) -> None:
    """temp → fsync → rename → fsync(dir): after return, ``path`` holds ``data`` or nothing.

    The temp file is ``.NAME.tmp`` in the same folder (names starting with a dot are never
    read as content, and a crash leaves only such a file), or ``temp``: an existing file of
    the same file system that nothing else reads and that a crash leaves to be removed (a
    recycled spool file, ``Queue.take_free``), rewritten from its start. ``sync_dir=False``
    leaves the directory fsync to the caller, who group-commits several renames with one
    `fsync_dir`; until then the rename may be lost by a crash, the bytes under the old name
    never are.
    """
    folder, name = os.path.split(path)
    fd = reopen(temp)
    reused = fd >= 0
    if not reused:
        temp = os.path.join(folder, f".{name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if reused:
            os.ftruncate(fd, len(data))  # what followed, from the file's last use, goes
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    if sync_dir:
        fsync_dir(folder)


def reopen(path: str | None) -> int:
    """A descriptor of the existing file ``path`` to be written again from its start, or -1 when
    there is none (no path, or the file is gone). Its bytes are not dropped (which would free its
    disk blocks, only for the new bytes to need others): the writer cuts the file to the length
    it wrote (``os.ftruncate``) before it syncs it."""
    if path is None:
        return -1
    try:
        return os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return -1


def read_file(path: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (its first ``limit`` of them: one read): open, read,
    close, without a buffered file object's fstat, ioctl and lseek (a read of a regular file is
    short only at its end)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if limit is not None:
            return os.read(fd, limit)
        chunks = [os.read(fd, READ_CHUNK)]
        while len(chunks[-1]) == READ_CHUNK:
            chunks.append(os.read(fd, READ_CHUNK))
    finally:
        os.close(fd)
    return b"".join(chunks) if len(chunks) > 1 else chunks[0]


def unlink_if_present(path: str) -> None:
    """Remove ``path``; one already gone (removed meanwhile, or never made) is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """The fsync of one folder, shared by the threads that need it at once (group commit): one
    fsync covers every change made in the folder before it started, so a thread whose change
    preceded a running fsync waits for the next one and shares it with the others waiting."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._cv = threading.Condition()
        self._asked = 0
        self._synced = 0
        self._syncing = False
        self._fd = -1  # the folder, opened at the first fsync and kept (one thread fsyncs at a time)

    def sync(self) -> None:
        with self._cv:
            self._asked += 1
            mine = self._asked
            while self._synced < mine:
                if self._syncing:
                    self._cv.wait()
                    continue
                self._syncing = True
                target = self._asked
                self._cv.release()
                try:
                    self._fsync()
                finally:
                    self._cv.acquire()
                    self._syncing = False
                    self._cv.notify_all()
                self._synced = max(self._synced, target)

    def _fsync(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fsync(self._fd)

    def close(self) -> None:
        """Let go of the folder's descriptor (a later ``sync`` opens it again)."""
        with self._cv:
            while self._syncing:
                self._cv.wait()
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
