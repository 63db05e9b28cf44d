"""Locks across processes: one writer of a run folder at a time, one builder of a cache folder.

Locks are `fcntl.flock` on a small file: the system releases them when their process ends, however it ends, so
a lock left by a killed process is free again at once. The holder writes its pid and host into the file, so
that whoever finds the lock taken can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from tunestack.errors import ConfigError


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock held for the block; other processes asking for it wait. The lock file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def holder(path: Path) -> str | None:
    """'pid N on HOST' when another process holds the lock at `path`, else None."""
    if not path.is_file():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            return _describe(fh.read())
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def _describe(text: str) -> str:
    pid, _, host = text.strip().partition(" ")
    return f"pid {pid or '?'} on {host or '?'}"


class WriterLock:
    """The one writer of a folder: taken at once or refused with a ConfigError naming the holder; held until
    `release` (which removes the lock file) or the end of the process."""

    def __init__(self, path: Path, what: Path):
        self.path = path
        self.what = what
        self._fh = None

    def acquire(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the lock
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                who = _describe(fh.read())
                fh.close()
                raise ConfigError(
                    f"{self.what} is in use by {who}: another tunestack process is writing it; wait for it to "
                    "end or choose another output folder"
                ) from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()  # the file was released and removed while this process opened it: take the new one
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
